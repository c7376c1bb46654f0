"""The exported model folder: `model.keras`, `model.onnx` and `model_card.json`, written as one unit.

Serve, scoring and evaluation read only this folder, so the card carries everything they
need to reproduce the training-time input (class order, input size, preprocessing) and
everything a reviewer needs to trust a number (data fingerprint, metrics, versions). The
ONNX conversion and its parity check live in `onnx_export`; their figures go in the card.
"""

from __future__ import annotations

import json
import platform
import shutil
import tempfile
import time
from importlib import metadata
from pathlib import Path

from xray_ray.config import CLASS_NAMES, Config, config_to_dict
from xray_ray.files import atomic_write_text, sha256_hex
from xray_ray.onnx_export import ONNX_FILE, export_onnx

MODEL_FILE = "model.keras"
CARD_FILE = "model_card.json"
PREPROCESSING = (
    "xray_ray.imaging.preprocess: decode to 8-bit grayscale (DICOM modality/VOI LUT, MONOCHROME1 inverted), "
    "pad to square with black, resize bilinear to size x size, replicate to 3 channels, float32 0-255"
)


def framework_versions() -> dict[str, str]:
    """Versions of what trained (and will load) the model."""
    versions = {"python": platform.python_version()}
    for package in ("xray-ray", "tensorflow", "keras", "ray", "numpy", "onnxruntime", "tf2onnx", "onnx"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def build_card(name: str, config: Config, *, training: dict, index_fingerprint: str, split_counts: dict,
               synthetic: bool, extra: dict | None = None) -> dict:
    """The card's contents known at export time; metrics are added once the export is evaluated."""
    return {
        "name": name,
        "classes": list(CLASS_NAMES),
        "input": {"size": config.data.image_size, "channels": 3, "dtype": "float32", "range": [0, 255]},
        "preprocessing": PREPROCESSING,
        "backbone": config.model.backbone,
        "weights": config.model.weights,
        "hyperparameters": {**config_to_dict(config)["model"], **{f"lra_{k}": v for k, v in config_to_dict(config)["lra"].items()}},
        "config": config_to_dict(config),
        "training": training,
        "index_fingerprint": index_fingerprint,
        "split_counts": split_counts,
        "synthetic_data": synthetic,
        "metrics": {},
        "versions": framework_versions(),
        **(extra or {}),
    }


def export_model(model, folder: str | Path, card: dict, overwrite: bool = False, onnx: bool = True) -> dict:
    """Write the model, its ONNX conversion and its card into `folder` atomically; returns the card with its version.

    An existing folder is replaced only with `overwrite`, so a re-run never silently
    destroys an earlier model. The card's `onnx` section says whether `model.onnx` passed
    its parity check (`usable`); a failed conversion or parity check is logged as a
    warning and listed under `warnings`, and the Keras export stands either way.
    """
    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise FileExistsError(f"{folder} already exists: choose another name or pass --overwrite")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        model.save(staging / MODEL_FILE)
        digest = sha256_hex((staging / MODEL_FILE).read_bytes())
        created = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        card = {**card, "version": f"{card['name']}-{created}-{digest[:8]}", "created_at": created,
                "files": {MODEL_FILE: {"sha256": digest}}}
        if onnx:
            section = export_onnx(model, staging, int(card["input"]["size"]))
            card["onnx"] = section
            if "sha256" in section:
                card["files"][ONNX_FILE] = {"sha256": section["sha256"]}
            if section.get("warning"):
                card["warnings"] = [*card.get("warnings", []), section["warning"]]
        (staging / CARD_FILE).write_text(json.dumps(card, indent=2))
        if folder.exists():
            retired = folder.with_name(f".{folder.name}.replaced")
            shutil.rmtree(retired, ignore_errors=True)
            folder.rename(retired)
            staging.rename(folder)
            shutil.rmtree(retired)
        else:
            staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return card


def read_card(folder: str | Path) -> dict:
    """The model card of an exported folder, with a clear error when it is not one."""
    path = Path(folder) / CARD_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not an exported model: {CARD_FILE} is missing")
    card = json.loads(path.read_text())
    if card.get("classes") != list(CLASS_NAMES):
        raise ValueError(f"{path}: classes {card.get('classes')} are not {list(CLASS_NAMES)}")
    return card


def update_card(folder: str | Path, **fields) -> dict:
    """Add or replace top-level card fields (e.g. metrics after evaluation), atomically."""
    card = {**read_card(folder), **fields}
    atomic_write_text(Path(folder) / CARD_FILE, json.dumps(card, indent=2))
    return card
