"""Decoding every supported flavour and refusing every broken one."""

from __future__ import annotations

import importlib.util

import io
import os
import pickle

import numpy as np
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from tests.badfiles import (
    BAD_CODES,
    DICOM_INTERCEPT,
    DICOM_SLOPE,
    DICOM_WINDOW_CENTER,
    DICOM_WINDOW_WIDTH,
    SECRET_PATIENT,
    bad_files,
    dicom_raw_values,
    good_files,
    write_bad_files,
    write_good_files,
)
from tests.hostile import png_claiming
from xray_ray.images.bounds import CODES
from xray_ray.images.decode import (
    LIMITS,
    ImageDecodeError,
    decode,
    describe_failure,
    looks_like_dicom,
    read_bytes,
    read_image,
)

pytestmark = pytest.mark.timeout(120)

BAD = bad_files()
GOOD = good_files()


def reason_of(data: bytes) -> str:
    with pytest.raises(ImageDecodeError) as caught:
        decode(data)
    return caught.value.reason


# --- refusals ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_file_is_refused_with_its_reason(name):
    content, expected = BAD[name]
    with pytest.raises(ImageDecodeError) as caught:
        decode(content)
    reason = caught.value.reason
    assert expected in reason and caught.value.code == BAD_CODES[name] and BAD_CODES[name] in CODES
    assert SECRET_PATIENT.split("^")[0] not in reason and "SECRET-ID" not in reason


def test_written_bad_files_give_the_same_reasons_through_read_image(tmp_path):
    expected = write_bad_files(tmp_path)
    assert expected.keys() == BAD.keys()
    for name, substring in expected.items():
        with pytest.raises(ImageDecodeError) as caught:
            read_image(tmp_path / name)
        assert substring in caught.value.reason and caught.value.code == BAD_CODES[name], name


def test_refusal_is_a_picklable_value_error():
    error = pickle.loads(pickle.dumps(ImageDecodeError("truncated image", "truncated")))
    assert isinstance(error, ValueError) and (error.reason, error.code) == ("truncated image", "truncated")
    assert str(error) == "truncated image"


def test_any_exception_for_one_file_gets_one_code_and_reason():
    refusal = ImageDecodeError("empty file", "empty")
    assert describe_failure(refusal) == describe_failure(refusal, in_decoder=True) == ("empty", "empty file")
    # a decoder library's exception means a damaged image ...
    assert describe_failure(EOFError(), in_decoder=True) == ("truncated", "truncated image")
    assert describe_failure(OSError("image file is truncated"), in_decoder=True)[0] == "truncated"
    assert describe_failure(MemoryError(), in_decoder=True)[0] == "out_of_memory"
    assert describe_failure(SyntaxError("bad\x00 chunk"), in_decoder=True) == (
        "decode_failed", "cannot decode image (SyntaxError: bad? chunk)")
    # ... anywhere else it is an internal error, still with a printable, bounded reason
    assert describe_failure(MemoryError()) == ("internal_error:MemoryError", "MemoryError")
    code, reason = describe_failure(RuntimeError("a bug\x00 " + "x" * 500))
    assert code == "internal_error:RuntimeError" and reason.startswith("RuntimeError: a bug")
    assert "\x00" not in reason and len(reason) < 200


def test_a_decoder_exception_becomes_an_image_decode_error(monkeypatch):
    from xray_ray.images import decode as module

    def failing(data, limits):
        raise SyntaxError("broken chunk")

    monkeypatch.setattr(module, "_decode_pillow", failing)
    with pytest.raises(ImageDecodeError) as caught:
        decode(b"not really a png")
    assert caught.value.code == "decode_failed"
    assert caught.value.reason == "cannot decode image (SyntaxError: broken chunk)"


# The default bounds (images.bounds) as (width, height, frames, bits) at the bound and one step past it.
AT_AND_PAST_THE_BOUNDS = {
    "side 16,384": ((16_384, 1_700, 1, 8), (16_385, 1_700, 1, 8), "too_large"),
    "50 million pixels": ((7_071, 7_071, 1, 8), (7_072, 7_071, 1, 8), "too_large"),
    "50 million pixels over frames": ((5_000, 5_000, 2, 8), (5_000, 5_001, 2, 8), "too_large"),
    "side 32": ((32, 32, 1, 8), (31, 32, 1, 8), "too_small"),
    "aspect 10:1": ((320, 32, 1, 8), (321, 32, 1, 8), "bad_aspect"),
    "32 bits": ((64, 64, 1, 32), (64, 64, 1, 33), "bad_depth"),
}


