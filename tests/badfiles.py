"""A small corpus of broken and valid image files, for tests and demos.

`bad_files()` and `good_files()` build the content in memory (deterministic, a few KB
each, fast); `write_bad_files` / `write_good_files` put it in a folder, e.g. to exercise
the scoring job on real paths.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import get_decoder
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLSLossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

SECRET_PATIENT = "SECRET^PATIENT"
"""PatientName written into every generated DICOM; it must never appear in a reason."""

# Raw values, rescale and window of dicom_mono2.dcm / dicom_mono1.dcm.
DICOM_SLOPE, DICOM_INTERCEPT = 2.0, -1000.0
DICOM_WINDOW_CENTER, DICOM_WINDOW_WIDTH = 1000.0, 2000.0


def phantom(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A float image in [0, 1]: a horizontal gradient, a bright disc, a dark bar, noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    image = 0.2 + 0.6 * x / max(width - 1, 1)
    image[(y - height * 0.4) ** 2 + (x - width * 0.6) ** 2 < (min(height, width) * 0.2) ** 2] = 1.0
    image[int(height * 0.7) : int(height * 0.8), int(width * 0.1) : int(width * 0.5)] = 0.0
    return np.clip(image + rng.normal(0, 0.02, image.shape), 0, 1)


def gray8(height: int, width: int, seed: int = 0) -> np.ndarray:
    return (phantom(height, width, seed) * 255).round().astype(np.uint8)


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def dicom_raw_values(height: int = 80, width: int = 60) -> np.ndarray:
    """Stored uint16 values 0-4000: the full phantom range, so the window clips both ends."""
    return (phantom(height, width, seed=1) * 4000).round().astype(np.uint16)


def dicom_bytes(
    pixels: np.ndarray,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    preamble: bool = True,
    **elements,
) -> bytes:
    """A DICOM file holding `pixels`, plus any extra `elements` (keyword=value)."""
    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[photometric, str(pixels.shape), str(sorted(elements))])
    ds.Modality = "CR"
    ds.PatientName = SECRET_PATIENT
    ds.PatientID = "SECRET-ID-123"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian if preamble else ImplicitVRLittleEndian
    ds.set_pixel_data(pixels, photometric, bits_stored or pixels.itemsize * 8, generate_instance_uid=False)
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    buffer = io.BytesIO()
    if preamble:
        ds.save_as(buffer, enforce_file_format=True)
    else:  # a bare dataset: no preamble, no "DICM", no file meta, implicit VR
        del ds.file_meta
        ds.save_as(buffer, implicit_vr=True, little_endian=True)
    return buffer.getvalue()


def _jpegls_dicom() -> bytes:
    """A DICOM claiming JPEG-LS compression; the fragment content is irrelevant."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid(entropy_srcs=["jpegls"])
    ds.PatientName = SECRET_PATIENT
    ds.Rows, ds.Columns = 64, 64
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xf7" + bytes(60) + b"\xff\xd9"])
    ds["PixelData"].VR = "OB"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height over a tiny IDAT: a bomb in a few bytes."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    first_row = zlib.compress(bytes(width + 1))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", first_row) + chunk(b"IEND", b"")


JPEG_LS_DECODER = get_decoder(JPEGLSLossless).is_available
"""pyjpegls (a highdicom dependency) decodes JPEG-LS: the broken JPEG-LS file is then refused by the frame's
header check, before its codestream is decoded, instead of for want of a decoder."""

BAD_CODES = {
    "empty.png": "empty", "truncated.png": "truncated", "truncated.jpg": "truncated", "truncated.dcm": "truncated",
    "text.png": "not_an_image", "random.jpg": "not_an_image", "bomb.png": "too_large", "bomb_8000.png": "too_large",
    "tiny.png": "too_small", "multiframe.dcm": "unsupported", "rgb.dcm": "unsupported", "no_pixels.dcm": "unsupported",
    "jpegls.dcm": "decode_failed" if JPEG_LS_DECODER else "unsupported",
}
"""The ImageDecodeError code of each of `bad_files()`."""


