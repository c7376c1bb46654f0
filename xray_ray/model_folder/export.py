"""The exported model folder: `model.keras`, `model.onnx` and `model_card.json`, written as one unit.

Serve, scoring and evaluation read only this folder, so the card carries everything they
need to reproduce the training-time input (class order, input size, preprocessing) and
everything a reviewer needs to trust a number (data fingerprint, metrics, versions). The
ONNX conversion and its parity check live in `onnx_export` (their figures go in the card);
the card is laid out, written and read back only by `card.ModelCard`, and the folder is
written through `files.atomic_folder`.
"""

from __future__ import annotations

from pathlib import Path

from xray_ray.files import atomic_folder
from xray_ray.model_folder.card import HEAD_FILE, MODEL_FILE, ModelCard
from xray_ray.model_folder.graph import pooling_kind, save_head
from xray_ray.model_folder.onnx_export import export_onnx


def export_model(model, folder: str | Path, card: dict, overwrite: bool = False, onnx: bool = True) -> dict:
    """Write the model, its ONNX conversion and its card into `folder` atomically; returns the card with its version.

    `card` is `card.build_card`'s description. An existing folder is replaced only with
    `overwrite`, so a re-run never silently destroys an earlier model. The card's `onnx`
    section says whether `model.onnx` passed its parity check (`usable`); a failed
    conversion or parity check is logged as a warning and listed under `warnings`, and the
    Keras export stands either way.
    """
    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise FileExistsError(f"{folder} already exists: choose another name or pass --overwrite")
    with atomic_folder(folder) as staging:
        model.save(staging / MODEL_FILE)
        save_head(model, staging / HEAD_FILE)
        size = int(model.input_shape[1])  # the network's own input: the one source of the size
        written = ModelCard.exported(staging, card, input_size=size, pooling=pooling_kind(model),
                                     onnx=export_onnx(model, staging, size) if onnx else None)
        written.write()
    return written.data
