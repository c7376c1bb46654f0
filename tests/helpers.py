"""What several test modules and the benchmarks share: phantom batches and a briefly trained, exported model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xray_ray.config import CLASS_NAMES, load_config
from xray_ray.images.preprocess import preprocess
from xray_ray.images.synth import phantom


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


def train_and_export(folder: Path, size: int, backbone: str = "efficientnetb1", epochs: int = 1,
                     per_class: int = 4, seed: int = 21) -> Exported:
    """A model from scratch, briefly trained on phantoms (so its answers vary), BatchNorm statistics
    refreshed, exported with `model.onnx`: the quickest real model folder."""
    from xray_ray.model_folder.export import build_card, export_model
    from xray_ray.training.network import build_model, refresh_batchnorm

    config = load_config(None, [f"data.image_size={size}", f"model.backbone={backbone}", "model.weights=none",
                                "model.bn_momentum=0.9", f"lra.epochs={epochs}"])
    model = build_model(config.model, size, seed=5)
    x, y = phantom_batch(per_class, seed=seed, size=size)
    model.fit(x, y, epochs=epochs, batch_size=8, shuffle=True, verbose=0)
    refresh_batchnorm(model, (x[i:i + 8] for i in range(0, len(x), 8)), 8)
    card = build_card(folder.name, config, training={"epochs_run": epochs, "train_images": len(x)},
                      index_fingerprint="test", split_counts={}, synthetic=True)
    return Exported(model, folder, export_model(model, folder, card))
