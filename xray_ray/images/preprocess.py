"""Decoded grayscale image -> model input: the one preprocessing function for training, Serve and scoring."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from xray_ray.images.decode import LIMITS, DecodeLimits, decode

_BILINEAR_SUPPORT = 1.0  # Pillow's bilinear filter reaches one source pixel each way (times the shrink factor)


@dataclass(frozen=True)
class _Band:
    """Where an image `length` long, centred in `side` black, lands when `side` is resized to `size`.

    Output pixels outside [first, last) see only black; their filter windows lie inside
    the source band [start, stop), which is all that needs building. `box` keeps the full
    canvas's sampling positions (and its clipping at the canvas edges) inside the band.
    """

    offset: int  # where the image starts in the band
    first: int
    last: int
    start: int
    stop: int
    scale: float

    @classmethod
    def of(cls, length: int, side: int, size: int) -> _Band:
        top = (side - length) // 2
        scale = side / size  # source pixels per output pixel
        reach = _BILINEAR_SUPPORT * max(scale, 1.0)
        first = max(0, math.floor((top - reach) / scale) - 1)
        last = min(size, math.ceil((top + length + reach) / scale) + 1)
        start = max(0, math.floor(first * scale - reach) - 2)
        stop = min(side, math.ceil(last * scale + reach) + 2)
        return cls(top - start, first, last, start, stop, scale)

    def box(self) -> tuple[float, float]:
        return self.first * self.scale - self.start, self.last * self.scale - self.start


def _wide(gray: np.ndarray, size: int) -> np.ndarray:
    """A wide (or square) image: the horizontal pass on the image, the vertical one on the band of black rows around it."""
    height, width = gray.shape
    rows = Image.fromarray(gray).resize((size, height), Image.Resampling.BILINEAR)
    band = _Band.of(height, width, size)
    canvas = Image.new("L", (size, band.stop - band.start))
    canvas.paste(rows, (0, band.offset))
    top, bottom = band.box()
    out = np.zeros((size, size), np.uint8)
    out[band.first:band.last] = np.asarray(canvas.resize((size, band.last - band.first), Image.Resampling.BILINEAR,
                                                         box=(0, top, size, bottom)))
    return out


def _tall(gray: np.ndarray, size: int) -> np.ndarray:
    """A tall image: the horizontal pass on the band of black columns around it, then the vertical one (Pillow's order)."""
    height, width = gray.shape
    band = _Band.of(width, height, size)
    canvas = Image.new("L", (band.stop - band.start, height))
    canvas.paste(Image.fromarray(gray), (band.offset, 0))
    left, right = band.box()
    columns = canvas.resize((band.last - band.first, height), Image.Resampling.BILINEAR, box=(left, 0, right, height))
    out = np.zeros((size, size), np.uint8)
    out[:, band.first:band.last] = np.asarray(columns.resize((band.last - band.first, size), Image.Resampling.BILINEAR))
    return out


def preprocess(gray: np.ndarray, size: int) -> np.ndarray:
    """Turn a decoded grayscale image into the model input: float32 (size, size, 3), 0-255.

    The image is padded with black to a centred square (so the aspect ratio is kept),
    resized with Pillow's bilinear filter (which antialiases when shrinking) and repeated
    over three channels. Scaling to the network's range happens inside the model.

    The square is never built: only the band of it that the filter sees around the image,
    so memory stays a small multiple of the input plus the output whatever the aspect ratio
    (a 1,000,000 x 32 image costs a few megabytes, not a terabyte). The result is the padded
    square's, exactly for a square image and otherwise up to the rounding of sampling
    positions (1 grey level, on under 1 % of the pixels); a tall image thinner than the
    filter's reach (over about 40:1) is resized as its transpose, also within 1 grey level.
    """
    if not isinstance(gray, np.ndarray) or gray.ndim != 2 or gray.dtype != np.uint8 or gray.size == 0:
        shape, dtype = getattr(gray, "shape", None), getattr(gray, "dtype", type(gray).__name__)
        raise ValueError(f"preprocess expects a non-empty 2-D uint8 array, got {dtype} with shape {shape}")
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    height, width = gray.shape
    if height <= width:
        square = _wide(gray, size)
    else:
        band = _Band.of(width, height, size)
        thin = (band.stop - band.start) > 4 * width + size  # the exact band would dwarf the image itself
        square = _wide(np.ascontiguousarray(gray.T), size).T if thin else _tall(gray, size)
    return np.repeat(square.astype(np.float32)[:, :, np.newaxis], 3, axis=2)


def decode_and_preprocess(data: bytes, size: int, limits: DecodeLimits = LIMITS) -> np.ndarray:
    """`preprocess(decode(data), size)`: image bytes straight to a model input."""
    return preprocess(decode(data, limits), size)
