"""`ModelCard`: the only reader and writer of `model_card.json`, the contract of a model folder.

Serve, scoring, evaluation and export all learn what a model is from here: its class names
in output order, its input size (taken from the network's own input shape at export),
its version, the digests of its files and which engine can run it. A file is used only
after its sha256 matches the card, so a replaced or corrupt `model.keras` or `model.onnx`
is refused instead of answering. Export lays a new card out with `ModelCard.exported` and
saves it with `write`, the same atomic write `update` uses.
"""

from __future__ import annotations

import json
import platform
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from xray_ray.config import CLASS_NAMES, Config, config_to_dict
from xray_ray.files import atomic_write_text, sha256_file

MODEL_FILE = "model.keras"
ONNX_FILE = "model.onnx"
HEAD_FILE = "head.npz"
OOD_FILE = "ood.npz"
GOLDEN_FILE = "golden.npz"
CARD_FILE = "model_card.json"
ENGINES = ("auto", "onnxruntime", "keras")
MIN_INPUT_SIZE, MAX_INPUT_SIZE = 32, 1024
"""Bounds on the card's input size: a card is data, and a huge size would be a memory bomb."""
PREPROCESSING = (
    "xray_ray.images.preprocess: decode to 8-bit grayscale (DICOM modality/VOI LUT, MONOCHROME1 inverted), "
    "pad to square with black, resize bilinear to size x size, replicate to 3 channels, float32 0-255"
)


class EngineUnavailableError(RuntimeError):
    """The engine asked for cannot run this model folder (the message says why)."""


