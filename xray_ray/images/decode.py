"""Turn image files and bytes (PNG, JPEG, TIFF, BMP, DICOM) into grayscale arrays, within hard bounds.

This is the only module that opens image bytes. Training, serving and batch scoring all
go through `read_bytes` / `decode` (or `read_image`) and `preprocess`, so they see the same
pixels and the same failures. Every size is checked before any pixel buffer exists
(`images.bounds`): the file size before it is read, width, height, aspect, frames and bit
depth from the header before the pixels are decoded. A bad input never escapes as a
library-specific exception: the public functions raise `ImageDecodeError`, and nothing
else, with a machine `code` and a `reason` short enough for a report line.
"""

from __future__ import annotations

import io
import os
import stat
import warnings

import numpy as np
from PIL import ExifTags, Image

from xray_ray.images.bounds import LIMITS, DecodeLimits, ImageDecodeError
from xray_ray.images.dicom import decode_dicom, printable, to_uint8

__all__ = ["LIMITS", "SUPPORTED_EXTENSIONS", "DecodeLimits", "ImageDecodeError", "decode", "describe_failure",
           "is_dicom", "looks_like_dicom", "read_bytes", "read_image"]

SUPPORTED_EXTENSIONS: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".dicom"}
)
"""File name endings the jobs pick up; `decode` itself looks only at the content."""

# Pillow's own bomb check follows our cap; its warning (above the cap) is made an error in `decode`.
Image.MAX_IMAGE_PIXELS = LIMITS.max_pixels

READ_CHUNK = 1 << 20
"""Bytes read from a file at a time (see `_read_up_to`)."""

# Pillow plugins we let identify content (the JPEG one also opens multi-picture camera
# JPEGs). Restricting them keeps odd formats (EPS runs Ghostscript, for example) out of
# reach of uploaded bytes.
_PIL_FORMATS = ("PNG", "JPEG", "TIFF", "BMP")

# Bits per sample of the Pillow modes these plugins produce; other modes are refused.
_PIL_BITS = {"1": 1, "L": 8, "P": 8, "LA": 8, "PA": 8, "RGB": 8, "RGBA": 8, "RGBX": 8, "CMYK": 8, "YCbCr": 8,
             "I;16": 16, "I;16B": 16, "I;16L": 16, "I;16N": 16, "I": 32, "F": 32}

# Modes with more than 8 bits per sample: Pillow's convert("L") would clip them, so they
# are min-max scaled instead.
_HIGH_DEPTH_MODES = frozenset(mode for mode, bits in _PIL_BITS.items() if bits > 8)

# EXIF orientation -> the transpose that displays the image upright (as ImageOps.exif_transpose).
_ORIENTATION = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
                6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}


def looks_like_dicom(head: bytes) -> bool:
    """True when `head` (the first 132 bytes or more) carries the DICOM "DICM" marker."""
    return head[128:132] == b"DICM"


def is_dicom(data: bytes) -> bool:
    """True for DICOM content: the "DICM" marker, or (files written without the 128-byte preamble) a group 0002
    or 0008 element tag first, little endian; no Pillow format starts that way."""
    return looks_like_dicom(data) or data[:2] in (b"\x02\x00", b"\x08\x00")


