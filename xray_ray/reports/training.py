"""The report of one training run: test metrics, confusion matrix, errors by class, training curves, configuration."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from xray_ray.config import flatten
from xray_ray.reports.figures import plot_confusion_matrix, plot_errors_by_class, plot_training_curves
from xray_ray.reports.html import Image, KeyValues, Links, Metrics, Section, Table, Text, write_html
from xray_ray.reports.metrics import Evaluation
from xray_ray.reports.tables import class_rows, write_classification_report


def write_training_report(folder: str | Path, *, title: str, evaluation: Evaluation, epochs: list[dict],
                          best_epoch: int | None, config: Mapping, note: str | list[str] | None = None,
                          extra: Mapping | None = None) -> Path:
    """Write the report folder of one training run; `extra` adds a "Run details" table."""
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
    if extra:
        sections.append(Section("Run details", [KeyValues(flatten(extra))]))
    sections.append(Section("Configuration", [KeyValues(flatten(config))]))
    sections.append(Section("Files", [Links({
        "Classification report (text)": files["txt"].name, "Classification report (CSV)": files["csv"].name,
        "Classification report (JSON)": files["json"].name, "Confusion matrix (PNG)": "confusion_matrix.png",
        "Errors by class (PNG)": "errors_by_class.png",
        "Training curves (PNG)": "training_curves.png"})]))
    return write_html(folder / "index.html", title, sections, note)
