"""Inputs that are not frontal chest X-rays, generated (no downloads): what the out-of-distribution flag must catch.

Each generator draws one 8-bit grayscale image from a seeded generator; `nonchest_set`
returns `per_kind` of every kind as (kind, image) pairs, ready for `Classifier.predict`.
The benchmark (benchmarks/bench_ood.py) uses a large set, the tests a small one. The
DICOM kind reads the CT/MR slices bundled with pydicom (whichever of them are present).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from xray_ray.config import CLASS_NAMES
from xray_ray.images.decode import ImageDecodeError, decode
from xray_ray.images.synth import phantom

WORDS = ("patient", "name", "date", "request", "chest", "radiology", "signature", "ward", "history", "clinical",
         "form", "consent", "report", "findings", "doctor", "number", "address", "insurance", "page", "of")
PYDICOM_SLICES = ("CT_small.dcm", "MR_small.dcm", "liver_1frame.dcm")
"""pydicom's bundled single-frame CT and MR slices with distinct pixels (its other MR files re-encode MR_small)."""


def _side(rng: np.random.Generator) -> int:
    return int(rng.choice([96, 160, 256, 400, 640]))


def _to_uint8(values: np.ndarray) -> np.ndarray:
    lo, hi = float(values.min()), float(values.max())
    return np.zeros(values.shape, np.uint8) if hi <= lo else ((values - lo) / (hi - lo) * 255).astype(np.uint8)


def texture(rng: np.random.Generator) -> np.ndarray:
    """Stripes, checks, rings or smooth blobs at a random scale and angle."""
    side = _side(rng)
    y, x = np.mgrid[0:side, 0:side] / side
    angle, period = rng.uniform(0, np.pi), rng.uniform(0.02, 0.2)
    kind = rng.integers(4)
    if kind == 0:
        values = np.sin(2 * np.pi * (x * np.cos(angle) + y * np.sin(angle)) / period)
    elif kind == 1:
        values = np.sign(np.sin(2 * np.pi * x / period)) * np.sign(np.sin(2 * np.pi * y / period))
    elif kind == 2:
        values = np.sin(2 * np.pi * np.hypot(x - rng.uniform(), y - rng.uniform()) / period)
    else:
        cells = int(rng.integers(4, 24))
        values = np.asarray(Image.fromarray(rng.standard_normal((cells, cells)).astype(np.float32))
                            .resize((side, side), Image.Resampling.BICUBIC))
    return _to_uint8(values + rng.normal(0, 0.1, values.shape))


def document(rng: np.random.Generator) -> np.ndarray:
    """A scanned page: lines of dark text on a light background, sometimes with form boxes."""
    width, height = int(rng.integers(300, 700)), int(rng.integers(400, 900))
    page = Image.new("L", (width, height), int(rng.integers(200, 256)))
    draw = ImageDraw.Draw(page)
    font = ImageFont.load_default(size=int(rng.integers(10, 24)))
    y = int(rng.integers(10, 40))
    while y < height - 30:
        if rng.uniform() < 0.15:
            draw.rectangle([20, y, width - 20, y + 40], outline=int(rng.integers(0, 80)), width=2)
            y += 50
            continue
        line = " ".join(rng.choice(WORDS, int(rng.integers(3, 10))))
        draw.text((int(rng.integers(10, 40)), y), line, fill=int(rng.integers(0, 90)), font=font)
        y += int(rng.integers(18, 40))
    return np.asarray(page)


def noise(rng: np.random.Generator) -> np.ndarray:
    """Uniform, Gaussian or salt-and-pepper noise."""
    side = _side(rng)
    kind = rng.integers(3)
    if kind == 0:
        return rng.integers(0, 256, (side, side), dtype=np.uint8)
    if kind == 1:
        return np.clip(rng.normal(rng.uniform(60, 200), rng.uniform(10, 60), (side, side)), 0, 255).astype(np.uint8)
    return np.where(rng.uniform(size=(side, side)) < 0.5, 0, 255).astype(np.uint8)