@pytest.mark.parametrize("bound", AT_AND_PAST_THE_BOUNDS)
def test_default_bounds_accept_an_image_at_the_bound_and_refuse_one_step_past(bound):
    at, past, code = AT_AND_PAST_THE_BOUNDS[bound]
    LIMITS.check(*at)
    with pytest.raises(ImageDecodeError) as caught:
        LIMITS.check(*past)
    assert caught.value.code == code
    width, height, frames, bits = past
    if frames == 1 and bits == 8:  # what decoding does with such a header: refused before any pixel buffer exists
        with pytest.raises(ImageDecodeError) as caught:
            decode(png_claiming(width, height))
        assert caught.value.code == code


def test_default_file_size_cap_is_256_mib(tmp_path):
    with open(tmp_path / "big.png", "wb") as file:
        file.truncate(256 * 2**20 + 1)  # sparse: one byte over the cap costs no disk, and is never read
    with pytest.raises(ImageDecodeError) as caught:
        read_bytes(tmp_path / "big.png")
    assert caught.value.code == "file_too_large" and f"> {256 * 2**20})" in caught.value.reason


def test_the_jobs_pick_up_every_supported_file_ending_in_any_case_and_only_those(tmp_path):
    from xray_ray.scoring.archive import walk

    samples = {".png": "gray8.png", ".jpg": "gray.jpg", ".jpeg": "gray.jpg", ".tif": "gray8.tif", ".tiff": "gray8.tif",
               ".bmp": "rgb.bmp", ".dcm": "dicom_mono2.dcm", ".dicom": "dicom_mono2.dcm"}
    expected = {}
    for ending, sample in samples.items():
        for name in (f"lower{ending}", f"upper{ending.upper()}"):
            (tmp_path / name).write_bytes(GOOD[sample][0])
            expected[name] = sample
    for other in ("scan.gif", "notes.txt", "image.png.bak"):  # an image's bytes under an ending the jobs skip
        (tmp_path / other).write_bytes(GOOD["gray8.png"][0])
    found = {os.path.basename(entry.path): entry.error for entry in walk(tmp_path)}
    assert found == dict.fromkeys(expected, "")
    for name, sample in expected.items():
        assert read_image(tmp_path / name).shape == tuple(GOOD[sample][1]), name


def test_dicom_marker_detection():
    assert looks_like_dicom(GOOD["dicom_mono2.dcm"][0][:132])
    assert not looks_like_dicom(GOOD["gray8.png"][0][:132])
    assert not looks_like_dicom(GOOD["dicom_no_preamble"][0])
    assert not looks_like_dicom(b"")


# --- valid files ------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(GOOD))
def test_good_file_decodes_to_grayscale(name):
    content, shape = GOOD[name]
    gray = decode(content)
    assert gray.dtype == np.uint8 and gray.shape == tuple(shape)
    assert gray.std() > 10, "structure survived decoding"


def test_written_good_files_read_back(tmp_path):
    for name, shape in write_good_files(tmp_path).items():
        assert read_image(tmp_path / name).shape == shape, name


@pytest.mark.parametrize("name", ["gray16.png", "gray16.tif"])
def test_16_bit_is_scaled_to_the_full_8_bit_range(name):
    gray = decode(GOOD[name][0])
    assert gray.min() == 0 and gray.max() == 255
    assert len(np.unique(gray)) > 100, "not just clipped to black and white"


def test_constant_16_bit_image_becomes_zeros():
    buffer = io.BytesIO()
    Image.fromarray(np.full((40, 50), 30000, np.uint16)).save(buffer, "PNG")
    assert not decode(buffer.getvalue()).any()


def test_exif_orientation_is_honoured():
    content = GOOD["exif_rotated.jpg"][0]
    stored = np.asarray(Image.open(io.BytesIO(content)).convert("L"))
    np.testing.assert_array_equal(decode(content), np.rot90(stored, k=-1))  # 6 = 90 deg clockwise


def test_dicom_rescale_and_window_are_applied():
    raw = dicom_raw_values().astype(np.float64)
    center, width = DICOM_WINDOW_CENTER - 0.5, DICOM_WINDOW_WIDTH - 1  # DICOM "LINEAR" window
    fraction = np.clip((raw * DICOM_SLOPE + DICOM_INTERCEPT - center) / width + 0.5, 0, 1)
    assert (fraction == 0).mean() > 0.02 and (fraction == 1).mean() > 0.02, "the window clips both ends"
    gray = decode(GOOD["dicom_mono2.dcm"][0]).astype(int)
    assert np.abs(gray - fraction * 255).max() <= 1


