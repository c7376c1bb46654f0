"""Heat maps drawn over the X-ray, for people: the thumbnail, the coloured overlay, PNG bytes.

`heat_map_png` is what the scoring report and Serve's /explain both show: a Grad-CAM
map drawn over the thumbnail, as a PNG.

The base image is the decoded X-ray padded to a square and resized exactly as the model's
input was (`preprocess`), only to a display size, so a heat map over the model input lies
on the same anatomy at any size. Colour fades in with the heat, so where the model found
little evidence the X-ray stays readable.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from xray_ray.images.preprocess import preprocess

MAX_DISPLAY = 256
"""Largest side of a thumbnail or overlay, in pixels."""

_STOPS = np.array([0.0, 0.35, 0.65, 1.0])  # heat at which each colour is reached
_COLOURS = np.array([[0, 0, 160], [0, 200, 255], [255, 220, 0], [230, 0, 0]], np.float32)  # blue, cyan, yellow, red
_OPACITY = 0.6  # the overlay's opacity where the heat is 1


def display_square(gray: np.ndarray, side: int = MAX_DISPLAY) -> np.ndarray:
    """The decoded image as the model saw it (padded square), `min(side, MAX_DISPLAY, its own side)` px, uint8."""
    side = max(1, min(side, MAX_DISPLAY, max(gray.shape)))
    return preprocess(gray, side)[:, :, 0].astype(np.uint8)


_PALETTE = np.stack([np.interp(np.linspace(0, 1, 256), _STOPS, _COLOURS[:, c]) for c in range(3)], axis=-1)


def colour(heat: np.ndarray) -> np.ndarray:
    """Heat in [0, 1] (H, W) -> RGB (H, W, 3) float32: blue (none) through cyan and yellow to red (strongest)."""
    return _PALETTE[(np.clip(heat, 0, 1) * 255 + 0.5).astype(np.uint8)].astype(np.float32)  # a lookup, not interp


def overlay(square: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """RGB uint8: the heat map (any resolution, [0, 1]) resized bilinearly onto the square grayscale base."""
    side = square.shape[0]
    heat = np.asarray(Image.fromarray(np.asarray(heat, np.float32)).resize((side, side), Image.Resampling.BILINEAR))
    alpha = (_OPACITY * np.clip(heat, 0, 1))[:, :, None]
    base = np.repeat(square[:, :, None].astype(np.float32), 3, axis=2)
    return (base * (1 - alpha) + colour(heat) * alpha + 0.5).astype(np.uint8)


def png(pixels: np.ndarray) -> bytes:
    """PNG bytes of a uint8 grayscale (H, W) or RGB (H, W, 3) array."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)  # fast; at most 256 px a side anyway
    return buffer.getvalue()


def heat_map_png(square: np.ndarray, heat: np.ndarray) -> bytes:
    """PNG bytes of a heat map (any resolution, [0, 1]) drawn over `square` (a `display_square`).

    The one drawing of a Grad-CAM map for people, so the scoring report's images and
    /explain's overlay look alike.
    """
    return png(overlay(square, heat))