def _decode_pillow(data: bytes, limits: DecodeLimits) -> np.ndarray:
    try:
        image = Image.open(io.BytesIO(data), formats=_PIL_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageDecodeError(f"too many pixels (> {Image.MAX_IMAGE_PIXELS})", "too_large") from None
    except Image.UnidentifiedImageError:
        raise ImageDecodeError("not an image (unrecognised format)", "not_an_image") from None
    with image:
        if image.mode not in _PIL_BITS:
            raise ImageDecodeError(f"unsupported image mode {printable(image.mode)}", "unsupported")
        limits.check(*image.size, bits=_PIL_BITS[image.mode])
        image.load()  # decode everything now: truncated data raises instead of padding grey
        orientation = image.getexif().get(ExifTags.Base.Orientation)
        if image.mode in _HIGH_DEPTH_MODES:
            gray = to_uint8(np.asarray(image))
        else:  # alpha is dropped, not composited: radiographs carry no meaningful transparency
            gray = np.asarray(image.convert("L"))
    if orientation in _ORIENTATION:
        gray = np.asarray(Image.fromarray(gray).transpose(_ORIENTATION[orientation]))
    return gray


def describe_failure(exc: BaseException, *, in_decoder: bool = False) -> tuple[str, str]:
    """(code, reason) of any exception met while reading, decoding or preprocessing one file.

    The one table from an exception to a code and a reason: `decode` turns its libraries'
    exceptions into an `ImageDecodeError` with it, scoring into an error row and Serve into
    a 422, so one bad file gets the same code everywhere:

    * `ImageDecodeError`: its own code and reason (one of `bounds.CODES`);
    * raised by a decoder library inside `decode` (`in_decoder`): the bytes are a damaged
      image, `truncated`, `out_of_memory` or `decode_failed` with the library's message;
    * anything else is not a known fault of the file (a bug, the machine):
      `internal_error:<type>` with "<type>: message", still this one file's problem.

    Messages are made printable and cut to 160 characters: they end up in report lines.
    """
    if isinstance(exc, ImageDecodeError):
        return exc.code, exc.reason
    name = type(exc).__name__
    message = printable(" ".join(str(exc).split()), 160)
    if not in_decoder:
        return f"internal_error:{name}", f"{name}: {message}" if message else name
    if isinstance(exc, EOFError) or "truncat" in message.lower():
        return "truncated", "truncated image"
    if isinstance(exc, MemoryError):
        return "out_of_memory", "out of memory while decoding"
    return "decode_failed", f"cannot decode image ({name}: {message})" if message else f"cannot decode image ({name})"


def decode(data: bytes, limits: DecodeLimits = LIMITS) -> np.ndarray:
    """Decode image bytes into a 2-D uint8 grayscale array, refusing anything outside `limits`.

    The format is recognised from the content, never from a file name. DICOMs get their
    modality LUT (rescale slope/intercept) and VOI LUT or window applied, MONOCHROME1 is
    inverted; 16-bit and float images are min-max scaled; colour, palette and alpha images
    become grayscale; EXIF orientation is honoured. Only the first frame of a multi-page
    TIFF is used, while multi-frame and colour DICOMs are refused.

    Raises ImageDecodeError, and nothing else, for any input that is not a usable image.
    """
    if not data:
        raise ImageDecodeError("empty file", "empty")
    if len(data) > limits.max_file_bytes:
        raise ImageDecodeError(f"file too large ({len(data)} bytes > {limits.max_file_bytes})", "file_too_large")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return decode_dicom(data, limits) if is_dicom(data) else _decode_pillow(data, limits)
    except ImageDecodeError:
        raise
    except Image.DecompressionBombWarning:  # a compressed DICOM frame's codestream above Pillow's cap
        raise ImageDecodeError(f"too many pixels (> {Image.MAX_IMAGE_PIXELS})", "too_large") from None
    except Exception as exc:  # decoders raise OSError, SyntaxError, struct.error, ...
        code, reason = describe_failure(exc, in_decoder=True)
        raise ImageDecodeError(reason, code) from exc


def _file_kind(mode: int) -> str:
    return "is a directory" if stat.S_ISDIR(mode) else "not a regular file"


def read_bytes(path: str | os.PathLike, limits: DecodeLimits = LIMITS) -> bytes:
    """A regular file's content, at most `limits.max_file_bytes`; ImageDecodeError for anything else.

    A symlink's target is what counts. Named pipes, devices and sockets are refused before
    they are opened (opening a pipe blocks, a device may act), and the opened file is checked
    again, so a swap between the two checks cannot slip one through. At most the cap + 1
    bytes are read, and a file that changed while it was read is refused.
    """
    try:
        before = os.stat(path)
        if not stat.S_ISREG(before.st_mode):
            raise ImageDecodeError(f"unreadable file: {_file_kind(before.st_mode)}", "not_a_file")
        if before.st_size > limits.max_file_bytes:
            raise ImageDecodeError(f"file too large ({before.st_size} bytes > {limits.max_file_bytes})",
                                   "file_too_large")
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0))
        with os.fdopen(fd, "rb") as file:
            opened = os.fstat(fd)
            if not stat.S_ISREG(opened.st_mode) or (opened.st_dev, opened.st_ino) != (before.st_dev, before.st_ino):
                raise ImageDecodeError("file changed while it was read (replaced)", "changed_while_read")
            data = _read_up_to(file, limits.max_file_bytes + 1)
            after = os.fstat(fd)
    except OSError as exc:
        raise ImageDecodeError(f"unreadable file: {exc.strerror or exc}", "unreadable") from None
    if len(data) > limits.max_file_bytes:
        raise ImageDecodeError(f"file too large (more than {limits.max_file_bytes} bytes)", "file_too_large")
    if (len(data), opened.st_mtime_ns) != (after.st_size, after.st_mtime_ns) or opened.st_size != after.st_size:
        raise ImageDecodeError("file changed while it was read", "changed_while_read")
    return data


def _read_up_to(file, limit: int) -> bytes:
    """At most `limit` bytes of `file`, read a chunk at a time: a buffer the size of the cap is never asked
    for up front (the cap is 256 MB; most files are a few hundred KB), and a file larger than its size says
    (one growing, or in /proc) still stops at the cap."""
    chunks, total = [], 0
    while total < limit and (chunk := file.read(min(READ_CHUNK, limit - total))):
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


def read_image(path: str | os.PathLike, limits: DecodeLimits = LIMITS) -> np.ndarray:
    """`decode(read_bytes(path))`: a file straight to a grayscale array."""
    return decode(read_bytes(path, limits), limits)
