"""The report of one training run: test metrics, confusion matrix, errors by class, training curves, configuration."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from xray_ray.config import flatten
from xray_ray.reports.figures import plot_confusion_matrix, plot_errors_by_class, plot_reliability, plot_training_curves
from xray_ray.reports.html import Image, KeyValues, Links, Metrics, Section, Table, Text, write_html
from xray_ray.reports.metrics import Evaluation
from xray_ray.reports.tables import class_rows, write_classification_report


def write_training_report(folder: str | Path, *, title: str, evaluation: Evaluation, epochs: list[dict],
                          best_epoch: int | None, config: Mapping, note: str | list[str] | None = None,
                          extra: Mapping | None = None, calibration: Mapping | None = None,
                          reliability: Mapping[str, list[dict]] | None = None, ood: Mapping | None = None) -> Path:
    """Write the report folder of one training run; `extra` adds a "Run details" table, `calibration` and
    `reliability` (the card's section and the diagrams' bins, before and after) a calibration section, `ood`
    (the card's section) the out-of-distribution threshold."""
    folder = Path(folder)
    files = write_classification_report(folder, evaluation)
    plot_confusion_matrix(folder / "confusion_matrix.png", evaluation.confusion, evaluation.class_names,
                          f"Confusion matrix ({evaluation.n} images)")
    support = {name: int(evaluation.confusion[i].sum()) for i, name in enumerate(evaluation.class_names)}
    plot_errors_by_class(folder / "errors_by_class.png", evaluation.errors_by_class, support,
                         f"Errors by class ({evaluation.n - int(np.trace(evaluation.confusion))} of {evaluation.n} images)")
    plot_training_curves(folder / "training_curves.png", epochs, "Training progress", best_epoch)
    correct = int(np.trace(evaluation.confusion))
    sections = [
        Section("Summary", [
            Metrics({"Accuracy": f"{evaluation.accuracy:.1%}",
                     "Mean F1 over classes": f"{evaluation.report['macro avg']['f1-score']:.2f}",
                     "Images evaluated": evaluation.n,
                     "Best epoch": f"{best_epoch} of {len(epochs)}" if best_epoch is not None else "–"}),
            Text(f"The model assigned the true class to {correct} of the {evaluation.n} images evaluated."),
        ]),
        Section("Results by class", [
            Table(class_rows(evaluation)),
            Text("Recall (sensitivity): of the images truly in a class, the share the model found. "
                 "Precision: of the images the model put in a class, the share that truly belong there. "
                 "F1 combines the two (1.00 is perfect)."),
        ]),
        Section("Confusion matrix", [
            Image("confusion_matrix.png", "Confusion matrix of true against predicted classes",
                  "Rows are the true class, columns the model's answer; the diagonal holds the correct answers. "
                  "Colour shows the share of each true class."),
        ]),
        Section("Errors by class", [
            Image("errors_by_class.png", "Misclassified images per true class",
                  "For each true class, how many of its images the model put in another class."),
        ]),
        Section("Training progress", [
            Image("training_curves.png", "Loss and accuracy per epoch, training and validation",
                  "The green line and star mark the best epoch (the weights kept); "
                  "dotted lines mark learning-rate reductions."),
        ]),
    ]
    if calibration:
        sections.append(_calibration_section(folder, calibration, reliability or {}))
    if ood:
        sections.append(_ood_section(ood))
    if extra:
        sections.append(Section("Run details", [KeyValues(flatten(extra))]))
    sections.append(Section("Configuration", [KeyValues(flatten(config))]))
    sections.append(Section("Files", [Links({
        "Classification report (text)": files["txt"].name, "Classification report (CSV)": files["csv"].name,
        "Classification report (JSON)": files["json"].name, "Confusion matrix (PNG)": "confusion_matrix.png",
        "Errors by class (PNG)": "errors_by_class.png",
        "Training curves (PNG)": "training_curves.png"})]))
    return write_html(folder / "index.html", title, sections, note)


METRIC_NAMES = {"ece": "ECE", "brier": "Brier score", "nll": "NLL"}


def _calibration_section(folder: Path, calibration: Mapping, reliability: Mapping[str, list[dict]]) -> Section:
    """The calibration's figures before and after, per split, and the reliability diagram."""
    rows = [{"split": split, "when": when, "images": calibration[split]["images"],
             **{METRIC_NAMES[name]: f"{value:.4f}" for name, value in calibration[split][when].items()}}
            for split in ("valid", "test") if split in calibration for when in ("before", "after")]
    method = calibration["method"]
    fitted = {"none": "no rescaling (neither temperature nor vector scaling beat the raw probabilities)",
              "temperature": f"temperature T = {calibration.get('temperature', 1):.3f}",
              "vector": "vector scaling (one weight and bias per class)"}[method]
    blocks = [
        Text(f"Confidence is calibrated with {fitted}, fitted on the validation split and chosen over the "
             f"alternatives by {calibration['chosen_by']}. ECE (expected calibration error) is the average gap "
             "between confidence and accuracy over 15 confidence bins; Brier score and NLL (negative "
             "log-likelihood) measure the whole probability vector; lower is better for all three. The test split "
             "played no part in the fit."),
        Table(rows),
    ]
    if reliability:
        plot_reliability(folder / "reliability.png", reliability, "Reliability on the test split")
        blocks.append(Image("reliability.png", "Reliability diagrams before and after calibration",
                            "Bars are the share of right answers among images whose confidence fell in a bin (count "
                            "at the bottom); on the dashed diagonal, confidence equals accuracy."))
    return Section("Calibrated confidence", blocks)


def _ood_section(ood: Mapping) -> Section:
    """How the out-of-distribution flag was set and how often it fires on in-distribution images."""
    rates = {"Threshold": f"{ood['threshold']:.3f}", "Validation images flagged": f"{ood['valid_flag_rate']:.1%}"}
    if "test_flag_rate" in ood:
        rates["Test images flagged"] = f"{ood['test_flag_rate']:.1%}"
    return Section("Out-of-distribution flag", [
        Metrics(rates),
        Text(f"Score: {ood['method']}. Fitted on the {ood['train_images']} training images; the threshold is set "
             f"so that about {ood['false_flag_target']:.1%} of in-distribution images are flagged by design. A "
             "flagged image still gets a class, marked as out of distribution."),
    ])
