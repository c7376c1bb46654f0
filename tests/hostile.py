"""Hostile files: each kind made to break a decoder, exhaust memory or hang a reader, with the code it must get.

`hostile_bytes()` builds the content-level kinds in memory (small: a huge image is a huge
*header*); `write_hostile_files` adds the file-system kinds (a file over the size cap, a
named pipe, a symlink to /dev/zero); `rewriting` keeps a file changing while it is read.
`good_compressed_dicoms()` are the valid counterparts of the compressed DICOM kinds, so the
checks that refuse the hostile ones are seen to let real ones through.
"""

from __future__ import annotations

import contextlib
import io
import os
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from tests.badfiles import SECRET_PATIENT, encode, gray8, png_header_only
from xray_ray.images.bounds import LIMITS


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_claiming(width: int, height: int, depth: int = 8, colour: int = 0) -> bytes:
    """A PNG whose IHDR claims width x height at `depth` bits over one tiny IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(bytes(64)))
            + _png_chunk(b"IEND", b""))


def png_really(width: int, height: int) -> bytes:
    """A real, complete 8-bit PNG of zeros (zlib makes even a million-pixel row a few KB)."""
    raw = zlib.compress(bytes(width + 1) * height, 1)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", raw) + _png_chunk(b"IEND", b"")


def png_text_bomb() -> bytes:
    """A valid small PNG with a zTXt chunk that inflates to 16 MB (Pillow allows 1 MB)."""
    png = encode(Image.fromarray(gray8(64, 64)), "PNG")
    bomb = _png_chunk(b"zTXt", b"Comment\x00\x00" + zlib.compress(bytes(16 * 2**20), 1))
    return png[:33] + bomb + png[33:]


def tiff_claiming(width: int, height: int) -> bytes:
    """A little-endian TIFF whose one IFD claims width x height, 8-bit gray, over one 16-byte strip."""
    tags = [(256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 4, 8),
            (277, 3, 1), (278, 4, height), (279, 4, 16)]
    ifd_at = 8 + 16
    ifd = struct.pack("<H", len(tags)) + b"".join(struct.pack("<HHII", tag, kind, 1, value) for tag, kind, value in tags)
    return b"II*\x00" + struct.pack("<I", ifd_at) + bytes(16) + ifd + struct.pack("<I", 0)


def jpeg_claiming(width: int, height: int) -> bytes:
    """A real small JPEG with its start-of-frame size edited."""
    data = bytearray(encode(Image.fromarray(gray8(64, 64)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def bmp_claiming(width: int, height: int) -> bytes:
    """A BMP whose info header claims width x height (negative: top-down) at 8 bits."""
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 0, 0, 2835, 2835, 256, 0)
    palette = b"".join(bytes((i, i, i, 0)) for i in range(256))
    offset = 14 + len(info) + len(palette)
    return b"BM" + struct.pack("<IHHI", offset + 64, 0, 0, offset) + info + palette + bytes(64)


def dicom(syntax, rows: int, columns: int, pixel_data: bytes | list[bytes], bits: int = 16, **elements) -> bytes:
    """A monochrome DICOM with raw `pixel_data` (a list of frames: encapsulated) whatever the header says."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[str(syntax), str(rows), str(columns), str(sorted(elements))])
    ds.PatientName = SECRET_PATIENT
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 1, "MONOCHROME2", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, min(bits, 16) if bits > 1 else 1, min(bits, 16) - 1
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    if isinstance(pixel_data, list):
        ds.PixelData = encapsulate(pixel_data)
        ds["PixelData"].VR = "OB"
    else:
        ds.PixelData = pixel_data
        ds["PixelData"].VR = "OW" if bits > 8 else "OB"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def rle_frame(segments: list[bytes]) -> bytes:
    """An RLE frame: the 64-byte header of segment offsets, then the segments."""
    offsets, at = [], 64
    for segment in segments:
        offsets.append(at)
        at += len(segment)
    return struct.pack("<16I", len(segments), *offsets, *[0] * (15 - len(segments))) + b"".join(segments)