def gradient(rng: np.random.Generator) -> np.ndarray:
    """A linear or radial brightness ramp."""
    side = _side(rng)
    y, x = np.mgrid[0:side, 0:side] / side
    if rng.uniform() < 0.5:
        angle = rng.uniform(0, 2 * np.pi)
        values = x * np.cos(angle) + y * np.sin(angle)
    else:
        values = np.hypot(x - rng.uniform(), y - rng.uniform())
    return _to_uint8(values)


def constant(rng: np.random.Generator) -> np.ndarray:
    """One grey level everywhere (black, white or between)."""
    return np.full((_side(rng), _side(rng)), int(rng.choice([0, 255, int(rng.integers(1, 255))])), np.uint8)


def odd_phantom(rng: np.random.Generator) -> np.ndarray:
    """A cartoon chest phantom (not a real X-ray) at another size, contrast, gamma or polarity."""
    image = phantom(str(rng.choice(CLASS_NAMES)), int(rng.choice([48, 200, 400])), rng).astype(np.float64) / 255
    kind = rng.integers(4)
    if kind == 0:
        image = 0.5 + (image - 0.5) * rng.uniform(0.2, 0.5)  # washed out
    elif kind == 1:
        image = image ** rng.choice([0.3, 3.0])
    elif kind == 2:
        image = 1 - image  # inverted
    return (np.clip(image, 0, 1) * 255).astype(np.uint8)


def photo(rng: np.random.Generator) -> np.ndarray:
    """A synthetic colour "photograph" (sky, ground, sun, objects) converted to grey as a scanner would."""
    width, height = int(rng.integers(240, 640)), int(rng.integers(240, 480))
    sky, ground = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    horizon = int(height * rng.uniform(0.3, 0.7))
    t = np.linspace(0, 1, height)[:, None, None]
    pixels = np.where(np.arange(height)[:, None, None] < horizon, sky * (1 - 0.4 * t), ground * (0.6 + 0.4 * t))
    canvas = Image.fromarray(np.broadcast_to(pixels, (height, width, 3)).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(3, 12))):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        box = [x0, y0, x0 + int(rng.integers(10, width // 2)), y0 + int(rng.integers(10, height // 2))]
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.uniform() < 0.5 else draw.rectangle)(box, fill=colour)
    rgb = np.asarray(canvas).astype(np.float64) + rng.normal(0, 6, (height, width, 3))
    return np.asarray(Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB").convert("L"))


GENERATED = {"texture": texture, "document": document, "noise": noise, "gradient": gradient, "constant": constant,
             "phantom_other_size_or_contrast": odd_phantom, "photo_to_grey": photo}


def dicom_slices() -> list[np.ndarray]:
    """The CT/MR slices bundled with pydicom that are present here (never downloaded), decoded by the project's
    decoder, each also flipped and rotated (a slice seen four ways)."""
    from pydicom.data import get_testdata_file  # only the tests and benchmarks need pydicom's bundled files

    slices = []
    for name in PYDICOM_SLICES:
        path = get_testdata_file(name, download=False)
        if path is None:
            continue
        try:
            with open(path, "rb") as file:
                image = decode(file.read())
        except ImageDecodeError:
            continue
        slices += [image, image[:, ::-1], np.rot90(image), np.rot90(image, 2)]
    return [np.ascontiguousarray(s) for s in slices]


def nonchest_set(per_kind: int, seed: int = 0) -> list[tuple[str, np.ndarray]]:
    """`per_kind` images of every generated kind, then every bundled CT/MR slice: (kind, uint8 image) pairs."""
    out = [(kind, draw(np.random.default_rng([seed, k, i])))
           for k, (kind, draw) in enumerate(GENERATED.items()) for i in range(per_kind)]
    return out + [("ct_mr_dicom", image) for image in dicom_slices()]