def package_version(package: str) -> str:
    """The installed version of `package`, or "not installed"."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def framework_versions() -> dict[str, str]:
    """Versions of what trained (and will load) the model."""
    packages = ("xray-ray", "tensorflow", "keras", "ray", "numpy", "onnxruntime", "tf2onnx", "onnx")
    return {"python": platform.python_version(), **{name: package_version(name) for name in packages}}


def build_card(name: str, config: Config, *, training: dict, index_fingerprint: str, split_counts: dict,
               synthetic: bool, extra: dict | None = None) -> dict:
    """What the training run knows about the model it exports: its name, its settings (the full config, and
    the model and LRA settings as flat hyperparameters), the run, the index's fingerprint and split counts.

    `export.export_model` hands this to `ModelCard.exported`, which adds the card's own fields and what the exported
    files say (class order, preprocessing, input size, version, digests); metrics come after evaluation.
    """
    settings = config_to_dict(config)
    return {
        "name": name,
        "backbone": config.model.backbone,
        "weights": config.model.weights,
        "hyperparameters": {**settings["model"], **{f"lra_{k}": v for k, v in settings["lra"].items()}},
        "config": settings,
        "training": training,
        "index_fingerprint": index_fingerprint,
        "split_counts": split_counts,
        "synthetic_data": synthetic,
        **(extra or {}),
    }


class ModelCard:
    """An exported model folder's card: read once, checked, and asked instead of the raw JSON."""

    def __init__(self, folder: str | Path, data: dict) -> None:
        self.folder = Path(folder)
        self.data = data

    @classmethod
    def read(cls, folder: str | Path) -> ModelCard:
        """The card of `folder`, with a clear error when it is not an exported model or is malformed."""
        path = Path(folder) / CARD_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{folder} is not an exported model: {CARD_FILE} is missing")
        try:
            data = json.loads(path.read_text())
        except ValueError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path} does not hold a JSON object")
        card = cls(folder, data)
        card.check()
        return card

    def check(self) -> None:
        """Raise ValueError for a card no engine should trust: wrong classes, a bad input size."""
        if self.data.get("classes") != list(CLASS_NAMES):
            raise ValueError(f"{self.folder / CARD_FILE}: classes {self.data.get('classes')} are not {list(CLASS_NAMES)}")
        size = self.data.get("input", {}).get("size")
        if not isinstance(size, int) or isinstance(size, bool) or not MIN_INPUT_SIZE <= size <= MAX_INPUT_SIZE:
            raise ValueError(f"{self.folder / CARD_FILE}: input size {size!r} is not a whole number in "
                             f"[{MIN_INPUT_SIZE}, {MAX_INPUT_SIZE}]")
        if not isinstance(self.data.get("version"), str):
            raise ValueError(f"{self.folder / CARD_FILE}: no model version")

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    @property
    def classes(self) -> list[str]:
        return list(self.data["classes"])

    @property
    def image_size(self) -> int:
        return int(self.data["input"]["size"])

    @property
    def version(self) -> str:
        return self.data["version"]

    @property
    def name(self) -> str:
        return self.data["name"]

    @property
    def synthetic(self) -> bool:
        return bool(self.data.get("synthetic_data", False))

    def baseline(self) -> dict:
        """What a night's archive is compared with (scoring's drift check): the class counts of every split
        the model was trained and evaluated on (before undersampling), and the share of its held-out
        images the out-of-distribution check flagged (test, else validation; None before OOD existed)."""
        splits = self.data.get("split_counts") or {}
        ood = self.data.get("ood") or {}
        rate = ood.get("test_flag_rate", ood.get("valid_flag_rate"))
        return {"class_counts": {name: sum(int(split.get(name, 0)) for split in splits.values())
                                 for name in self.classes},
                "ood_rate": None if rate is None else float(rate)}

    def verified_file(self, name: str) -> Path:
        """The path of a model file whose sha256 matches the card's; ValueError otherwise."""
        path = self.folder / name
        expected = self.data.get("files", {}).get(name, {}).get("sha256")
        if not expected:
            raise ValueError(f"the model card records no sha256 for {name}")
        if not path.is_file():
            raise ValueError(f"{name} is missing from {self.folder}")
        digest = sha256_file(path)
        if digest != expected:
            raise ValueError(f"{path} is corrupt or was replaced: its sha256 {digest[:12]}... does not match "
                             f"the card's {expected[:12]}...")
        return path

    def onnx_file(self) -> tuple[Path | None, str]:
        """(path to a usable, verified model.onnx, '') or (None, why it cannot be used)."""
        section = self.data.get("onnx")
        if not section:
            return None, "the model card has no ONNX export (exported before ONNX support, or without it)"
        if not section.get("usable"):
            return None, f"the model card marks {ONNX_FILE} unusable: {section.get('reason', 'no reason given')}"
        try:
            return self.verified_file(ONNX_FILE), ""
        except ValueError as err:
            return None, str(err)

    def choose_engine(self, engine: str = "auto") -> tuple[str, Path, str]:
        """(engine, verified file, why ONNX Runtime is not used or '') for `engine` auto, onnxruntime or keras.

        auto takes ONNX Runtime when `model.onnx` is usable and falls back to Keras; either
        way the file is checked against the card. EngineUnavailableError when nothing can run.
        """
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
        reason = ""
        if engine != "keras":
            path, reason = self.onnx_file()
            if path is not None:
                return "onnxruntime", path, ""
            if engine == "onnxruntime":
                raise EngineUnavailableError(f"cannot use the onnxruntime engine for {self.folder}: {reason}")
        try:
            return "keras", self.verified_file(MODEL_FILE), reason
        except ValueError as err:
            raise EngineUnavailableError(f"cannot use the keras engine for {self.folder}: {err}"
                                         + (f"; and {reason}" if reason else "")) from None

    @classmethod
    def exported(cls, folder: str | Path, description: dict, *, input_size: int, pooling: str,
                 onnx: dict | None = None) -> ModelCard:
        """The card of a model whose files were just written into `folder` (not yet written itself: `write`).

        `description` says what training knows (`build_card`: name, config, data, run).
        The card adds what it owns: the class order, the preprocessing, the framework
        versions, an empty `metrics` until evaluation; and what only the exported files can
        say: the input size (the network's own), the version (name, time, model digest), the
        digests of `model.keras`, `head.npz` and a converted `model.onnx`, the pooling, and
        the ONNX section with its warning, if any, added to `warnings`.
        """
        folder = Path(folder)
        created = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        digest = sha256_file(folder / MODEL_FILE)
        data = {"metrics": {}, **description, "classes": list(CLASS_NAMES), "preprocessing": PREPROCESSING,
                "versions": framework_versions(),
                "input": {"size": input_size, "channels": 3, "dtype": "float32", "range": [0, 255]},
                "version": f"{description['name']}-{created}-{digest[:8]}", "created_at": created,
                "files": {MODEL_FILE: {"sha256": digest}, HEAD_FILE: {"sha256": sha256_file(folder / HEAD_FILE)}},
                "pooling": pooling}
        if onnx is not None:
            data["onnx"] = onnx
            if "sha256" in onnx:
                data["files"][ONNX_FILE] = {"sha256": onnx["sha256"]}
            if onnx.get("warning"):
                data["warnings"] = [*data.get("warnings", []), onnx["warning"]]
        return cls(folder, data)

    def write(self) -> None:
        """Write the card as `model_card.json` in its folder, atomically and durably (`files.atomic_write_text`)."""
        atomic_write_text(self.folder / CARD_FILE, json.dumps(self.data, indent=2))

    def update(self, **fields: Any) -> ModelCard:
        """Add or replace top-level fields (e.g. metrics after evaluation) and write the card atomically."""
        self.data = {**self.data, **fields}
        self.write()
        return self

    def public(self) -> dict:
        """What may be shown to any client: version, classes, metrics and settings; no paths, no full config."""
        keep = ("name", "version", "created_at", "classes", "input", "preprocessing", "backbone", "weights",
                "hyperparameters", "metrics", "calibration", "ood", "synthetic_data", "versions", "split_counts",
                "index_fingerprint", "golden")
        shown = {key: self.data[key] for key in keep if key in self.data}
        shown["files"] = {name: {"sha256": entry.get("sha256")} for name, entry in self.data.get("files", {}).items()}
        if "onnx" in self.data:
            shown["onnx"] = {k: v for k, v in self.data["onnx"].items() if k in ("usable", "opset", "parity", "converter")}
        if "tune" in self.data:
            shown["tune"] = {k: v for k, v in self.data["tune"].items() if k != "storage_path"}
        return shown
