"""The exported model folder: `model.keras`, `model.onnx` and `model_card.json`, written as one unit.

Serve, scoring and evaluation read only this folder, so the card carries everything they
need to reproduce the training-time input (class order, input size, preprocessing) and
everything a reviewer needs to trust a number (data fingerprint, metrics, versions). The
ONNX conversion and its parity check live in `onnx_export` (their figures go in the card);
the card is read back only through `card.ModelCard`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

from xray_ray.config import CLASS_NAMES, Config, config_to_dict
from xray_ray.files import current_umask, fsync_folder, sha256_file
from xray_ray.model_folder.card import CARD_FILE, HEAD_FILE, MODEL_FILE, ONNX_FILE, PREPROCESSING, framework_versions
from xray_ray.model_folder.graph import pooling_kind, save_head
from xray_ray.model_folder.onnx_export import export_onnx


def build_card(name: str, config: Config, *, training: dict, index_fingerprint: str, split_counts: dict,
               synthetic: bool, extra: dict | None = None) -> dict:
    """The card's contents known before export; `export_model` adds the input size from the network itself,
    the version and the file digests, and metrics are added once the export is evaluated."""
    lra = config_to_dict(config)["lra"]
    return {
        "name": name,
        "classes": list(CLASS_NAMES),
        "preprocessing": PREPROCESSING,
        "backbone": config.model.backbone,
        "weights": config.model.weights,
        "hyperparameters": {**config_to_dict(config)["model"], **{f"lra_{k}": v for k, v in lra.items()}},
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
        digest = sha256_file(staging / MODEL_FILE)
        created = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        size = int(model.input_shape[1])  # the network's own input: the one source of the size
        card = {**card, "input": {"size": size, "channels": 3, "dtype": "float32", "range": [0, 255]},
                "version": f"{card['name']}-{created}-{digest[:8]}", "created_at": created,
                "files": {MODEL_FILE: {"sha256": digest}}, "pooling": pooling_kind(model)}
        save_head(model, staging / HEAD_FILE)
        card["files"][HEAD_FILE] = {"sha256": sha256_file(staging / HEAD_FILE)}
        if onnx:
            section = export_onnx(model, staging, size)
            card["onnx"] = section
            if "sha256" in section:
                card["files"][ONNX_FILE] = {"sha256": section["sha256"]}
            if section.get("warning"):
                card["warnings"] = [*card.get("warnings", []), section["warning"]]
        (staging / CARD_FILE).write_text(json.dumps(card, indent=2))
        for path in staging.iterdir():
            path.chmod(0o666 & ~current_umask())
        fsync_folder(staging)
        if folder.exists():
            retired = folder.with_name(f".{folder.name}.replaced")
            shutil.rmtree(retired, ignore_errors=True)
            folder.rename(retired)
            staging.rename(folder)
            shutil.rmtree(retired)
        else:
            staging.rename(folder)
        fsync_folder(folder.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return card
