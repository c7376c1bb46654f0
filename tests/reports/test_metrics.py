"""Metrics on a labelled set: accuracy, report, confusion matrix, errors and bad input."""

import json

import numpy as np
import pytest

from xray_ray.config import CLASS_NAMES
from xray_ray.reports.metrics import Evaluation, evaluate


def one_hot(labels, class_names=CLASS_NAMES, confidence=0.7):
    """Probabilities that put `confidence` on each given label and share the rest."""
    k = len(class_names)
    probs = np.full((len(labels), k), (1 - confidence) / (k - 1))
    probs[np.arange(len(labels)), [class_names.index(label) for label in labels]] = confidence
    return probs


@pytest.mark.parametrize(
    "labels",
    [
        list(CLASS_NAMES),
        list(CLASS_NAMES) * 5,
        ["Normal"],
        ["COVID", "COVID", "Viral Pneumonia"],
    ],
)
def test_perfect_predictions(labels):
    ev = evaluate(labels, one_hot(labels))
    assert isinstance(ev, Evaluation)
    assert ev.accuracy == 1.0 and ev.n == len(labels)
    assert ev.y_pred == labels and ev.y_true == labels
    assert np.allclose(ev.confidence, 0.7)
    assert ev.confusion.dtype.kind == "i" and ev.confusion.shape == (4, 4)
    assert np.array_equal(ev.confusion, np.diag([labels.count(c) for c in CLASS_NAMES]))
    assert ev.errors_by_class == dict.fromkeys(CLASS_NAMES, 0)
    for name in set(labels):
        assert ev.report[name]["recall"] == ev.report[name]["precision"] == 1.0


def test_known_confusion():
    y_true = ["COVID", "COVID", "COVID", "Normal", "Normal", "Lung_Opacity", "Viral Pneumonia", "Viral Pneumonia"]
    y_pred = ["COVID", "Normal", "Lung_Opacity", "Normal", "Normal", "Lung_Opacity", "Viral Pneumonia", "COVID"]
    ev = evaluate(y_true, one_hot(y_pred))
    expected = np.array(
        [
            [1, 1, 1, 0],  # COVID: one right, one called Lung_Opacity, one called Normal
            [0, 1, 0, 0],
            [0, 0, 2, 0],
            [1, 0, 0, 1],
        ]
    )
    assert np.array_equal(ev.confusion, expected)
    assert ev.accuracy == pytest.approx(5 / 8)
    assert ev.y_pred == y_pred
    assert ev.errors_by_class == {"COVID": 2, "Lung_Opacity": 0, "Normal": 0, "Viral Pneumonia": 1}
    assert ev.report["COVID"] == pytest.approx({"precision": 0.5, "recall": 1 / 3, "f1-score": 0.4, "support": 3})
    assert ev.report["accuracy"] == pytest.approx(5 / 8)
    assert set(ev.report) == {*CLASS_NAMES, "accuracy", "macro avg", "weighted avg"}


@pytest.mark.parametrize("absent", CLASS_NAMES)
def test_absent_class_has_zero_support(absent):
    labels = [c for c in CLASS_NAMES if c != absent] * 2
    ev = evaluate(labels, one_hot(labels))
    assert ev.report[absent] == {"precision": 0.0, "recall": 0.0, "f1-score": 0.0, "support": 0}
    i = CLASS_NAMES.index(absent)
    assert ev.confusion[i].sum() == 0 and ev.confusion[:, i].sum() == 0
    assert ev.errors_by_class[absent] == 0
    assert [row["label"] for row in ev.report_rows()] == [*CLASS_NAMES, "macro avg", "weighted avg"]


def test_predicting_an_absent_class_counts_as_an_error():
    labels = ["Normal"] * 4
    ev = evaluate(labels, one_hot(["Normal", "Normal", "COVID", "Viral Pneumonia"]))
    assert ev.errors_by_class == {"COVID": 0, "Lung_Opacity": 0, "Normal": 2, "Viral Pneumonia": 0}
    assert ev.report["COVID"]["precision"] == 0.0 and ev.report["COVID"]["support"] == 0
    assert ev.accuracy == 0.5


def test_custom_class_names():
    ev = evaluate(["cat", "dog", "dog"], [[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]], class_names=("cat", "dog"))
    assert ev.confusion.tolist() == [[1, 0], [1, 1]]
    assert ev.errors_by_class == {"cat": 0, "dog": 1}
    assert ev.class_names == ("cat", "dog")


@pytest.mark.parametrize(
    "y_true, probs, message",
    [
        (["Pneumonia"], np.full((1, 4), 0.25), "unknown label"),
        (["covid"], np.full((1, 4), 0.25), "unknown label"),
        (["COVID", "Normal"], np.full((1, 4), 0.25), "2 labels but probabilities has 1 rows"),
        (["COVID"], np.full((1, 3), 1 / 3), r"shape \(N, 4\)"),
        (["COVID"], np.full(4, 0.25), r"shape \(N, 4\)"),
        ([], np.zeros((0, 4)), "nothing to evaluate"),
        (["COVID"], np.array([[np.nan, 0.5, 0.25, 0.25]]), "NaN"),
        ("COVID", np.full((5, 4), 0.25), "list of label strings"),
    ],
)
def test_bad_input_raises_a_clear_error(y_true, probs, message):
    with pytest.raises(ValueError, match=message):
        evaluate(y_true, probs)


def test_as_dict_is_json_ready_and_text_report_has_accuracy():
    labels = ["COVID", "Normal", "Normal", "Lung_Opacity"]
    ev = evaluate(labels, one_hot(["COVID", "Normal", "COVID", "Lung_Opacity"]))
    data = json.loads(json.dumps(ev.as_dict(), allow_nan=False))
    assert data["class_names"] == list(CLASS_NAMES)
    assert data["n"] == 4 and data["accuracy"] == 0.75
    assert data["confusion"][2] == [1, 0, 1, 0]
    assert data["errors_by_class"]["Normal"] == 1
    assert data["report"]["Viral Pneumonia"]["support"] == 0
    text = ev.report_text()
    assert "Viral Pneumonia" in text and "macro avg" in text
    assert "Accuracy: 75.0% (3 of 4 correct)" in text
