"""`xray-ray evaluate` and `xray-ray refit`: an exported model on the splits its card's seed defines.

`evaluate` measures one split. `refit` fits the calibration and out-of-distribution detector of
a folder again on the index it was trained on, without retraining: the way forward for a folder
exported by an xray-ray whose `ood.npz` layout this one no longer reads.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from xray_ray.config import Config, with_overrides
from xray_ray.images.index import fingerprint
from xray_ray.model_folder.card import ModelCard
from xray_ray.model_folder.classifier import Classifier
from xray_ray.model_folder.reliability import fit_and_measure
from xray_ray.reports.figures import plot_confusion_matrix
from xray_ray.reports.metrics import Evaluation, evaluate_files
from xray_ray.reports.tables import write_classification_report
from xray_ray.training.data import SPLITS, Split, split_index


def card_split(card: ModelCard, frame: pd.DataFrame) -> Split:
    """`frame` split as the model's training split it: the fractions and seed recorded in its card."""
    data = card["config"]["data"]
    cfg = with_overrides(Config(), {"data.split": data["split"], "data.seed": data["seed"]}).data
    return split_index(frame, cfg.split, cfg.seed)


def evaluate_model(model: str | Path, frame: pd.DataFrame, split: str, report_dir: str | Path) -> tuple[Evaluation, ModelCard, bool]:
    """Classify `split` (train, valid, test, or all readable rows) and write the report files.

    Returns the evaluation, the card, and whether the index is the one the model was
    trained on (otherwise the parts are not the training ones). ValueError for a bad split.
    """
    card = ModelCard.read(model)
    part = frame[frame["readable"]] if split == "all" else card_split(card, frame).part(split)
    evaluation = evaluate_files(Classifier(model), part)
    folder = Path(report_dir)
    write_classification_report(folder, evaluation)
    plot_confusion_matrix(folder / "confusion_matrix.png", evaluation.confusion, evaluation.class_names,
                          f"{card.name} on {split} ({evaluation.n} images)")
    return evaluation, card, fingerprint(frame) == card["index_fingerprint"]


def refit_model(model: str | Path, frame: pd.DataFrame) -> ModelCard:
    """Fit `model`'s calibration and out-of-distribution detector again on its own training index, and record
    them and the valid and test metrics in its card, as its export did; the network is not touched.

    ValueError when `frame` is not the index the model was trained on (its fingerprint differs): fitted on
    other splits, the detector would call some training images new and the calibration would be measured
    on images it was fitted on.
    """
    card = ModelCard.read(model)
    given = fingerprint(frame)
    if given != card["index_fingerprint"]:
        raise ValueError(f"this index is not the one {card.version} was trained on (fingerprint {given[:12]}, "
                         f"the card records {str(card['index_fingerprint'])[:12]}): refit it with that index")
    split = card_split(card, frame)
    refitted, _, _ = fit_and_measure(model, *(split.part(name) for name in SPLITS))
    return refitted
