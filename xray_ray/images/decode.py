"""Turn image bytes (PNG, JPEG, TIFF, BMP, DICOM) into grayscale arrays and model inputs.

This is the only module that opens image bytes. Training, serving and batch scoring all
go through `decode` (or `read_image`) and `preprocess`, so they see the same pixels and
the same failures. A bad input never crashes a caller with a library-specific exception:
`decode` raises `ImageDecodeError`, whose `reason` is short enough for a report line.
"""

from __future__ import annotations

import io
import os
import stat

import numpy as np
import pydicom
from PIL import Image, ImageOps
from pydicom.pixels import apply_modality_lut, apply_voi_lut, get_decoder
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

SUPPORTED_EXTENSIONS: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".dicom"}
)
"""File name endings the jobs pick up; `decode` itself looks only at the content."""

MAX_PIXELS = 50_000_000
"""Largest width*height we decode: a guard against decompression bombs (Pillow's own
default is higher and only warns, so we check the header size ourselves before loading)."""

MIN_SIDE = 32
"""Smallest accepted width or height; anything smaller cannot be a usable radiograph."""

# Pillow plugins we let identify content (the JPEG one also opens multi-picture camera
# JPEGs). Restricting them keeps odd formats (EPS runs Ghostscript, for example) out of
# reach of uploaded bytes.
_PIL_FORMATS = ("PNG", "JPEG", "TIFF", "BMP")

# Modes with more than 8 bits per sample: Pillow's convert("L") would clip them, so they
# are min-max scaled instead.
_HIGH_DEPTH_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I", "F"})

# Transfer syntax of a DICOM without file meta information, from how pydicom parsed it
# (is_implicit_VR, is_little_endian).
_TRANSFER_SYNTAX_BY_ENCODING = {
    (True, True): ImplicitVRLittleEndian,
    (False, True): ExplicitVRLittleEndian,
    (False, False): ExplicitVRBigEndian,
}


