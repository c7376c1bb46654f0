"""Hostile files and a seeded mutation fuzz: nothing but ImageDecodeError leaves `images.decode`, within the memory bound.

Memory is measured per case twice: tracemalloc's peak (Python and numpy allocations) and,
where Linux lets a process reset it, the growth of the process's peak resident memory
(which also sees the C libraries: Pillow, zlib, OpenJPEG).
"""

from __future__ import annotations

import io
import struct
import tracemalloc
import warnings
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from tests.badfiles import good_files
from tests.hostile import dicom, good_compressed_dicoms, hostile_bytes, png_really, rewriting, write_hostile_files
from xray_ray.images.bounds import CODES, LIMITS, DecodeLimits
from xray_ray.images.decode import ImageDecodeError, decode, read_bytes, read_image
from xray_ray.images.preprocess import preprocess
from xray_ray.processes import proc_field_mb

pytestmark = pytest.mark.timeout(300)

HOSTILE = hostile_bytes()
# Tight limits keep the fuzz fast and its bound small: the same code paths, scaled down.
FUZZ_LIMITS = DecodeLimits(max_side=4096, max_pixels=2_000_000, max_file_bytes=4 * 2**20)


class Peak:
    """Peak memory of a block: tracemalloc's, and the growth of peak RSS (None where /proc cannot reset it)."""

    def __enter__(self):
        self.rss_growth = None
        self._rss_base = _reset_rss_peak()
        tracemalloc.start()
        return self

    def __exit__(self, *exc):
        self.traced = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        if self._rss_base is not None:
            self.rss_growth = _status_kb("VmHWM") * 1024 - self._rss_base
        return False

    def within(self, bound: int) -> bool:
        return self.traced <= bound and (self.rss_growth is None or self.rss_growth <= bound)


def _status_kb(field: str) -> int:
    value = proc_field_mb("self", field)
    if value is None:
        raise KeyError(field)
    return round(value * 1024)


