"""Tests for the synthetic phantom generator: layout, format, determinism and class signal.

Learnability by a network is the trainer's tests' job; here we only check, cheaply, that
each finding is present where it should be at 64 px and that images vary within a class.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from xray_ray.cli import app
from xray_ray.config import CLASS_NAMES
from xray_ray.images.synth import FINDING_REGIONS, phantom, phantom_with_region, write_dataset
from xray_ray.scoring.archive import is_synthetic


def _png_bytes(root, per_class):
    return {
        (label, i): (root / label / "images" / f"{label}-{i}.png").read_bytes()
        for label in CLASS_NAMES
        for i in range(1, per_class + 1)
    }


def _at_64(pixels: np.ndarray) -> np.ndarray:
    """Downscale the way the input pipeline does (square already; Pillow bilinear)."""
    return np.asarray(Image.fromarray(pixels).resize((64, 64), Image.BILINEAR), dtype=np.float64)


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    counts = write_dataset(root, per_class=3, size=64, seed=5)
    return root, counts


def test_layout_names_and_counts(small_dataset):
    root, counts = small_dataset
    assert counts == {label: 3 for label in CLASS_NAMES}
    assert sorted(p.name for p in root.iterdir()) == sorted([*CLASS_NAMES, "SYNTHETIC.txt"])
    for label in CLASS_NAMES:
        names = sorted(p.name for p in (root / label / "images").iterdir())
        assert names == sorted(f"{label}-{i}.png" for i in (1, 2, 3))  # no temp files left
    assert (root / "Viral Pneumonia" / "images" / "Viral Pneumonia-3.png").is_file()


def test_synthetic_marker(small_dataset, tmp_path):
    root, _ = small_dataset
    text = (root / "SYNTHETIC.txt").read_text()
    assert "synthetic" in text.lower() and "not real" in text.lower()
    assert is_synthetic([root]) and not is_synthetic([tmp_path])  # what jobs make of it: their numbers are labelled


def test_synth_command_says_in_one_line_that_the_images_are_synthetic(tmp_path):
    result = CliRunner().invoke(app, ["synth", str(tmp_path / "out"), "--per-class", "1", "--size", "32"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert len(lines) == 1 and lines[0].startswith("wrote 4 synthetic phantoms") and "not real" in lines[0]
    assert (tmp_path / "out" / "SYNTHETIC.txt").is_file()


@pytest.mark.parametrize("size", [32, 64, 299])
def test_pngs_are_8bit_grayscale_of_requested_size(tmp_path, size):
    write_dataset(tmp_path, per_class=1, size=size, seed=0)
    for label in CLASS_NAMES:
        with Image.open(tmp_path / label / "images" / f"{label}-1.png") as im:
            assert im.format == "PNG" and im.mode == "L" and im.size == (size, size)


@pytest.mark.parametrize("label", CLASS_NAMES)
@pytest.mark.parametrize("size", [16, 100])
def test_phantom_shape_and_dtype(label, size):
    img = phantom(label, size, np.random.default_rng(0))
    assert img.shape == (size, size) and img.dtype == np.uint8
    assert img.min() < 40 and img.max() > 150  # air background and dense tissue both present


@pytest.mark.parametrize("bad", [dict(label="Pneumothorax"), dict(size=8)])
def test_phantom_rejects_bad_arguments(bad):
    args = dict(label="Normal", size=64) | bad
    with pytest.raises(ValueError):
        phantom(args["label"], args["size"], np.random.default_rng(0))


def test_write_dataset_rejects_negative_count(tmp_path):
    with pytest.raises(ValueError):
        write_dataset(tmp_path, per_class=-1)


def test_same_seed_same_bytes_different_seed_different(tmp_path, small_dataset):
    root, _ = small_dataset
    write_dataset(tmp_path / "same", per_class=3, size=64, seed=5)
    write_dataset(tmp_path / "other", per_class=3, size=64, seed=6)
    reference = _png_bytes(root, 3)
    assert _png_bytes(tmp_path / "same", 3) == reference
    other = _png_bytes(tmp_path / "other", 3)
    assert all(other[key] != reference[key] for key in reference)


def test_image_content_independent_of_per_class(tmp_path, small_dataset):
    root, _ = small_dataset
    write_dataset(tmp_path, per_class=1, size=64, seed=5)
    fewer, more = _png_bytes(tmp_path, 1), _png_bytes(root, 3)
    assert all(fewer[key] == more[key] for key in fewer)


def test_rewrite_is_idempotent(tmp_path):
    write_dataset(tmp_path, per_class=2, size=32, seed=1)
    before = _png_bytes(tmp_path, 2)
    write_dataset(tmp_path, per_class=2, size=32, seed=1)
    assert _png_bytes(tmp_path, 2) == before


@pytest.mark.parametrize("label", CLASS_NAMES)
def test_images_vary_within_a_class(label):
    images = np.stack([_at_64(phantom(label, 299, np.random.default_rng([3, i]))) for i in range(6)])
    means = images.mean(axis=(1, 2))
    assert means.std() > 3.0  # exposure varies, so global brightness alone cannot be the label
    for a in range(len(images)):
        for b in range(a + 1, len(images)):
            assert np.abs(images[a] - images[b]).mean() > 3.0


# The same rng state draws the same patient, film and noise under every label, so the
# difference from the Normal image isolates the finding. Boxes are in 64 px coordinates.
THORAX = (slice(8, 46), slice(6, 58))


@pytest.mark.parametrize("label", ["COVID", "Viral Pneumonia", "Lung_Opacity"])
@pytest.mark.parametrize("seed", range(4))
def test_finding_is_visible_in_the_lungs_at_64px(label, seed):
    normal = _at_64(phantom("Normal", 299, np.random.default_rng([11, seed])))
    sick = _at_64(phantom(label, 299, np.random.default_rng([11, seed])))
    diff = np.abs(sick - normal)
    outside = np.ones_like(diff, dtype=bool)
    outside[THORAX] = False
    assert diff[outside].max() <= 1.0  # nothing changes outside the chest
    assert diff.max() >= 20.0  # the finding reaches a clearly visible contrast at 64 px
    assert diff[THORAX].mean() >= 0.5

    rows, cols = THORAX
    right, left = diff[rows, 6:32].sum(), diff[rows, 32:58].sum()  # image left / right half
    upper, lower = diff[8:27, cols].sum(), diff[27:46, cols].sum()
    sides = min(right, left) / max(right, left)
    if label == "COVID":  # bilateral, lower zones
        assert sides > 0.2 and lower > 3 * upper
    elif label == "Viral Pneumonia":  # bilateral, diffuse over both zones
        assert sides > 0.5 and 0.25 < lower / upper < 4
    else:  # Lung_Opacity: one lung only
        assert sides < 0.05



@pytest.mark.parametrize("label", CLASS_NAMES)
def test_region_costs_no_random_draws_so_the_image_is_unchanged(label):
    image, region = phantom_with_region(label, 96, np.random.default_rng([4, 2]))
    assert np.array_equal(image, phantom(label, 96, np.random.default_rng([4, 2])))
    assert region.shape == image.shape and region.dtype == bool
    assert label in FINDING_REGIONS


@pytest.mark.parametrize("seed", range(6))
def test_consolidation_region_is_where_the_opacity_was_added(seed):
    normal = phantom("Normal", 128, np.random.default_rng([12, seed])).astype(np.int16)
    sick, region = phantom_with_region("Lung_Opacity", 128, np.random.default_rng([12, seed]))
    added = sick.astype(np.int16) - normal
    assert 0.002 < region.mean() < 0.15  # a focal finding, a few percent of the image
    assert added[region].mean() > 4 * max(added[~region].mean(), 1.0)  # the region holds the added density
    columns = np.flatnonzero(region.any(axis=0))
    assert columns.max() < 64 or columns.min() >= 64  # one lung only


@pytest.mark.parametrize("label", ["COVID", "Viral Pneumonia"])
def test_diffuse_findings_mark_both_lung_fields_and_normal_marks_nothing(label):
    _, region = phantom_with_region(label, 128, np.random.default_rng(3))
    _, opacity = phantom_with_region("Lung_Opacity", 128, np.random.default_rng(3))
    _, normal = phantom_with_region("Normal", 128, np.random.default_rng(3))
    assert not normal.any()
    assert region[:, :64].mean() > 0.1 and region[:, 64:].mean() > 0.1  # both lungs
    assert region[opacity].mean() > 0.9  # the consolidation lies inside the lung fields
