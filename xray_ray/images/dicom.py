"""DICOM to grayscale with every size checked before pixel data is decoded (used by `images.decode` only).

Rows x columns x frames x bits come from the header and are checked against the limits for
every transfer syntax. For compressed (encapsulated) pixel data the frame itself is checked
before it reaches a decoder: it may not be much longer than the image it claims, a JPEG /
JPEG-LS / JPEG 2000 codestream must declare the same size as the DICOM header (a decoder
allocates what its codestream says, not what DICOM says), and an RLE frame's segments may
not expand past rows x columns. The decoded array must then have exactly the header's
shape. Rescale and windowing run in float32, in place.
"""

from __future__ import annotations

import io
import struct
from itertools import pairwise

import numpy as np
import pydicom
from pydicom.encaps import get_frame
from pydicom.pixels import apply_modality_lut, apply_voi, get_decoder
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
)

from xray_ray.images.bounds import DecodeLimits, ImageDecodeError

# Transfer syntax of a DICOM without file meta information, from how pydicom parsed it
# (is_implicit_VR, is_little_endian).
_TRANSFER_SYNTAX_BY_ENCODING = {
    (True, True): ImplicitVRLittleEndian,
    (False, True): ExplicitVRLittleEndian,
    (False, False): ExplicitVRBigEndian,
}

# JPEG start-of-frame markers (lossy, lossless, arithmetic) and JPEG-LS's SOF55.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC} | {0xF7}
_J2K_SIZ = b"\xff\x4f\xff\x51"  # start of codestream + image and tile size marker

# A compressed frame may exceed its raw size a little (headers, incompressible noise), never by much.
_FRAME_SLACK = 64 * 1024


def printable(text: str, limit: int = 64) -> str:
    """`text` cut to `limit` characters, control characters replaced, for a reason string."""
    return "".join(c if c.isprintable() else "?" for c in str(text)[:limit])


def to_uint8(values: np.ndarray) -> np.ndarray:
    """Min-max scale an array to 0-255 uint8 in float32 (one working copy); a constant image becomes zeros."""
    values = values.astype(np.float32)
    low, high = float(values.min()), float(values.max())
    if not (np.isfinite(low) and np.isfinite(high)):
        raise ImageDecodeError("image contains NaN or infinite values", "decode_failed")
    if high == low:
        return np.zeros(values.shape, np.uint8)
    with np.errstate(over="ignore"):  # a float image spanning float32's whole range: clipped below
        np.subtract(values, np.float32(low), out=values)
        values *= np.float32(255.0 / (high - low))
    np.clip(np.rint(values, out=values), 0, 255, out=values)
    return values.astype(np.uint8)


def codestream_header(frame: bytes) -> tuple[int, int, int, int] | None:
    """(width, height, components, precision) declared by a JPEG, JPEG-LS or JPEG 2000 codestream; None if absent."""
    try:
        if frame[:2] == b"\xff\xd8":
            pos = 2
            while pos + 4 <= len(frame) and frame[pos] == 0xFF:
                marker = frame[pos + 1]
                if marker == 0xFF:  # fill byte
                    pos += 1
                elif marker in _JPEG_SOF:
                    precision, height, width, components = struct.unpack_from(">BHHB", frame, pos + 4)
                    return width, height, components, precision
                elif 0xD0 <= marker <= 0xD8 or marker == 0x01:  # markers without a length
                    pos += 2
                else:
                    pos += 2 + struct.unpack_from(">H", frame, pos + 2)[0]
            return None
        at = frame.find(_J2K_SIZ, 0, 4096)  # a raw codestream, or one inside a JP2 box
        if at < 0:
            return None
        x, y, x0, y0 = struct.unpack_from(">4I", frame, at + 8)
        components, depth = struct.unpack_from(">HB", frame, at + 40)
        return x - x0, y - y0, components, (depth & 0x7F) + 1
    except struct.error:
        return None


