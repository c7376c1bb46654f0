"""`Classifier`: an exported model folder, loaded once, answering batches of images.

Serve replicas, scoring actors and evaluation all use this class, so they decode and
preprocess exactly as training did (images.preprocess) and stamp every answer with the
model's version and the engine that produced it. Undecodable input raises ImageDecodeError
before it reaches the model.

Two engines run the same exported model: ONNX Runtime (`model.onnx`, the default wherever
the card marks it usable and its sha256 matches) and Keras (`model.keras`). With ONNX
Runtime this module never imports TensorFlow or Keras, which saves seconds of start-up
and gigabytes per serving or scoring process.

Every answer carries calibrated probabilities (the card's `calibration`, fitted at export;
the raw ones stay in `raw_probabilities`) and an out-of-distribution score with its flag
(`ood.npz` and the card's `ood` threshold), both computed from the same forward pass.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xray_ray.images.decode import ImageDecodeError, decode, read_image
from xray_ray.images.preprocess import preprocess
from xray_ray.model_folder.calibration import Calibration
from xray_ray.model_folder.card import HEAD_FILE, OOD_FILE, EngineUnavailableError, ModelCard
from xray_ray.model_folder.engines import onnx_session, setup_tensorflow
from xray_ray.model_folder import golden
from xray_ray.model_folder.graph import OUTPUTS, inference_model, load_head
from xray_ray.model_folder.ood import OodDetector

log = logging.getLogger(__name__)

ImageInput = bytes | np.ndarray
Runner = Callable[[np.ndarray, Sequence[str]], list[np.ndarray]]


@dataclass
class Predictions:
    """Per-class probabilities for a batch, with what produced them and how far from the training data each image is.

    `probabilities` are calibrated when the model folder has a calibration (else equal to
    `raw_probabilities`). `ood_score` is NaN and `out_of_distribution` False for a model
    exported without a detector.
    """

    probabilities: np.ndarray  # (N, classes), calibrated, rows sum to 1
    classes: list[str]
    model_version: str
    engine: str
    raw_probabilities: np.ndarray | None = None  # (N, classes) as the network answered; None means the same
    ood_score: np.ndarray | None = None  # (N,); above the card's threshold means out of distribution
    out_of_distribution: np.ndarray | None = None  # (N,) bool

    def __post_init__(self):
        n = len(self.probabilities)
        if self.raw_probabilities is None:
            self.raw_probabilities = self.probabilities
        if self.ood_score is None:
            self.ood_score = np.full(n, np.nan)
        if self.out_of_distribution is None:
            self.out_of_distribution = np.zeros(n, bool)

    @property
    def labels(self) -> list[str]:
        return [self.classes[i] for i in self.probabilities.argmax(axis=1)]

    @property
    def confidence(self) -> np.ndarray:
        return self.probabilities.max(axis=1)

    def rows(self) -> list[dict]:
        """One JSON-ready answer per image: calibrated `confidence`, the network's own `raw_confidence`,
        and the out-of-distribution score and flag (a flagged image still gets a class)."""
        return [
            {"label": label, "confidence": float(p.max()), "raw_confidence": float(raw.max()),
             "probabilities": {c: float(v) for c, v in zip(self.classes, p)},
             "ood_score": float(score) if np.isfinite(score) else None, "out_of_distribution": bool(flag),
             "model_version": self.model_version, "engine": self.engine}
            for label, p, raw, score, flag in zip(self.labels, self.probabilities, self.raw_probabilities,
                                                  self.ood_score, self.out_of_distribution)
        ]


def load_detector(card: ModelCard) -> tuple[float | None, OodDetector | None]:
    """The card's out-of-distribution threshold and its verified detector; (None, None) for a folder fitted
    without one. ValueError for a detector this xray-ray cannot read (another layout, a changed file): cheap,
    so Serve and scoring check it before any replica or actor starts."""
    if not card.get("ood"):
        return None, None
    return float(card["ood"]["threshold"]), OodDetector.load(card.verified_file(OOD_FILE))


def check_before_workers(card: ModelCard) -> None:
    """What a Serve replica or scoring actor will check when it loads `card`'s folder, checked once before any
    starts, so a bad folder is refused with its reason instead of failing every worker: the folder loaded
    on ONNX Runtime answers its golden set (GoldenSetError). Skipped where ONNX Runtime cannot run the folder:
    the workers' Keras fallback checks it (TensorFlow stays out of this process)."""
    try:
        Classifier(card.folder, engine="onnxruntime", threads=1)
    except EngineUnavailableError:
        return