def _reset_rss_peak() -> int | None:
    """Reset the process's peak RSS to its current RSS (Linux clear_refs 5); the current RSS in bytes, or None."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_kb("VmRSS") * 1024
    except OSError:
        return None


def _outcome(data: bytes, limits: DecodeLimits = LIMITS) -> str:
    """"ok" or the ImageDecodeError code; any other exception fails the test."""
    try:
        gray = decode(data, limits)
    except ImageDecodeError as err:
        assert err.code in CODES and err.reason, err
        return err.code
    assert gray.dtype == np.uint8 and gray.ndim == 2
    return "ok"


# --- hostile kinds ------------------------------------------------------------------------


def test_every_hostile_file_is_refused_through_read_image_with_its_code(tmp_path):
    """The jobs' entry point, a path, refuses each of the 25+ content kinds and 3 file-system kinds with its code.
    The symlink to /dev/zero is scoring's `outside_archive` (its walk never follows it); read directly it is
    not a regular file."""
    expected = write_hostile_files(tmp_path)
    outcomes = {}
    for name in expected:
        try:
            read_image(tmp_path / name)
            outcomes[name] = "ok"
        except ImageDecodeError as err:
            outcomes[name] = err.code
    assert outcomes == {**expected, "dev_zero.png": "not_a_file"}
    assert len(outcomes) >= 25 + 3


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_file_is_refused_with_its_code_within_the_bound(name):
    data, code = HOSTILE[name]
    with Peak() as peak:
        assert _outcome(data) == code
    assert peak.within(64 * 2**20), (peak.traced, peak.rss_growth)  # refused from the header: no pixel buffer


@pytest.mark.parametrize("name", sorted(good_compressed_dicoms()))
def test_valid_compressed_dicoms_pass_the_frame_checks(name):
    data, shape = good_compressed_dicoms()[name]
    gray = decode(data)
    assert gray.shape == shape and gray.max() == 255 and gray.std() > 10


def test_rle_decodes_exactly_like_uncompressed():
    from pydicom.uid import ExplicitVRLittleEndian

    from tests.badfiles import gray8

    native = dicom(ExplicitVRLittleEndian, 80, 60, gray8(80, 60).astype("<u2").tobytes())
    np.testing.assert_array_equal(decode(good_compressed_dicoms()["rle16.dcm"][0]), decode(native))


def test_file_system_kinds_are_refused_before_reading(tmp_path):
    expected = write_hostile_files(tmp_path)
    codes = {}
    for name in ("over_size_cap.png", "fifo.png", "dev_zero.png"):
        with pytest.raises(ImageDecodeError) as caught:
            read_bytes(tmp_path / name)  # returns at once: the pipe is never opened, /dev/zero never read
        codes[name] = caught.value.code
    assert codes == {"over_size_cap.png": "file_too_large", "fifo.png": "not_a_file", "dev_zero.png": "not_a_file"}
    assert expected["dev_zero.png"] == "outside_archive"  # what scoring says: the walk never follows it


def test_a_file_larger_than_its_size_says_is_read_only_to_the_cap():
    status = Path("/proc/self/status")  # st_size 0, content a few KB: like a file growing while read
    assert status.stat().st_size == 0
    with pytest.raises(ImageDecodeError) as caught:
        read_bytes(status, DecodeLimits(max_file_bytes=100))
    assert caught.value.code == "file_too_large"


def test_a_file_changing_while_read_is_an_image_or_an_image_decode_error(tmp_path):
    png = good_files()["gray8.png"][0]
    outcomes = set()
    with rewriting(tmp_path / "changing.png", [png, png[: len(png) // 3], b"\x89PNG" + bytes(5000)]) as path:
        for _ in range(300):
            try:
                outcomes.add("ok" if read_image(path).shape == (70, 100) else "wrong shape")
            except ImageDecodeError as err:
                outcomes.add(err.code)
    assert outcomes <= {"ok", "changed_while_read", "truncated", "decode_failed", "not_an_image", "empty"}
    assert outcomes - {"ok"}, "the rewriting was never seen"


@pytest.mark.parametrize("depth", [16, 1])
def test_png_at_the_pixel_cap_decodes_within_the_bound_and_one_pixel_more_is_refused(depth):
    limits = DecodeLimits(max_pixels=2000 * 1000)
    mode, values = ("I;16", np.arange(2000 * 1000, dtype=np.uint16) % 4000) if depth == 16 else \
        ("1", np.arange(2000 * 1000) % 7 == 0)
    buffer = io.BytesIO()
    Image.fromarray(values.reshape(1000, 2000)).convert(mode).save(buffer, "PNG")
    with Peak() as peak:
        gray = decode(buffer.getvalue(), limits)
    assert gray.shape == (1000, 2000) and peak.within(limits.memory_bound()), (peak.traced, peak.rss_growth)
    over = bytearray(buffer.getvalue())
    over[16:24] = struct.pack(">II", 2000, 1001)
    over[29:33] = struct.pack(">I", zlib.crc32(bytes(over[12:29])))
    assert _outcome(bytes(over), limits) == "too_large"


def test_preprocess_of_an_extreme_image_costs_about_the_image():
    gray = np.full((32, 1_000_000), 200, np.uint8)  # the image: padding it asked numpy for 931 GiB
    for image in (gray, gray.T):
        with Peak() as peak:
            out = preprocess(image, 224)
        assert out.shape == (224, 224, 3) and 0 < out.max() <= 2  # 32 of 1,000,000 rows: a faint line
        assert peak.within(2 * gray.nbytes + 10 * 2**20), (peak.traced, peak.rss_growth)


# --- mutation fuzz ------------------------------------------------------------------------


def _png_with_ihdr(png: bytes, width: int, height: int, depth: int) -> bytes:
    ihdr = struct.pack(">II", width, height) + bytes([depth]) + png[25:29]
    return png[:16] + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr)) + png[33:]


def _jpeg_with_sof(jpeg: bytes, width: int, height: int, precision: int) -> bytes:
    at = jpeg.index(b"\xff\xc0")
    return jpeg[:at + 4] + struct.pack(">BHH", precision, height, width) + jpeg[at + 9:]


def _dicom_with(data: bytes, **fields) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(data), force=True)
    for keyword, value in fields.items():
        setattr(ds, keyword, value)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


INTERESTING = [0, 1, 2, 31, 32, 33, 255, 4095, 4096, 4097, 65535]


def _number(rng: np.random.Generator, bits: int) -> int:
    if rng.random() < 0.6:
        return int(rng.choice([v for v in INTERESTING if v < 2**bits] + [2**bits - 1, 2**(bits - 1)]))
    return int(rng.integers(0, 2**bits))


def _edit_header(name: str, data: bytes, rng: np.random.Generator) -> bytes:
    """The seed with its width/height/bit depth (or rows/columns/bits/frames) edited to odd values."""
    if name.endswith(".png"):
        return _png_with_ihdr(data, _number(rng, 32), _number(rng, 32), int(rng.choice([1, 2, 4, 8, 16, 0, 3, 32])))
    if name.endswith(".jpg"):
        return _jpeg_with_sof(data, _number(rng, 16), _number(rng, 16), int(rng.choice([8, 12, 16, 0, 255])))
    fields = {}
    for keyword, bits in (("Rows", 16), ("Columns", 16), ("BitsAllocated", 16), ("BitsStored", 16),
                          ("NumberOfFrames", 16)):
        if rng.random() < 0.4:
            fields[keyword] = _number(rng, bits)
    return _dicom_with(data, **(fields or {"Rows": _number(rng, 16)}))


def _mutate(name: str, data: bytes, rng: np.random.Generator) -> bytes:
    kind = int(rng.integers(4))
    if kind == 0:  # edited header fields
        return _edit_header(name, data, rng)
    buffer = bytearray(data)
    if kind in (1, 3):  # byte flips, mostly in the header
        span = len(buffer) if rng.random() < 0.5 else min(len(buffer), 400)
        for position in rng.integers(0, span, size=rng.integers(1, 9)):
            buffer[position] = rng.integers(256)
    if kind in (2, 3):  # truncation at a random offset
        buffer = buffer[: rng.integers(0, len(buffer))]
    return bytes(buffer)


def _seeds() -> dict[str, bytes]:
    good = good_files()
    seeds = {name: good[name][0] for name in ("gray8.png", "gray16.png", "palette.png", "gray.jpg", "dicom_mono2.dcm",
                                              "dicom_mono1.dcm")}
    seeds.update({name: content for name, (content, _) in good_compressed_dicoms().items()})
    seeds["wide.png"] = png_really(400, 100)
    return seeds


def test_500_mutated_files_raise_only_image_decode_error_within_the_bound():
    seeds = _seeds()
    names = sorted(seeds)
    rng = np.random.default_rng(20261202)
    bound = FUZZ_LIMITS.memory_bound()
    outcomes, worst = {}, (0, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # libraries warn about the damage they see
        for case in range(500):
            name = names[case % len(names)]
            data = _mutate(name, seeds[name], rng)
            with Peak() as peak:
                outcome = _outcome(data, FUZZ_LIMITS)
            assert peak.within(bound), (case, name, peak.traced, peak.rss_growth, bound)
            worst = (max(worst[0], peak.traced), max(worst[1], peak.rss_growth or 0))
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
    assert outcomes.get("ok") and sum(v for k, v in outcomes.items() if k != "ok") > 250, outcomes
    assert {"too_large", "too_small", "truncated", "decode_failed"} <= outcomes.keys(), outcomes
    print(f"fuzz outcomes {outcomes}; worst traced {worst[0] / 2**20:.1f} MB, worst RSS growth "
          f"{worst[1] / 2**20:.1f} MB, bound {bound / 2**20:.0f} MB")