class ImageDecodeError(ValueError):
    """Bytes that cannot become an image; `reason` says why in a few words.

    A reason may name image attributes (size, photometric interpretation, transfer
    syntax) but never patient data, so it is safe to log or return to a client.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def looks_like_dicom(head: bytes) -> bool:
    """True when `head` (the first 132 bytes or more) carries the DICOM "DICM" marker."""
    return head[128:132] == b"DICM"


def _is_dicom(data: bytes) -> bool:
    # Files written without the 128-byte preamble start straight with a group 0002 or
    # 0008 element tag (little endian); no Pillow format starts that way.
    return looks_like_dicom(data) or data[:2] in (b"\x02\x00", b"\x08\x00")


def _check_size(width: int, height: int) -> None:
    """Refuse images too large to decode safely or too small to be useful."""
    if width * height > MAX_PIXELS:
        raise ImageDecodeError(f"too many pixels ({width}x{height} = {width * height} > {MAX_PIXELS})")
    if min(width, height) < MIN_SIDE:
        raise ImageDecodeError(f"too small ({width}x{height} < {MIN_SIDE} px)")


def _printable(text: str, limit: int = 64) -> str:
    """`text` cut to `limit` characters, control characters replaced, for a reason string."""
    return "".join(c if c.isprintable() else "?" for c in str(text)[:limit])


def _to_uint8(values: np.ndarray) -> np.ndarray:
    """Min-max scale an array to 0-255 uint8; a constant image becomes zeros."""
    values = values.astype(np.float64)
    if not np.isfinite(values).all():
        raise ImageDecodeError("image contains NaN or infinite values")
    low, high = values.min(), values.max()
    if high == low:
        return np.zeros(values.shape, np.uint8)
    values -= low
    values *= 255.0 / (high - low)
    return np.rint(values, out=values).astype(np.uint8)


def _decode_pillow(data: bytes) -> np.ndarray:
    try:
        image = Image.open(io.BytesIO(data), formats=_PIL_FORMATS)
    except Image.DecompressionBombError:
        # Pillow refuses far larger sizes than ours on its own, before reading pixels.
        raise ImageDecodeError(f"too many pixels (> {MAX_PIXELS})") from None
    except Image.UnidentifiedImageError:
        raise ImageDecodeError("not an image (unrecognised format)") from None
    with image:
        _check_size(*image.size)
        image.load()  # decode everything now: truncated data raises instead of padding grey
        image = ImageOps.exif_transpose(image)
    if image.mode in _HIGH_DEPTH_MODES:
        return _to_uint8(np.asarray(image))
    # Alpha is dropped, not composited: radiographs carry no meaningful transparency.
    return np.array(image.convert("L"))


def _decode_dicom(data: bytes) -> np.ndarray:
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception as exc:
        # pydicom's messages may quote element values (patient data): keep only the type.
        raise ImageDecodeError(f"corrupt DICOM header ({type(exc).__name__})") from None
    if "PixelData" not in ds:
        raise ImageDecodeError("DICOM without pixel data")
    frames = int(ds.get("NumberOfFrames") or 1)
    if frames > 1:
        raise ImageDecodeError(f"multi-frame DICOM ({frames} frames) is not supported")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    if int(ds.get("SamplesPerPixel") or 1) > 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ImageDecodeError(f"colour DICOM ({_printable(photometric)}) is not supported")
    _check_size(int(ds.Columns), int(ds.Rows))

    syntax = ds.file_meta.get("TransferSyntaxUID") or _TRANSFER_SYNTAX_BY_ENCODING.get(ds.original_encoding)
    if syntax is None:
        raise ImageDecodeError("DICOM without a transfer syntax")
    ds.file_meta.TransferSyntaxUID = syntax
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise ImageDecodeError(f"unknown DICOM transfer syntax {_printable(syntax)}") from None
    if not decoder.is_available:
        raise ImageDecodeError(f"DICOM transfer syntax {syntax.name} is not supported (no decoder installed)")

    try:
        stored = ds.pixel_array
    except ValueError as exc:
        if "less than expected" in str(exc):
            raise ImageDecodeError("truncated image (DICOM pixel data shorter than expected)") from None
        raise
    gray = _to_uint8(apply_voi_lut(apply_modality_lut(stored, ds), ds))
    # MONOCHROME1 stores bright as low values; flip so that bone is white like MONOCHROME2.
    return 255 - gray if photometric == "MONOCHROME1" else gray


def _describe(exc: Exception) -> str:
    """A short reason for an unexpected decoder exception."""
    message = _printable(" ".join(str(exc).split()), 160)
    if isinstance(exc, EOFError) or "truncat" in message.lower():
        return "truncated image"
    if isinstance(exc, MemoryError):
        return "out of memory while decoding"
    name = type(exc).__name__
    return f"cannot decode image ({name}: {message})" if message else f"cannot decode image ({name})"


def decode(data: bytes) -> np.ndarray:
    """Decode image bytes into a 2-D uint8 grayscale array.

    The format is recognised from the content, never from a file name. DICOMs get their
    modality LUT (rescale slope/intercept) and VOI LUT or window applied, MONOCHROME1 is
    inverted; 16-bit and float images are min-max scaled; colour, palette and alpha images
    become grayscale; EXIF orientation is honoured. Only the first frame of a multi-page
    TIFF is used, while multi-frame and colour DICOMs are refused.

    Raises ImageDecodeError, and nothing else, for any input that is not a usable image.
    """
    if not data:
        raise ImageDecodeError("empty file")
    try:
        return _decode_dicom(data) if _is_dicom(data) else _decode_pillow(data)
    except ImageDecodeError:
        raise
    except Exception as exc:  # decoders raise OSError, SyntaxError, struct.error, ...
        raise ImageDecodeError(_describe(exc)) from exc


def read_bytes(path: str | os.PathLike) -> bytes:
    """A file's content; a missing, unreadable or non-regular path is an ImageDecodeError."""
    try:
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):  # also keeps us from blocking on a named pipe
            kind = "is a directory" if stat.S_ISDIR(mode) else "not a regular file"
            raise ImageDecodeError(f"unreadable file: {kind}")
        with open(path, "rb") as file:
            return file.read()
    except OSError as exc:
        raise ImageDecodeError(f"unreadable file: {exc.strerror or exc}") from None


def read_image(path: str | os.PathLike) -> np.ndarray:
    """`decode(read_bytes(path))`: a file straight to a grayscale array."""
    return decode(read_bytes(path))
