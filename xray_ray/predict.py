"""`Classifier`: an exported model folder, loaded once, answering batches of images.

Serve replicas, scoring actors and evaluation all use this class, so they decode and
preprocess exactly as training did (imaging.preprocess) and stamp every answer with the
model's version. Undecodable input raises ImageDecodeError before it reaches the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import numpy as np

from xray_ray import imaging
from xray_ray.export import MODEL_FILE, read_card

ImageInput = Union[bytes, np.ndarray]


@dataclass
class Predictions:
    """Per-class probabilities for a batch, with what produced them."""

    probabilities: np.ndarray  # (N, classes), rows sum to 1
    classes: list[str]
    model_version: str
    engine: str

    @property
    def labels(self) -> list[str]:
        return [self.classes[i] for i in self.probabilities.argmax(axis=1)]

    @property
    def confidence(self) -> np.ndarray:
        return self.probabilities.max(axis=1)

    def rows(self) -> list[dict]:
        """One JSON-ready answer per image."""
        return [
            {"label": label, "confidence": float(p.max()),
             "probabilities": {c: float(v) for c, v in zip(self.classes, p)},
             "model_version": self.model_version, "engine": self.engine}
            for label, p in zip(self.labels, self.probabilities)
        ]


class Classifier:
    """An exported model, ready to predict; cheap to call, expensive to construct (load once per process)."""

    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir)
        self.card = read_card(self.model_dir)
        self.classes: list[str] = self.card["classes"]
        self.image_size: int = int(self.card["input"]["size"])
        self.version: str = self.card["version"]
        self.engine = "keras"
        import keras

        self._model = keras.models.load_model(self.model_dir / MODEL_FILE, compile=False)

    def prepare(self, image: ImageInput) -> np.ndarray:
        """File bytes or a decoded 2-D grayscale array -> the model's input (imaging.preprocess)."""
        if isinstance(image, (bytes, bytearray, memoryview)):
            image = imaging.decode(bytes(image))
        return imaging.preprocess(image, self.image_size)

    def predict_arrays(self, batch: np.ndarray) -> Predictions:
        """Predict already-preprocessed inputs of shape (N, size, size, 3)."""
        batch = np.asarray(batch, dtype=np.float32)
        expected = (self.image_size, self.image_size, 3)
        if batch.ndim != 4 or batch.shape[1:] != expected:
            raise ValueError(f"expected a batch of shape (N, {expected[0]}, {expected[1]}, 3), got {batch.shape}")
        probabilities = np.asarray(self._model.predict_on_batch(batch), dtype=np.float64) if len(batch) else \
            np.zeros((0, len(self.classes)))
        return Predictions(probabilities, self.classes, self.version, self.engine)

    def predict(self, images: Sequence[ImageInput]) -> Predictions:
        """Predict raw file bytes or decoded arrays; raises ImageDecodeError for an unusable one."""
        return self.predict_arrays(np.stack([self.prepare(image) for image in images]) if len(images) else
                                   np.zeros((0, self.image_size, self.image_size, 3), np.float32))

    def predict_files(self, paths: Sequence[str], batch_size: int = 32) -> tuple[np.ndarray, list[str]]:
        """Probabilities for files (NaN rows where unusable) and the error reason per file ('' when fine)."""
        probabilities = np.full((len(paths), len(self.classes)), np.nan)
        errors = [""] * len(paths)
        for start in range(0, len(paths), batch_size):
            good, inputs = [], []
            for i in range(start, min(start + batch_size, len(paths))):
                try:
                    inputs.append(self.prepare(imaging.read_image(paths[i])))
                    good.append(i)
                except imaging.ImageDecodeError as err:
                    errors[i] = err.reason
            if inputs:
                probabilities[good] = self.predict_arrays(np.stack(inputs)).probabilities
        return probabilities, errors