def test_dicom_without_window_is_min_max_scaled():
    raw = dicom_raw_values().astype(np.float64)
    expected = (raw - raw.min()) / (raw.max() - raw.min()) * 255
    assert np.abs(decode(GOOD["dicom_plain.dcm"][0]) - expected).max() <= 0.5 + 1e-9


def test_monochrome1_is_inverted():
    mono2 = decode(GOOD["dicom_mono2.dcm"][0])
    mono1 = decode(GOOD["dicom_mono1.dcm"][0])
    np.testing.assert_array_equal(mono1, 255 - mono2)
    brightest_raw = np.unravel_index(np.argmax(dicom_raw_values()), mono1.shape)
    assert mono1[brightest_raw] == 0


def test_dicom_without_preamble_matches_the_file_format():
    np.testing.assert_array_equal(decode(GOOD["dicom_no_preamble"][0]), decode(GOOD["dicom_plain.dcm"][0]))


def test_wrong_extension_does_not_matter():
    assert GOOD["jpeg_named.png"][0][:2] == b"\xff\xd8"
    np.testing.assert_array_equal(decode(GOOD["jpeg_named.png"][0]), decode(GOOD["gray.jpg"][0]))


# --- pydicom's bundled test files (only those shipped in the wheel: never downloaded) ----

PYDICOM_FILES = [
    ("CT_small.dcm", (128, 128)),
    ("MR_small.dcm", (64, 64)),
    ("MR_small_RLE.dcm", (64, 64)),
    ("MR_small_bigendian.dcm", (64, 64)),
    ("MR_small_implicit.dcm", (64, 64)),
    ("JPEG2000.dcm", (1024, 256)),
    ("emri_small.dcm", "multi-frame DICOM"),
    ("rtdose.dcm", "multi-frame DICOM (15 frames)"),
    ("SC_rgb.dcm", "colour DICOM (RGB)"),
    ("SC_rgb_small_odd.dcm", "colour DICOM (RGB)"),
    ("examples_palette.dcm", "colour DICOM (PALETTE COLOR)"),
    ("MR_truncated.dcm", "truncated image"),
    ("JPGExtended.dcm", "JPEG Extended"),
    ("MR_small_jpeg_ls_lossless.dcm", "JPEG-LS"),
]


@pytest.mark.parametrize(("name", "expected"), PYDICOM_FILES)
def test_pydicom_test_files(name, expected):
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"{name} is not shipped with this pydicom")
    if isinstance(expected, tuple):
        gray = read_image(path)
        assert gray.dtype == np.uint8 and gray.shape == expected and gray.max() == 255
    elif name == "MR_small_jpeg_ls_lossless.dcm" and importlib.util.find_spec("jpeg_ls"):
        gray = read_image(path)  # pyjpegls (a highdicom dependency) decodes JPEG-LS, within the same bounds
        assert gray.dtype == np.uint8 and gray.shape == (64, 64) and gray.max() == 255
    else:
        with pytest.raises(ImageDecodeError) as caught:
            read_image(path)
        assert expected in caught.value.reason


# --- unreadable paths -------------------------------------------------------------------


def unreadable_reason(path) -> str:
    with pytest.raises(ImageDecodeError) as caught:
        read_image(path)
    assert caught.value.reason.startswith("unreadable file: ")
    return caught.value.reason


def test_read_bytes(tmp_path):
    with pytest.raises(ImageDecodeError, match="unreadable file: is a directory"):
        read_bytes(tmp_path)
    (tmp_path / "a.png").write_bytes(b"abc")
    assert read_bytes(tmp_path / "a.png") == b"abc"


def test_read_image_on_a_directory(tmp_path):
    assert "directory" in unreadable_reason(tmp_path)


def test_read_image_on_a_missing_file(tmp_path):
    assert "No such file" in unreadable_reason(tmp_path / "missing.png")


def test_read_image_on_a_symlink_loop(tmp_path):
    os.symlink(tmp_path / "b.png", tmp_path / "a.png")
    os.symlink(tmp_path / "a.png", tmp_path / "b.png")
    assert "symbolic links" in unreadable_reason(tmp_path / "a.png")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read any file")
def test_read_image_without_permission(tmp_path):
    path = tmp_path / "locked.png"
    path.write_bytes(GOOD["gray8.png"][0])
    path.chmod(0)
    assert "Permission denied" in unreadable_reason(path)


def test_read_image_on_a_named_pipe_does_not_block(tmp_path):
    os.mkfifo(tmp_path / "pipe.png")
    assert "not a regular file" in unreadable_reason(tmp_path / "pipe.png")