class Classifier:
    """An exported model, ready to predict; cheap to call, expensive to construct (load once per process).

    `engine`: "auto" (ONNX Runtime when `model.onnx` is usable, else Keras), "onnxruntime"
    (raises EngineUnavailableError when the file is missing, failed parity or is corrupt) or
    "keras". `threads` overrides ONNX Runtime's intra-op thread count (see `onnx_threads`).
    `raw` ignores the card's calibration and detector: the network's own answers, which is
    what fitting them (model_folder.reliability) needs, whatever the folder held before.
    Otherwise the folder's golden set is answered once at load (`golden.check`; `check_golden`
    False only while a new one is recorded): GoldenSetError when this engine, here, does not
    reproduce it.
    """

    def __init__(self, model_dir: str | Path, engine: str = "auto", threads: int | None = None, raw: bool = False,
                 check_golden: bool = True):
        self.model_dir = Path(model_dir)
        self.card = ModelCard.read(self.model_dir)
        self.classes: list[str] = self.card.classes
        self.image_size: int = self.card.image_size
        self.version: str = self.card.version
        self.provider: str | None = None
        self.threads: int | None = None
        self._head: dict[str, np.ndarray] | None = None
        section = None if raw else self.card.get("calibration")
        self.calibration = Calibration.from_dict(section) if section else None
        self.ood_threshold, self.detector = (None, None) if raw else load_detector(self.card)
        chosen, path, reason = self.card.choose_engine(engine)
        self._run = None
        if chosen == "onnxruntime":
            try:
                self._run = self._load_onnxruntime(path, threads)
            except Exception as err:
                reason = f"ONNX Runtime cannot load {path} ({type(err).__name__}: {err})"
                if engine == "onnxruntime":
                    raise EngineUnavailableError(f"cannot use the onnxruntime engine: {reason}") from err
                chosen, path, _ = self.card.choose_engine("keras")
        if self._run is None:
            if engine == "auto":
                log.warning("%s: using the keras engine because %s", self.model_dir.name, reason)
            self._run = self._load_keras(path)
        log.info("%s (%s) on %s%s", self.version, self.model_dir, self.engine,
                 f" [{self.provider}, {self.threads} threads]" if self.engine == "onnxruntime" else "")
        if check_golden and not raw and not golden.check(self):  # GoldenSetError: this folder does not answer here as it did
            log.warning("%s", golden.missing_reason(self.card))

    def _load_keras(self, path: Path) -> Runner:
        setup_tensorflow()
        import keras  # the fallback engine; TensorFlow only ever loads in processes that use it

        model = inference_model(keras.models.load_model(path, compile=False, safe_mode=True))
        self.engine = "keras"

        def run(batch: np.ndarray, names: Sequence[str]) -> list[np.ndarray]:
            outputs = dict(zip(OUTPUTS, model.predict_on_batch(batch)))
            return [np.asarray(outputs[name]) for name in names]

        return run

    def _load_onnxruntime(self, path: Path, threads: int | None) -> Runner:
        session = onnx_session(path, threads)
        self.provider = session.get_providers()[0]  # what ORT actually uses (CUDA falls back without a GPU)
        self.threads = session.get_session_options().intra_op_num_threads
        self.engine = "onnxruntime"
        input_name = session.get_inputs()[0].name
        available = [output.name for output in session.get_outputs()]
        log.info("ONNX Runtime on %s with %d intra-op threads", self.provider, self.threads)

        def run(batch: np.ndarray, names: Sequence[str]) -> list[np.ndarray]:
            missing = [name for name in names if name not in available]
            if missing == ["probabilities"] and len(available) == 1:  # exported before the graph had named outputs
                names, missing = available, []
            if missing:
                raise ValueError(f"{path} has no output {missing} (exported before it existed): export the model again")
            return session.run(list(names), {input_name: np.ascontiguousarray(batch, np.float32)})

        return run

    def _checked(self, batch: np.ndarray) -> np.ndarray:
        batch = np.asarray(batch, dtype=np.float32)
        expected = (self.image_size, self.image_size, 3)
        if batch.ndim != 4 or batch.shape[1:] != expected:
            raise ValueError(f"expected a batch of shape (N, {expected[0]}, {expected[1]}, 3), got {batch.shape}")
        return batch

    def forward(self, batch: np.ndarray, names: Sequence[str] = ("probabilities",)) -> dict[str, np.ndarray]:
        """The graph's outputs `names` (of `graph.OUTPUTS`) for preprocessed inputs (N, size, size, 3), one pass."""
        return dict(zip(names, self._run(self._checked(batch), names)))

    def head(self) -> dict[str, np.ndarray]:
        """The head's weights (`head.npz`, checked against the card): gradients through the head need no engine."""
        if self._head is None:
            self._head = load_head(self.card.verified_file(HEAD_FILE))
        return self._head

    def describe(self) -> dict:
        """What answers: model version, engine, provider, threads, input, and the card's drift baseline (for Serve's
        model info, logs and the scoring job's serve backend)."""
        return {"model_version": self.version, "engine": self.engine, "provider": self.provider,
                "threads": self.threads, "classes": list(self.classes), "image_size": self.image_size,
                "baseline": self.card.baseline()}

    def prepare(self, image: ImageInput) -> np.ndarray:
        """File bytes or a decoded 2-D grayscale array -> the model's input (images.preprocess)."""
        if isinstance(image, (bytes, bytearray, memoryview)):
            image = decode(bytes(image))
        return preprocess(image, self.image_size)

    def predict_arrays(self, batch: np.ndarray) -> Predictions:
        """Predict already-preprocessed inputs of shape (N, size, size, 3): calibrated probabilities, raw ones,
        and the out-of-distribution score and flag, from one forward pass."""
        batch = self._checked(batch)
        if not len(batch):
            empty = np.zeros((0, len(self.classes)))
            return Predictions(empty, self.classes, self.version, self.engine)
        return self.answer(self.forward(batch, ("probabilities", "features") if self.detector else ("probabilities",)),
                           batch)

    def answer(self, outputs: dict[str, np.ndarray], batch: np.ndarray) -> Predictions:
        """The Predictions for one forward pass's `outputs` (probabilities, and features when there is a detector)
        of `batch`: calibrated, with the out-of-distribution score and flag."""
        raw = np.asarray(outputs["probabilities"], dtype=np.float64)
        calibrated = self.calibration.apply(raw) if self.calibration else raw
        if self.detector is None:
            return Predictions(calibrated, self.classes, self.version, self.engine, raw)
        score = self.detector.score(outputs["features"], batch)
        return Predictions(calibrated, self.classes, self.version, self.engine, raw, score, score > self.ood_threshold)

    def predict(self, images: Sequence[ImageInput]) -> Predictions:
        """Predict raw file bytes or decoded arrays; raises ImageDecodeError for an unusable one."""
        return self.predict_arrays(np.stack([self.prepare(image) for image in images]) if len(images) else
                                   np.zeros((0, self.image_size, self.image_size, 3), np.float32))

    def prepared_batches(self, paths: Sequence[str], errors: list[str], batch_size: int = 32):
        """Yield (indices into `paths`, model inputs) per batch of usable files; an unusable file's reason goes
        into `errors` at its index instead."""
        for start in range(0, len(paths), batch_size):
            good, inputs = [], []
            for i in range(start, min(start + batch_size, len(paths))):
                try:
                    inputs.append(self.prepare(read_image(paths[i])))
                    good.append(i)
                except ImageDecodeError as err:
                    errors[i] = err.reason
            if inputs:
                yield good, np.stack(inputs)

    def predict_files(self, paths: Sequence[str], batch_size: int = 32) -> tuple[np.ndarray, list[str]]:
        """Calibrated probabilities for files (NaN rows where unusable) and the error reason per file ('' when fine)."""
        probabilities = np.full((len(paths), len(self.classes)), np.nan)
        errors = [""] * len(paths)
        for good, inputs in self.prepared_batches(paths, errors, batch_size):
            probabilities[good] = self.predict_arrays(inputs).probabilities
        return probabilities, errors
