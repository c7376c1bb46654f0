"""Heat maps for the scoring report: a thumbnail and a Grad-CAM overlay for the images a reviewer opens first.

After a run, on the driver, the model folder is loaded once (ONNX Runtime where usable,
no TensorFlow) and at most `limit` images of the review list are re-read and explained:
the least sure answers and each class's most confident ones, shared out in turn so no
group takes every place. Each image gets two PNGs of at most 256 px under
`report/explain/`, named by the sha256 of the file's content (never by its name, which
may carry a patient's), and only when that content still has the hash the run recorded.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from xray_ray.files import atomic_write_bytes, sha256_hex
from xray_ray.images.decode import ImageDecodeError, decode, read_bytes
from xray_ray.images.overlay import MAX_DISPLAY, display_square, heat_map_png, png
from xray_ray.images.preprocess import preprocess
from xray_ray.model_folder.classifier import Classifier
from xray_ray.model_folder.gradcam import explain
from xray_ray.reports.html import Card, Gallery, Text

log = logging.getLogger(__name__)

EXPLAIN_DIR = "explain"
"""Folder beside index.html holding the thumbnails and heat maps."""
BATCH = 16


def pick(review_rows: pd.DataFrame, limit: int) -> pd.DataFrame:
    """At most `limit` rows of the review list, one per image content, taken in turn from each group
    (`why`: low confidence, most confident <class>) in the list's order."""
    groups = [group for _, group in review_rows.groupby("why", sort=False)]
    chosen, seen = [], set()
    for rank in range(max((len(g) for g in groups), default=0)):
        for group in groups:
            if rank < len(group) and len(chosen) < limit and (sha := group["sha256"].iloc[rank]) not in seen:
                seen.add(sha)
                chosen.append(group.iloc[rank])
    return pd.DataFrame(chosen, columns=review_rows.columns)


def _load(row: pd.Series) -> np.ndarray | str:
    """The decoded image of a review row, or why it cannot be shown."""
    try:
        data = read_bytes(row["path"])
        if sha256_hex(data) != row["sha256"]:
            return "the file changed after it was scored"
        return decode(data)
    except ImageDecodeError as err:
        return f"unreadable now: {err.reason}"


def write_explanations(report: Path, review_rows: pd.DataFrame, model: str | None, version: str, engine: str,
                       limit: int) -> tuple[list[dict], str]:
    """Write the heat maps of up to `limit` review rows; returns one row per image shown and a note for the page.

    Each row: why, file, predicted class, confidence, image and heat map (paths relative to `report`).
    """
    if limit < 1:
        return [], "Heat maps were not drawn for this run (--explain 0)."
    if not model:
        return [], "Heat maps need the model folder: this run scored through Serve without --model."
    classifier = Classifier(model, engine=engine)
    if classifier.version != version:
        return [], f"Heat maps not drawn: the model folder holds {classifier.version}, the run used {version}."
    chosen = pick(review_rows, limit)
    loaded = [_load(row) for _, row in chosen.iterrows()]
    skipped = [f"{row['file']}: {image}" for (_, row), image in zip(chosen.iterrows(), loaded) if isinstance(image, str)]
    usable = [(row, image) for (_, row), image in zip(chosen.iterrows(), loaded) if not isinstance(image, str)]
    shown = []
    for start in range(0, len(usable), BATCH):
        part = usable[start:start + BATCH]
        batch = np.stack([preprocess(image, classifier.image_size) for _, image in part])
        result = explain(classifier, batch, [row["predicted class"] for row, _ in part])
        for (row, image), heat in zip(part, result.heatmaps):
            square = display_square(image, MAX_DISPLAY)
            names = {"image": f"{EXPLAIN_DIR}/{row['sha256']}.png", "heat map": f"{EXPLAIN_DIR}/{row['sha256']}-gradcam.png"}
            atomic_write_bytes(report / names["image"], png(square))
            atomic_write_bytes(report / names["heat map"], heat_map_png(square, heat))
            shown.append({"why": row["why"], "file": row["file"], "predicted class": row["predicted class"],
                          "confidence": float(row["confidence"]), **names})
    log.info("%d heat maps drawn (%s)%s", len(shown), classifier.engine, f"; {len(skipped)} skipped" if skipped else "")
    note = (f"Heat maps (Grad-CAM, {classifier.engine}) for {len(shown)} of the {len(review_rows)} images to review, "
            f"at most {limit} per run. Warm colours mark where the model found the evidence for its answer; "
            "they show what the model looked at, not where a finding is.")
    if skipped:
        note += " Not shown: " + "; ".join(skipped) + "."
    return shown, note


def gallery_blocks(shown: list[dict], note: str) -> list:
    """The report's blocks for the heat maps: the note, then one card per image (thumbnail, heat map, caption)."""
    cards = [Card([(row["image"], f"Thumbnail of {row['file']}"),
                   (row["heat map"], f"Heat map of the model's evidence for {row['predicted class']}")],
                  f"{row['file']}\n{row['predicted class']}, confidence {row['confidence']:.2f} ({row['why']})")
             for row in shown]
    return [Text(note), Gallery(cards)] if cards else [Text(note)]
