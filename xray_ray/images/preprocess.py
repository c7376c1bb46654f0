"""Decoded grayscale image -> model input: the one preprocessing function for training, Serve and scoring."""

from __future__ import annotations

import numpy as np
from PIL import Image

from xray_ray.images.decode import decode


def preprocess(gray: np.ndarray, size: int) -> np.ndarray:
    """Turn a decoded grayscale image into the model input: float32 (size, size, 3), 0-255.

    The image is padded with black to a centred square (so the aspect ratio is kept),
    resized with Pillow's bilinear filter (which antialiases when shrinking) and repeated
    over three channels. Scaling to the network's range happens inside the model.
    """
    if not isinstance(gray, np.ndarray) or gray.ndim != 2 or gray.dtype != np.uint8 or gray.size == 0:
        shape, dtype = getattr(gray, "shape", None), getattr(gray, "dtype", type(gray).__name__)
        raise ValueError(f"preprocess expects a non-empty 2-D uint8 array, got {dtype} with shape {shape}")
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    height, width = gray.shape
    side = max(height, width)
    square = np.zeros((side, side), np.uint8)
    top, left = (side - height) // 2, (side - width) // 2
    square[top : top + height, left : left + width] = gray
    resized = Image.fromarray(square).resize((size, size), Image.Resampling.BILINEAR)
    return np.repeat(np.asarray(resized, dtype=np.float32)[:, :, np.newaxis], 3, axis=2)


def decode_and_preprocess(data: bytes, size: int) -> np.ndarray:
    """`preprocess(decode(data), size)`: image bytes straight to a model input."""
    return preprocess(decode(data), size)