def _rle_segment_length(frame: bytes, start: int, end: int, limit: int) -> int:
    """Bytes an RLE segment decodes to, counted without decoding; stops once past `limit`."""
    total, pos = 0, start
    while pos < end and total <= limit:
        n = frame[pos]
        if n < 128:
            total, pos = total + n + 1, pos + n + 2
        elif n > 128:
            total, pos = total + 257 - n, pos + 2
        else:
            pos += 1
    return total


def _check_rle(frame: bytes, rows: int, columns: int, bytes_per_sample: int) -> None:
    count, *offsets = struct.unpack_from("<16I", frame.ljust(64, b"\0"))
    if count != bytes_per_sample:
        raise ImageDecodeError(f"RLE frame with {count} segments, {bytes_per_sample} expected", "decode_failed")
    bounds = [*offsets[:count], len(frame)]
    for start, end in pairwise(bounds):
        if not 64 <= start <= end <= len(frame):
            raise ImageDecodeError("RLE frame with segment offsets outside the frame", "decode_failed")
        if _rle_segment_length(frame, start, end, rows * columns + 1) > rows * columns + 1:
            raise ImageDecodeError(f"RLE segment decodes to more than the {columns}x{rows} image the header "
                                   "declares", "decode_failed")


def _check_frame(ds, syntax, rows: int, columns: int, bits: int) -> None:
    """Refuse an encapsulated frame that would decode to more (or other) than the header promises."""
    frame = get_frame(ds.PixelData, 0, number_of_frames=1)
    expected = rows * columns * ((bits + 7) // 8)
    if len(frame) > 2 * expected + _FRAME_SLACK:
        raise ImageDecodeError(f"compressed frame ({len(frame)} bytes) far longer than the {columns}x{rows} image "
                               "it claims", "decode_failed")
    if syntax == RLELossless:
        _check_rle(frame, rows, columns, (bits + 7) // 8)
        return
    declared = codestream_header(frame)
    if declared is None:
        raise ImageDecodeError(f"compressed frame without a readable {syntax.name} header", "decode_failed")
    width, height, components, precision = declared
    if (width, height, components) != (columns, rows, 1) or precision > bits:
        raise ImageDecodeError(f"compressed frame declares {width}x{height}x{components} at {precision} bits, "
                               f"the DICOM header {columns}x{rows}x1 at {bits}", "decode_failed")


def _header_number(ds, keyword: str, default: int | None = None) -> int:
    value = ds.get(keyword)
    if value in (None, "") and default is not None:
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ImageDecodeError(f"DICOM header without a usable {keyword}", "decode_failed") from None


def _first(value) -> float:
    """A DS value, or the first of several (alternative windows)."""
    return float(value[0] if isinstance(value, (list, pydicom.multival.MultiValue)) else value)


def _window(values: np.ndarray, ds, direction: float) -> np.ndarray:
    """The VOI window as a 0-1 fraction, in place (pydicom's formulas, but float32 and without masks)."""
    function = str(ds.get("VOILUTFunction") or "LINEAR").strip().upper()
    center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
    if function == "LINEAR":
        if width < 1:
            raise ImageDecodeError(f"DICOM window width {width:g} below 1", "decode_failed")
        center, width = center - 0.5, width - 1
    elif function not in ("LINEAR_EXACT", "SIGMOID"):
        raise ImageDecodeError(f"DICOM VOI LUT function {printable(function)} is not supported", "unsupported")
    elif width <= 0:
        raise ImageDecodeError(f"DICOM window width {width:g} not positive", "decode_failed")
    if width == 0:  # LINEAR with width 1: a step at the centre
        values = (values > center).astype(np.float32)
    elif function == "SIGMOID":
        values -= np.float32(center)
        values *= np.float32(-4 / width)
        with np.errstate(over="ignore"):
            np.exp(values, out=values)
        values += 1
        np.reciprocal(values, out=values)
    else:
        values -= np.float32(center)
        values /= np.float32(width)
        values += 0.5
        np.clip(values, 0, 1, out=values)
    # pydicom maps the fraction onto the rescaled output range, which a negative slope reverses.
    return 1 - values if direction < 0 else values


def _to_gray(stored: np.ndarray, ds) -> np.ndarray:
    """Modality LUT or rescale, then VOI LUT or window, then min-max to uint8."""
    direction = 1.0
    if ds.get("ModalityLUTSequence"):
        values = apply_modality_lut(stored, ds)  # a table lookup: uint8/uint16
    else:
        values = stored
        if "RescaleSlope" in ds and "RescaleIntercept" in ds:
            direction = float(ds.RescaleSlope)
            values = stored.astype(np.float32)
            values *= np.float32(direction)
            values += np.float32(float(ds.RescaleIntercept))
    voi = ds.get("VOILUTSequence")
    if voi and voi[0].get("LUTDescriptor") is not None and voi[0].get("LUTData") is not None:
        values = apply_voi(values, ds)
    elif ds.get("WindowCenter") not in (None, "") and ds.get("WindowWidth") not in (None, ""):
        if direction == 0:
            return np.zeros(values.shape, np.uint8)
        values = _window(values.astype(np.float32, copy=values is stored), ds, direction)
    return to_uint8(values)


def decode_dicom(data: bytes, limits: DecodeLimits) -> np.ndarray:
    """A DICOM's first frame as uint8 grayscale; ImageDecodeError (with its code) for anything refused."""
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception as exc:  # noqa: BLE001 - any parser failure is a corrupt header
        # pydicom's messages may quote element values (patient data): keep only the type.
        raise ImageDecodeError(f"corrupt DICOM header ({type(exc).__name__})", "decode_failed") from None
    if "PixelData" not in ds:
        raise ImageDecodeError("DICOM without pixel data", "unsupported")
    rows, columns = _header_number(ds, "Rows"), _header_number(ds, "Columns")
    frames, samples = _header_number(ds, "NumberOfFrames", 1), _header_number(ds, "SamplesPerPixel", 1)
    bits, stored_bits = _header_number(ds, "BitsAllocated"), _header_number(ds, "BitsStored", 0)
    if frames > 1:
        raise ImageDecodeError(f"multi-frame DICOM ({frames} frames) is not supported", "unsupported")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ImageDecodeError(f"colour DICOM ({printable(photometric)}) is not supported", "unsupported")
    limits.check(columns, rows, frames, bits)
    if not 0 <= stored_bits <= bits:
        raise ImageDecodeError(f"DICOM stores {stored_bits} bits in {bits}", "bad_depth")

    syntax = ds.file_meta.get("TransferSyntaxUID") or _TRANSFER_SYNTAX_BY_ENCODING.get(ds.original_encoding)
    if syntax is None:
        raise ImageDecodeError("DICOM without a transfer syntax", "unsupported")
    ds.file_meta.TransferSyntaxUID = syntax
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise ImageDecodeError(f"unknown DICOM transfer syntax {printable(syntax)}", "unsupported") from None
    if not decoder.is_available:
        raise ImageDecodeError(f"DICOM transfer syntax {syntax.name} is not supported (no decoder installed)",
                               "unsupported")
    if syntax.is_encapsulated:
        _check_frame(ds, syntax, rows, columns, bits)
    try:
        stored = ds.pixel_array
    except ValueError as exc:
        if "less than expected" in str(exc):
            raise ImageDecodeError("truncated image (DICOM pixel data shorter than expected)", "truncated") from None
        raise
    if stored.shape != (rows, columns):
        raise ImageDecodeError(f"DICOM decoded to {stored.shape}, the header says {rows}x{columns}", "decode_failed")
    gray = _to_gray(stored, ds)
    # MONOCHROME1 stores bright as low values; flip so that bone is white like MONOCHROME2.
    return 255 - gray if photometric == "MONOCHROME1" else gray
