"""Metrics of a classifier on a labelled set: accuracy, per-class report, confusion matrix.

Training, tuning and nightly scoring all judge a model the same way: they pass the true
labels and the model's (N, 4) class probabilities to `evaluate`, and hand the resulting
`Evaluation` to `xray_ray.reports` to be written out. The prediction is the most probable
class; classes are always reported in the canonical order of `CLASS_NAMES`, even when a
class is absent from the set (its support is then 0), so reports from different runs line
up row for row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from sklearn.metrics import classification_report, confusion_matrix

from xray_ray.config import CLASS_NAMES


@dataclass
class Evaluation:
    """The metrics of one model on one labelled set (rows of `confusion` = true class)."""

    accuracy: float
    report: dict  # sklearn's classification_report(output_dict=True), support as int
    confusion: np.ndarray  # (K, K) int, rows = true class, columns = predicted class
    errors_by_class: dict[str, int]  # true class -> images of it that were misclassified
    y_true: list[str]
    y_pred: list[str]
    confidence: np.ndarray  # (N,) probability of the predicted class
    n: int
    class_names: tuple[str, ...] = CLASS_NAMES

    def as_dict(self) -> dict:
        """A JSON-ready summary (no per-image lists): what `classification_report.json` holds."""
        return {
            "class_names": list(self.class_names),
            "n": self.n,
            "accuracy": self.accuracy,
            "report": self.report,
            "confusion": self.confusion.tolist(),
            "errors_by_class": dict(self.errors_by_class),
        }

    def report_text(self) -> str:
        """sklearn's plain-text report followed by a one-line accuracy with counts."""
        index = {name: i for i, name in enumerate(self.class_names)}
        text = classification_report(
            [index[label] for label in self.y_true],
            [index[label] for label in self.y_pred],
            labels=list(range(len(self.class_names))),
            target_names=list(self.class_names),
            digits=3,
            zero_division=0,
        )
        correct = int(np.trace(self.confusion))
        return f"{text.rstrip()}\n\nAccuracy: {self.accuracy:.1%} ({correct} of {self.n} correct)\n"

    def report_rows(self) -> list[dict]:
        """One row per class, then the macro and weighted averages (for CSV and HTML tables)."""
        rows = []
        for label in [*self.class_names, "macro avg", "weighted avg"]:
            entry = self.report[label]
            rows.append({"label": label, **{key: entry[key] for key in ("precision", "recall", "f1-score", "support")}})
        return rows


def _check_inputs(y_true: Sequence[str], probabilities, class_names: tuple[str, ...]) -> tuple[list[str], np.ndarray]:
    """Return the labels as strings and the probabilities as a float array, or raise ValueError."""
    if not class_names or len(set(class_names)) != len(class_names):
        raise ValueError(f"class_names must be non-empty and unique, got {class_names!r}")
    if isinstance(y_true, (str, bytes)):
        raise ValueError("y_true must be a list of label strings, not a single string")
    labels = [str(label) for label in y_true]
    probs = np.asarray(probabilities, dtype=float)
    k = len(class_names)
    if probs.ndim != 2 or probs.shape[1] != k:
        raise ValueError(f"probabilities must have shape (N, {k}), got {probs.shape}")
    if probs.shape[0] != len(labels):
        raise ValueError(f"y_true has {len(labels)} labels but probabilities has {probs.shape[0]} rows")
    if not labels:
        raise ValueError("nothing to evaluate: y_true and probabilities are empty")
    if not np.isfinite(probs).all():
        raise ValueError("probabilities contain NaN or infinite values")
    unknown = sorted(set(labels) - set(class_names))
    if unknown:
        raise ValueError(
            f"unknown label(s) {unknown}; expected one of {list(class_names)} "
            "(map folder names with xray_ray.config.canonical_label first)"
        )
    return labels, probs


def evaluate(y_true: Sequence[str], probabilities, class_names: Sequence[str] = CLASS_NAMES) -> Evaluation:
    """Score (N, K) class probabilities against N true labels; the prediction is the argmax."""
    names = tuple(class_names)
    labels, probs = _check_inputs(y_true, probabilities, names)
    k = len(names)
    true_idx = np.array([names.index(label) for label in labels])
    pred_idx = probs.argmax(axis=1)
    confusion = confusion_matrix(true_idx, pred_idx, labels=list(range(k))).astype(np.int64)
    report = classification_report(
        true_idx,
        pred_idx,
        labels=list(range(k)),
        target_names=list(names),
        output_dict=True,
        zero_division=0,
    )
    report = {
        key: {m: (int(v) if m == "support" else float(v)) for m, v in value.items()} if isinstance(value, dict) else float(value)
        for key, value in report.items()
    }
    return Evaluation(
        accuracy=float(np.trace(confusion) / len(labels)),
        report=report,
        confusion=confusion,
        errors_by_class={name: int(confusion[i].sum() - confusion[i, i]) for i, name in enumerate(names)},
        y_true=labels,
        y_pred=[names[i] for i in pred_idx],
        confidence=probs.max(axis=1),
        n=len(labels),
        class_names=names,
    )


def evaluate_files(classifier, frame) -> Evaluation:
    """Classify the files of a labelled index part (path, label) and score the answers.

    Files that no longer decode are left out of the metrics and logged by the caller's
    index; the classifier is the exported model, so the figures describe what ships.
    """
    probabilities, errors = classifier.predict_files(list(frame["path"]))
    usable = [i for i, error in enumerate(errors) if not error]
    return evaluate([frame["label"].iloc[i] for i in usable], probabilities[usable])
