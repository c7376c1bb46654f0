"""The model input: padding to a square, resizing, three equal channels, float32 0-255."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests.badfiles import good_files
from xray_ray.images.decode import decode
from xray_ray.images.preprocess import decode_and_preprocess, preprocess

GOOD = good_files()


def test_preprocess_output():
    gray = decode(GOOD["gray8.png"][0])
    out = preprocess(gray, 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.float32
    assert 0 <= out.min() and out.max() <= 255 and out.max() > 200
    np.testing.assert_array_equal(out[..., 0], out[..., 2])
    np.testing.assert_array_equal(decode_and_preprocess(GOOD["gray8.png"][0], 64), out)


def test_preprocess_pads_a_wide_image_with_black_bands():
    out = preprocess(np.full((40, 120), 255, np.uint8), 60)[..., 0]  # 120 square: 40 black rows each side
    assert not out[:19].any() and not out[-19:].any()
    assert (out[22:38] == 255).all()


def test_preprocess_pads_a_tall_image_with_black_bands():
    out = preprocess(np.full((120, 40), 255, np.uint8), 60)[..., 0]
    assert not out[:, :19].any() and not out[:, -19:].any()
    assert (out[:, 22:38] == 255).all()


def test_preprocess_upscales_and_is_deterministic():
    gray = decode(GOOD["dicom_mono2.dcm"][0])
    first = preprocess(gray, 300)
    assert first.shape == (300, 300, 3)
    np.testing.assert_array_equal(first, preprocess(gray.copy(), 300))


@pytest.mark.parametrize(
    "bad_input",
    [np.zeros((40, 40, 3), np.uint8), np.zeros((40, 40), np.float32), np.zeros((0, 40), np.uint8), [[0] * 40] * 40],
    ids=["3-D", "float", "empty", "list"],
)
def test_preprocess_rejects_wrong_input(bad_input):
    with pytest.raises(ValueError):
        preprocess(bad_input, 64)


def padded_square(gray: np.ndarray, size: int) -> np.ndarray:
    """The definition preprocess keeps: pad to the centred black square, then one bilinear resize."""
    height, width = gray.shape
    side = max(height, width)
    square = np.zeros((side, side), np.uint8)
    top, left = (side - height) // 2, (side - width) // 2
    square[top:top + height, left:left + width] = gray
    return np.asarray(Image.fromarray(square).resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)


@pytest.mark.parametrize("shape", [(299, 299), (70, 100), (100, 70), (1024, 256), (256, 1024), (331, 517),
                                   (517, 331), (32, 3000), (3000, 32), (64, 9), (9, 64), (1, 1)])
@pytest.mark.parametrize("size", [64, 224, 300])
def test_preprocess_matches_resizing_the_padded_square(shape, size):
    gray = np.random.default_rng(sum(shape) + size).integers(0, 256, shape, dtype=np.uint8)
    expected, got = padded_square(gray, size), preprocess(gray, size)[..., 0]
    difference = np.abs(expected - got)
    assert difference.max() <= 1 and (difference > 0).mean() < 0.01, (difference.max(), (difference > 0).mean())
    if shape[0] == shape[1]:
        np.testing.assert_array_equal(expected, got)


