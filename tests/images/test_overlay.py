"""Heat-map overlays for people: bounded size, the X-ray kept where there is no heat, red where it is strongest."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from xray_ray.images.overlay import MAX_DISPLAY, display_square, heat_map_png, overlay, png
from xray_ray.images.preprocess import preprocess


def test_display_square_is_the_padded_model_view_capped_at_256_px():
    tall = np.full((600, 300), 200, np.uint8)
    square = display_square(tall)
    assert square.shape == (MAX_DISPLAY, MAX_DISPLAY) and square.dtype == np.uint8
    assert square[:, :40].max() == 0 and square[128, 128] == 200  # black padding left and right, as preprocess pads
    np.testing.assert_array_equal(square, preprocess(tall, MAX_DISPLAY)[:, :, 0])
    assert display_square(np.zeros((40, 50), np.uint8)).shape == (50, 50)  # small images are never enlarged


def test_overlay_keeps_the_xray_where_cold_and_turns_red_where_hottest():
    square = np.full((64, 64), 120, np.uint8)
    heat = np.zeros((8, 8), np.float32)
    heat[0, 0] = 1.0
    shown = overlay(square, heat)
    assert shown.shape == (64, 64, 3) and shown.dtype == np.uint8
    np.testing.assert_array_equal(shown[40:, 40:], 120)  # no heat: the X-ray unchanged
    red, green, blue = (int(v) for v in shown[0, 0])
    assert red > 150 and green < 100 and blue < 100


def test_png_round_trips():
    pixels = np.random.default_rng(0).integers(0, 255, (10, 12, 3), dtype=np.uint8)
    with Image.open(io.BytesIO(png(pixels))) as image:
        assert image.format == "PNG" and np.array_equal(np.asarray(image), pixels)


def test_heat_map_png_is_the_overlay_at_the_thumbnail_size():
    square = display_square(np.full((300, 200), 90, np.uint8))
    heat = np.zeros((8, 8), np.float32)
    heat[4, 4] = 1.0
    with Image.open(io.BytesIO(heat_map_png(square, heat))) as image:
        assert image.format == "PNG" and image.size == (MAX_DISPLAY, MAX_DISPLAY) and image.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(image), overlay(square, heat))
