"""The scoring report keeps out-of-distribution images apart: listed first, out of the counts and the accuracy."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from xray_ray.config import CLASS_NAMES
from xray_ray.scoring.pipeline import PREDICTION_COLUMNS, PROBABILITY_COLUMNS
from xray_ray.scoring.report import write_report


def _rows(archive) -> pd.DataFrame:
    """Six scored images in class folders: four in distribution (three right), two flagged."""
    specs = [("COVID", "COVID", 0.9, False), ("Normal", "Normal", 0.8, False), ("Normal", "COVID", 0.6, False),
             ("Viral Pneumonia", "Viral Pneumonia", 0.7, False), ("Normal", "Normal", 0.99, True),
             ("COVID", "Normal", 0.95, True)]
    rows = []
    for i, (truth, predicted, confidence, flagged) in enumerate(specs):
        probabilities = np.full(4, (1 - confidence) / 3)
        probabilities[CLASS_NAMES.index(predicted)] = confidence
        rows.append({"path": str(archive / truth / f"{i}.png"), "sha256": f"{i:064d}", "size": 100,
                     "predicted_label": predicted, **dict(zip(PROBABILITY_COLUMNS.values(), probabilities)),
                     "ood_score": 5.0 + i if flagged else 0.1 * i, "out_of_distribution": flagged,
                     "model_version": "m-1", "engine": "onnxruntime", "scored_at": pd.Timestamp("2026-01-01"),
                     "status": "ok", "error_code": "", "error_reason": ""})
    return pd.DataFrame(rows)[PREDICTION_COLUMNS]


def test_flagged_images_come_first_and_stay_out_of_counts_and_accuracy(tmp_path):
    archive = tmp_path / "archive"
    state = {"run": "r1", "model_version": "m-1", "engine": "onnxruntime", "archives": [str(archive)],
             "started_at": "2026-01-01T00:00:00Z"}
    summary = write_report(tmp_path / "run", _rows(archive), state, [archive], None, threshold=0.75, top_n=2)
    assert summary["scored"] == 6 and summary["out_of_distribution"] == 2 and summary["in_distribution"] == 4
    assert sum(summary["per_class"].values()) == 4 and summary["per_class"]["Normal"] == 1
    assert summary["ground_truth"]["n"] == 4 and summary["ground_truth"]["accuracy"] == 0.75
    assert summary["out_of_distribution_with_known_class"] == {"images": 2, "correct": 1}
    report = tmp_path / "run" / "report"
    flagged = pd.read_csv(report / "out_of_distribution.csv")
    assert list(flagged["ood_score"]) == [10.0, 9.0]  # most unusual first
    review = pd.read_csv(report / "review.csv")
    assert not set(review["file"]) & set(flagged["file"])
    unsure = review[review["why"] == "low confidence"]["confidence"].tolist()
    assert unsure == sorted(unsure) and unsure == [0.6, 0.7]  # calibrated confidence, least sure first
    page = (report / "index.html").read_text()
    assert page.index("Not like the training images") < page.index("What the model found")
    assert json.loads((report / "summary.json").read_text())["out_of_distribution"] == 2


def test_rows_scored_before_the_flag_existed_count_as_in_distribution(tmp_path):
    archive = tmp_path / "archive"
    state = {"run": "r0", "model_version": "m-0", "engine": "keras", "archives": [str(archive)],
             "started_at": "2026-01-01T00:00:00Z"}
    old = _rows(archive).drop(columns=["ood_score", "out_of_distribution"])
    summary = write_report(tmp_path / "run", old, state, [archive], None, threshold=0.75, top_n=2)
    assert summary["out_of_distribution"] == 0 and summary["in_distribution"] == 6