def bad_files() -> dict[str, tuple[bytes, str]]:
    """{filename: (content, expected substring of the ImageDecodeError reason)}; `BAD_CODES` has their codes."""
    png = encode(Image.fromarray(gray8(70, 100)), "PNG")
    jpeg = encode(Image.fromarray(gray8(70, 100)), "JPEG", quality=90)
    mono = dicom_bytes(dicom_raw_values())
    files = {
        "empty.png": (b"", "empty file"),
        "truncated.png": (png[: len(png) // 2], "truncated image"),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "truncated image"),
        "truncated.dcm": (mono[: len(mono) - 1000], "truncated image"),
        "text.png": (b"This is a text file, not a picture.\n" * 20, "not an image"),
        "random.jpg": (np.random.default_rng(7).bytes(4096), "not an image"),
        "bomb.png": (png_header_only(20_000, 20_000), "too many pixels"),
        "bomb_8000.png": (png_header_only(8_000, 8_000), "too many pixels"),
        "tiny.png": (encode(Image.fromarray(gray8(16, 16)), "PNG"), "too small"),
        "multiframe.dcm": (dicom_bytes(np.stack([dicom_raw_values()] * 3)), "multi-frame DICOM (3 frames)"),
        "rgb.dcm": (dicom_bytes(np.stack([gray8(64, 64)] * 3, axis=-1), "RGB"), "colour DICOM (RGB)"),
        "no_pixels.dcm": (mono.split(b"\xe0\x7f\x10\x00")[0], "DICOM without pixel data"),
    }
    files["jpegls.dcm"] = (_jpegls_dicom(), "compressed frame declares 0x0" if JPEG_LS_DECODER else "JPEG-LS")
    return files


def good_files() -> dict[str, tuple[bytes, tuple[int, int]]]:
    """{filename: (content, expected decoded (height, width))}."""
    h, w = 70, 100
    gray = gray8(h, w)
    rgb = np.stack([gray8(h, w, seed) for seed in (1, 2, 3)], axis=-1)
    gray16 = (1000 + phantom(h, w) * 39000).astype(np.uint16)  # not spanning 0-65535
    rgba = Image.fromarray(np.dstack([rgb, gray[::-1]]))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    raw = dicom_raw_values()
    window = {
        "RescaleSlope": DICOM_SLOPE,
        "RescaleIntercept": DICOM_INTERCEPT,
        "WindowCenter": DICOM_WINDOW_CENTER,
        "WindowWidth": DICOM_WINDOW_WIDTH,
    }
    return {
        "gray8.png": (encode(Image.fromarray(gray), "PNG"), (h, w)),
        "gray16.png": (encode(Image.fromarray(gray16), "PNG"), (h, w)),
        "rgb.png": (encode(Image.fromarray(rgb), "PNG"), (h, w)),
        "rgba.png": (encode(rgba, "PNG"), (h, w)),
        "la.png": (encode(rgba.convert("LA"), "PNG"), (h, w)),
        "palette.png": (encode(Image.fromarray(rgb).convert("P"), "PNG"), (h, w)),
        "gray.jpg": (encode(Image.fromarray(gray), "JPEG"), (h, w)),
        "rgb.jpg": (encode(Image.fromarray(rgb), "JPEG"), (h, w)),
        "cmyk.jpg": (encode(Image.fromarray(rgb).convert("CMYK"), "JPEG"), (h, w)),
        "gray8.tif": (encode(Image.fromarray(gray), "TIFF"), (h, w)),
        "gray16.tif": (encode(Image.fromarray(gray16), "TIFF", compression="tiff_deflate"), (h, w)),
        "gray16_bigendian.tif": (encode(Image.fromarray(gray16.astype(">u2")), "TIFF"), (h, w)),
        "float32.tif": (encode(Image.fromarray(phantom(h, w).astype(np.float32) - 0.5), "TIFF"), (h, w)),
        "rgb.bmp": (encode(Image.fromarray(rgb), "BMP"), (h, w)),
        "exif_rotated.jpg": (encode(Image.fromarray(gray), "JPEG", exif=exif.tobytes()), (w, h)),
        "jpeg_named.png": (encode(Image.fromarray(gray), "JPEG"), (h, w)),
        "dicom_mono2.dcm": (dicom_bytes(raw, "MONOCHROME2", 12, **window), raw.shape),
        "dicom_mono1.dcm": (dicom_bytes(raw, "MONOCHROME1", 12, **window), raw.shape),
        "dicom_plain.dcm": (dicom_bytes(raw, bits_stored=12), raw.shape),
        "dicom_no_preamble": (dicom_bytes(raw, bits_stored=12, preamble=False), raw.shape),
    }


def write_bad_files(folder: Path) -> dict[str, str]:
    """Write one broken file per failure kind; return {filename: expected reason substring}."""
    folder.mkdir(parents=True, exist_ok=True)
    expected = {}
    for name, (content, reason) in bad_files().items():
        (folder / name).write_bytes(content)
        expected[name] = reason
    return expected


def write_good_files(folder: Path) -> dict[str, tuple[int, int]]:
    """Write one valid file per supported flavour; return {filename: (height, width)}."""
    folder.mkdir(parents=True, exist_ok=True)
    expected = {}
    for name, (content, shape) in good_files().items():
        (folder / name).write_bytes(content)
        expected[name] = tuple(shape)
    return expected
