"""`xray-ray evaluate`: an exported model on a split of an index, with the split its card's seed defines."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from xray_ray.config import Config, with_overrides
from xray_ray.images.index import fingerprint
from xray_ray.model_folder.card import ModelCard
from xray_ray.model_folder.classifier import Classifier
from xray_ray.reports.figures import plot_confusion_matrix
from xray_ray.reports.metrics import Evaluation, evaluate_files
from xray_ray.reports.tables import write_classification_report
from xray_ray.training.data import split_index


def evaluate_model(model: str | Path, frame: pd.DataFrame, split: str, report_dir: str | Path) -> tuple[Evaluation, ModelCard, bool]:
    """Classify `split` (train, valid, test, or all readable rows) and write the report files.

    Returns the evaluation, the card, and whether the index is the one the model was
    trained on (otherwise the parts are not the training ones). ValueError for a bad split.
    """
    card = ModelCard.read(model)
    data = card["config"]["data"]
    cfg = with_overrides(Config(), {"data.split": data["split"], "data.seed": data["seed"]}).data
    part = frame[frame["readable"]] if split == "all" else split_index(frame, cfg.split, cfg.seed).part(split)
    evaluation = evaluate_files(Classifier(model), part)
    folder = Path(report_dir)
    write_classification_report(folder, evaluation)
    plot_confusion_matrix(folder / "confusion_matrix.png", evaluation.confusion, evaluation.class_names,
                          f"{card.name} on {split} ({evaluation.n} images)")
    return evaluation, card, fingerprint(frame) == card["index_fingerprint"]
