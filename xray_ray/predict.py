"""`Classifier`: an exported model folder, loaded once, answering batches of images.

Serve replicas, scoring actors and evaluation all use this class, so they decode and
preprocess exactly as training did (imaging.preprocess) and stamp every answer with the
model's version and the engine that produced it. Undecodable input raises ImageDecodeError
before it reaches the model.

Two engines run the same exported model: ONNX Runtime (`model.onnx`, the default wherever
the card marks it usable and its sha256 matches) and Keras (`model.keras`). With ONNX
Runtime this module never imports TensorFlow or Keras, which saves seconds of start-up
and gigabytes per serving or scoring process.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xray_ray import imaging, onnx_export
from xray_ray.export import MODEL_FILE, read_card

log = logging.getLogger(__name__)

ENGINES = ("auto", "onnxruntime", "keras")


class EngineUnavailableError(RuntimeError):
    """The engine asked for cannot run this model folder (the message says why)."""


ImageInput = bytes | np.ndarray


def process_footprint() -> dict:
    """What the process holding a classifier costs: resident memory now and at its peak, in MB
    (Linux; None elsewhere), and whether TensorFlow was imported (ONNX Runtime promises not)."""
    memory = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                memory[key] = int(value.split()[0]) / 1024
    except OSError:
        pass
    return {"rss_mb": memory.get("VmRSS"), "peak_rss_mb": memory.get("VmHWM"),
            "tensorflow_imported": "tensorflow" in sys.modules}


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


def onnx_threads() -> int:
    """Intra-op threads for ONNX Runtime: the CPUs Ray gave this actor or task, else every CPU.

    Ray is only consulted when this process is already a connected Ray worker; nothing
    here imports or starts Ray. A worker with no CPU reserved (an actor's default) gets
    one thread, so it never competes with the tasks Ray scheduled on those cores.
    """
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        try:
            context = ray.get_runtime_context()
            if context.worker.mode == ray.WORKER_MODE:
                cpus = float(context.get_assigned_resources().get("CPU", 0.0))
                return max(1, int(cpus))
        except Exception as err:  # noqa: BLE001 - an unexpected Ray API change must not stop inference
            log.debug("could not read the CPUs Ray assigned: %s", err)
    return os.cpu_count() or 1


class Classifier:
    """An exported model, ready to predict; cheap to call, expensive to construct (load once per process).

    `engine`: "auto" (ONNX Runtime when `model.onnx` is usable, else Keras), "onnxruntime"
    (raises EngineUnavailableError when the file is missing, failed parity or is corrupt) or
    "keras". `threads` overrides ONNX Runtime's intra-op thread count (see `onnx_threads`).
    """

    def __init__(self, model_dir: str | Path, engine: str = "auto", threads: int | None = None):
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
        self.model_dir = Path(model_dir)
        self.card = read_card(self.model_dir)
        self.classes: list[str] = self.card["classes"]
        self.image_size: int = int(self.card["input"]["size"])
        self.version: str = self.card["version"]
        self.provider: str | None = None
        self.threads: int | None = None
        if engine == "keras":
            self._run = self._load_keras()
        else:
            path, reason = onnx_export.usable_file(self.model_dir, self.card)
            if engine == "onnxruntime" and path is None:
                raise EngineUnavailableError(f"cannot use the onnxruntime engine for {self.model_dir}: {reason}")
            self._run = None
            if path is not None:
                try:
                    self._run = self._load_onnxruntime(path, threads)
                except Exception as err:
                    reason = f"ONNX Runtime cannot load {path} ({type(err).__name__}: {err})"
                    if engine == "onnxruntime":
                        raise EngineUnavailableError(f"cannot use the onnxruntime engine: {reason}") from err
            if self._run is None:
                log.warning("%s: using the keras engine because %s", self.model_dir.name, reason)
                self._run = self._load_keras()
        log.info("%s (%s) on %s%s", self.version, self.model_dir, self.engine,
                 f" [{self.provider}, {self.threads} threads]" if self.engine == "onnxruntime" else "")

    def _load_keras(self) -> Callable[[np.ndarray], np.ndarray]:
        import tensorflow as tf

        for gpu in tf.config.list_physical_devices("GPU"):  # before any op, as in training
            try:
                tf.config.experimental.set_memory_growth(gpu, True)
            except RuntimeError:  # already initialised in this process
                pass
        import keras

        model = keras.models.load_model(self.model_dir / MODEL_FILE, compile=False)
        self.engine = "keras"
        return model.predict_on_batch

    def _load_onnxruntime(self, path: Path, threads: int | None) -> Callable[[np.ndarray], np.ndarray]:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or onnx_threads()
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        wanted = ["CPUExecutionProvider"]
        if "CUDAExecutionProvider" in ort.get_available_providers():
            wanted.insert(0, "CUDAExecutionProvider")
        session = ort.InferenceSession(str(path), options, providers=wanted)
        self.provider = session.get_providers()[0]  # what ORT actually uses (CUDA falls back without a GPU)
        self.threads = options.intra_op_num_threads
        self.engine = "onnxruntime"
        input_name, output_name = session.get_inputs()[0].name, session.get_outputs()[0].name
        log.info("ONNX Runtime %s on %s with %d intra-op threads", ort.__version__, self.provider, self.threads)

        def run(batch: np.ndarray) -> np.ndarray:
            return session.run([output_name], {input_name: np.ascontiguousarray(batch, np.float32)})[0]

        return run

    def describe(self) -> dict:
        """What answers: model version, engine, provider and threads (for Serve's model info and logs)."""
        return {"model_version": self.version, "engine": self.engine, "provider": self.provider,
                "threads": self.threads, "classes": list(self.classes), "image_size": self.image_size}

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
        probabilities = np.asarray(self._run(batch), dtype=np.float64) if len(batch) else \
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