def _rle_bytes(values: bytes) -> bytes:
    """RLE-encode a segment as literal runs (valid, if not small)."""
    return b"".join(bytes([len(chunk) - 1]) + chunk for chunk in (values[i:i + 128] for i in range(0, len(values), 128)))


def _mono8(height: int, width: int) -> Image.Image:
    return Image.fromarray(gray8(height, width))


OVER = 20_000  # rows and columns of the over-the-cap DICOMs: 400 million pixels


def hostile_bytes() -> dict[str, tuple[bytes, str]]:
    """{filename: (content, the ImageDecodeError code decoding it must give)}."""
    side_at_cap = int(LIMITS.max_pixels ** 0.5) + 1  # just over the pixel cap
    flat = Image.new("L", (4000, 4000))  # compresses to a few KB: within the frame length allowed for 1000x1000
    big_jpeg, big_j2k = encode(flat, "JPEG"), encode(flat, "JPEG2000", no_jp2=True)
    small_jpeg, small_j2k = encode(_mono8(64, 64), "JPEG", quality=90), encode(_mono8(64, 64), "JPEG2000", no_jp2=True)
    return {
        "wide_1000000x32.png": (png_really(1_000_000, 32), "too_large"),
        "tall_32x1000000.png": (png_really(32, 1_000_000), "too_large"),
        "wide_16000x40.png": (png_really(16_000, 40), "bad_aspect"),
        "tall_40x16000.png": (png_really(40, 16_000), "bad_aspect"),
        "gray16_over_cap.png": (png_claiming(side_at_cap, side_at_cap, depth=16), "too_large"),
        "bilevel_over_cap.png": (png_claiming(side_at_cap, side_at_cap, depth=1), "too_large"),
        "png_claims_65535.png": (png_header_only(65_535, 65_535), "too_large"),
        "png_claims_2pow31.png": (png_claiming(2**31 - 1, 2**31 - 1), "too_large"),
        "png_zero_size.png": (png_claiming(0, 0), "not_an_image"),
        "png_one_row.png": (png_really(640, 1), "too_small"),
        "png_text_bomb.png": (png_text_bomb(), "decode_failed"),
        "tiff_claims_100000.tif": (tiff_claiming(100_000, 100_000), "too_large"),
        "jpeg_claims_60000.jpg": (jpeg_claiming(60_000, 60_000), "too_large"),
        "bmp_claims_100000.bmp": (bmp_claiming(100_000, 100_000), "too_large"),
        "bmp_top_down_100000.bmp": (bmp_claiming(100_000, -100_000), "too_large"),
        "eps_named.png": (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 100 100\nshowpage\n", "not_an_image"),
        "float_nan.tif": (encode(Image.fromarray(np.full((64, 64), np.nan, np.float32)), "TIFF"), "decode_failed"),
        "empty.png": (b"", "empty"),
        "dicom_native_over_cap.dcm": (dicom(ExplicitVRLittleEndian, OVER, OVER, bytes(128)), "too_large"),
        "dicom_rle_over_cap.dcm": (dicom(RLELossless, OVER, OVER, [rle_frame([b"\x81\x00"] * 2)]), "too_large"),
        "dicom_jpeg_over_cap.dcm": (dicom(JPEGBaseline8Bit, OVER, OVER, [small_jpeg], bits=8), "too_large"),
        "dicom_jpegls_over_cap.dcm": (dicom(JPEGLSLossless, OVER, OVER, [b"\xff\xd8\xff\xf7" + bytes(60)]),
                                      "too_large"),
        "dicom_j2k_over_cap.dcm": (dicom(JPEG2000Lossless, OVER, OVER, [small_j2k]), "too_large"),
        "dicom_64bit.dcm": (dicom(ExplicitVRLittleEndian, 64, 64, bytes(64 * 64 * 8), bits=64), "bad_depth"),
        "dicom_frames_4000x4000x10.dcm": (dicom(ExplicitVRLittleEndian, 4000, 4000, bytes(128), NumberOfFrames=10),
                                          "unsupported"),
        # Compressed frames that would decode to more than the header promises:
        "dicom_rle_expands_past_header.dcm": (dicom(RLELossless, 64, 64, [rle_frame([b"\x81\x00" * 4096] * 2)]),
                                              "decode_failed"),
        "dicom_jpeg_frame_4000px_header_1000px.dcm": (dicom(JPEGBaseline8Bit, 1000, 1000, [big_jpeg], bits=8),
                                                      "decode_failed"),
        "dicom_j2k_frame_4000px_header_1000px.dcm": (dicom(JPEG2000Lossless, 1000, 1000, [big_j2k], bits=8),
                                                     "decode_failed"),
        "dicom_jpeg_frame_padded_1MB.dcm": (dicom(JPEGBaseline8Bit, 64, 64, [small_jpeg + bytes(2**20)], bits=8),
                                            "decode_failed"),
        "dicom_jpeg_frame_without_header.dcm": (dicom(JPEGBaseline8Bit, 64, 64, [bytes(4096)], bits=8),
                                                "decode_failed"),
        "dicom_pixel_length_lies.dcm": (dicom(ExplicitVRLittleEndian, 512, 512, bytes(1024)), "truncated"),
    }


def good_compressed_dicoms() -> dict[str, tuple[bytes, tuple[int, int]]]:
    """Valid RLE, JPEG and JPEG 2000 DICOMs: {filename: (content, decoded shape)}."""
    gray = gray8(80, 60)
    planes = gray.astype(">u2").tobytes()
    return {
        "rle16.dcm": (dicom(RLELossless, 80, 60, [rle_frame([_rle_bytes(planes[0::2]), _rle_bytes(planes[1::2]) ])]),
                      (80, 60)),
        "jpeg8.dcm": (dicom(JPEGBaseline8Bit, 80, 60, [encode(Image.fromarray(gray), "JPEG")], bits=8), (80, 60)),
        "j2k8.dcm": (dicom(JPEG2000Lossless, 80, 60, [encode(Image.fromarray(gray), "JPEG2000", no_jp2=True)], bits=8),
                     (80, 60)),
    }


def write_hostile_files(folder: Path) -> dict[str, str]:
    """Write every hostile kind into `folder`; returns {filename: code scoring it must give}.

    Besides `hostile_bytes()`: a sparse file one byte over the size cap, a named pipe
    called `.png`, and a symlink to /dev/zero (outside any archive: `outside_archive`).
    """
    folder.mkdir(parents=True, exist_ok=True)
    expected = {}
    for name, (content, code) in hostile_bytes().items():
        (folder / name).write_bytes(content)
        expected[name] = code
    with open(folder / "over_size_cap.png", "wb") as file:
        file.truncate(LIMITS.max_file_bytes + 1)  # sparse: costs no disk
    expected["over_size_cap.png"] = "file_too_large"
    os.mkfifo(folder / "fifo.png")
    expected["fifo.png"] = "not_a_file"
    (folder / "dev_zero.png").symlink_to("/dev/zero")
    expected["dev_zero.png"] = "outside_archive"
    return expected


@contextlib.contextmanager
def rewriting(path: Path, versions: list[bytes]):
    """Keep rewriting `path` in place with each of `versions` in turn until the block ends."""
    stop = threading.Event()

    def rewrite():
        while not stop.is_set():
            for content in versions:
                with open(path, "r+b" if path.exists() else "wb") as file:
                    file.write(content)
                    file.truncate(len(content))

    path.write_bytes(versions[0])
    thread = threading.Thread(target=rewrite, daemon=True)
    thread.start()
    try:
        yield path
    finally:
        stop.set()
        thread.join(timeout=10)
