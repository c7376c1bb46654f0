"""What several test modules and the benchmarks share: phantom batches and a briefly trained, exported model."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xray_ray.config import CLASS_NAMES, load_config
from xray_ray.images.preprocess import preprocess
from xray_ray.images.synth import phantom, phantom_with_region

REPO = Path(__file__).resolve().parents[1]
"""The repository's root, for the tests that run its commands or read its configs and README."""


@dataclass
class Exported:
    """A model folder and the Keras model it was exported from, still in memory."""

    model: object
    folder: Path
    card: dict


def phantom_batch(per_class: int, seed: int, size: int, side: int = 96) -> tuple[np.ndarray, np.ndarray]:
    """Preprocessed phantoms (`per_class` of each class, drawn at `side` px) and their one-hot labels."""
    images, labels = [], []
    for c, label in enumerate(CLASS_NAMES):
        for i in range(per_class):
            images.append(preprocess(phantom(label, side, np.random.default_rng([seed, c, i])), size))
            labels.append(c)
    return np.stack(images), np.eye(len(CLASS_NAMES), dtype=np.float32)[labels]


def write_first_layout(detector: Path, target: Path) -> None:
    """`detector` (an ood.npz) rewritten at `target` as xray-ray wrote it before the layout version: no `format`."""
    with np.load(detector) as arrays:
        older = {key: arrays[key] for key in arrays.files if key != "format"}
    with open(target, "wb") as file:
        np.savez(file, **older)


def train_and_export(folder: Path, size: int, backbone: str = "efficientnetb1", epochs: int = 1,
                     per_class: int = 4, seed: int = 21, config_file: Path | None = None) -> Exported:
    """A model from scratch, briefly trained on phantoms (so its answers vary), BatchNorm statistics
    refreshed, exported with `model.onnx`: the quickest real model folder. `config_file` gives the
    other settings (e.g. configs/compact_cpu.yaml, whose head penalties let the compact CNN learn)."""
    from xray_ray.model_folder.card import build_card
    from xray_ray.model_folder.export import export_model
    from xray_ray.training.network import build_model, refresh_batchnorm

    config = load_config(config_file, [f"data.image_size={size}", f"model.backbone={backbone}", "model.weights=none",
                                "model.bn_momentum=0.9", f"lra.epochs={epochs}"])
    model = build_model(config.model, size, seed=5)
    x, y = phantom_batch(per_class, seed=seed, size=size)
    model.fit(x, y, epochs=epochs, batch_size=8, shuffle=True, verbose=0)
    refresh_batchnorm(model, (x[i:i + 8] for i in range(0, len(x), 8)), 8)
    card = build_card(folder.name, config, training={"epochs_run": epochs, "train_images": len(x)},
                      index_fingerprint="test", split_counts={}, synthetic=True)
    return Exported(model, folder, export_model(model, folder, card))


def copy_as(source: Path, target: Path, version: str, **card: object) -> Path:
    """A copy of the model folder `source` whose card names `version` (and any other `card` fields): another
    version of the same network, which the registry's gate compares as a retrained model."""
    from xray_ray.model_folder.card import ModelCard

    shutil.copytree(source, target)
    ModelCard.read(target).update(version=version, **card)
    return target


POINTING_TOLERANCE = 15 / 224
"""The pointing game's tolerance (Zhang et al., "Top-down neural attention by excitation backprop"): 15 px at a
224 px input, as a share of the input side."""


def _distance_to(region: np.ndarray) -> np.ndarray:
    """Each pixel's distance (px) to the nearest pixel of `region` (inf when it is empty)."""
    rows, cols = np.nonzero(region)
    grid_r, grid_c = np.indices(region.shape)
    if not len(rows):
        return np.full(region.shape, np.inf)
    return np.sqrt((grid_r[..., None] - rows) ** 2 + (grid_c[..., None] - cols) ** 2).min(axis=-1)


def pointing_game(classifier, count: int, seed: int, side: int = 96) -> dict:
    """Grad-CAM's pointing game on `count` fresh Lung_Opacity phantoms drawn at `side` px. Of those the model
    classifies correctly: `strict`, the share whose heat-map peak lies inside the consolidation; `tolerant`, within
    the standard tolerance of it (POINTING_TOLERANCE of the input side). Chance beside each: the share of the image
    the region (or the region grown by the tolerance) covers, where a uniformly random point would land.
    `bottom_edge` is the share of peaks on the map's last row (the diaphragm and abdomen, never the finding)."""
    from PIL import Image

    from xray_ray.model_folder.gradcam import explain

    size = classifier.image_size
    images, regions = [], []
    for i in range(count):
        image, region = phantom_with_region("Lung_Opacity", side, np.random.default_rng([seed, i]))
        images.append(preprocess(image, size))
        resized = Image.fromarray(region.astype(np.float32)).resize((size, size), Image.Resampling.BILINEAR)
        regions.append(np.asarray(resized) >= 0.5)  # the region at the model input's resolution
    result = explain(classifier, np.stack(images))
    correct = [i for i, label in enumerate(result.predictions.labels) if label == "Lung_Opacity"]
    peaks, tolerance, cell = result.peaks(), POINTING_TOLERANCE * size, size / result.grid.shape[1]
    distances = {i: _distance_to(regions[i]) for i in correct}
    n = max(len(correct), 1)
    return {"images": count, "correct": len(correct), "grid": list(result.grid.shape[1:]), "input_size": size,
            "strict": sum(bool(regions[i][peaks[i]]) for i in correct) / n,
            "strict_chance": float(np.mean([regions[i].mean() for i in correct])) if correct else float("nan"),
            "tolerance_px": tolerance,
            "tolerant": sum(bool(distances[i][peaks[i]] <= tolerance) for i in correct) / n,
            "tolerant_chance": float(np.mean([(distances[i] <= tolerance).mean() for i in correct]))
            if correct else float("nan"),
            "bottom_edge": sum(peaks[i][0] >= size - cell for i in correct) / n}
