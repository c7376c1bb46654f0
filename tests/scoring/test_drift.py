"""The nightly report's drift check: tonight's class mix and out-of-distribution rate against the model card
and the last runs, flagged only for a shift that is both large and more than chance."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from xray_ray.config import CLASS_NAMES
from xray_ray.model_folder.card import ModelCard
from xray_ray.scoring import drift
from xray_ray.scoring.drift import DRIFT_PNG
from xray_ray.scoring.pipeline import PREDICTION_COLUMNS, PROBABILITY_COLUMNS
from xray_ray.scoring.report import write_report

BALANCED = {"class_counts": dict.fromkeys(CLASS_NAMES, 100), "ood_rate": 0.05}


def _summary(run: str, per_class: list[int], flagged: int = 0, started: str = "2026-01-01T00:00:00+0000") -> dict:
    counts = dict(zip(CLASS_NAMES, per_class))
    return {"run": run, "started_at": started, "per_class": counts, "out_of_distribution": flagged,
            "scored": sum(per_class) + flagged}


def _verdicts(found: dict, against: str) -> dict:
    row = next(row for row in found["comparisons"] if row["against"].startswith(against))
    return {kind: row[kind]["flagged"] for kind in ("class_mix", "out_of_distribution") if kind in row}


@pytest.mark.parametrize("per_class, flagged, expected", [
    ([50, 50, 50, 50], 10, {"class_mix": False, "out_of_distribution": False}),  # like the card
    ([170, 10, 10, 10], 10, {"class_mix": True, "out_of_distribution": False}),  # one class took over
    ([50, 50, 50, 50], 60, {"class_mix": False, "out_of_distribution": True}),  # many unusual images
    ([3, 1, 1, 0], 1, {"class_mix": False, "out_of_distribution": False}),  # large but small: could be chance
])
def test_the_card_comparison_flags_large_shifts_that_are_more_than_chance(per_class, flagged, expected):
    found = drift.compare(_summary("tonight", per_class, flagged), BALANCED, recent=[])
    assert _verdicts(found, "model card") == expected
    assert found["shifted"] == any(expected.values())
    assert [row["against"] for row in found["comparisons"]] == ["model card"]  # no earlier runs: no such row
    assert len(found["flags"]) == sum(expected.values())


def test_a_class_the_baseline_never_had_is_as_far_as_can_be():
    found = drift.compare(_summary("tonight", [0, 0, 0, 200]), {"class_counts": dict(zip(CLASS_NAMES, [50, 50, 50, 0])),
                                                                "ood_rate": None}, recent=[])
    mix = found["comparisons"][0]["class_mix"]
    assert mix["flagged"] and mix["distance"] == 1.0 and mix["p_value"] == 0.0
    assert "out_of_distribution" not in found["comparisons"][0]  # no rate on the card: no verdict


def test_recent_runs_are_pooled_and_tonight_is_compared_with_them(tmp_path):
    for day in range(1, 10):  # nine earlier runs, mostly Normal; only the last seven count
        started = f"2026-01-{day:02d}T02:00:00+0000"
        _write_summary(tmp_path, _summary(f"2026-01-{day:02d}", [10, 10, 150, 10] if day > 2 else [0, 0, 0, 999],
                                          flagged=5, started=started))
    (tmp_path / "broken" / "report").mkdir(parents=True)
    (tmp_path / "broken" / "report" / "summary.json").write_text("{not json")
    _write_summary(tmp_path, _summary("tonight", [1, 1, 1, 1], started="2026-01-10T02:00:00+0000"))
    recent = drift.recent_runs(tmp_path, "tonight")
    assert [run["run"] for run in recent] == [f"2026-01-{day:02d}" for day in range(3, 10)]
    found = drift.compare(_summary("tonight", [60, 60, 60, 60], flagged=5), BALANCED, recent)
    assert _verdicts(found, "last 7 runs") == {"class_mix": True, "out_of_distribution": False}
    assert _verdicts(found, "model card") == {"class_mix": False, "out_of_distribution": False}
    assert [row["run"] for row in found["trend"]][-1] == "tonight" and len(found["trend"]) == 8


def test_the_card_baseline_adds_up_every_split_and_takes_the_test_flag_rate(tmp_path):
    card = ModelCard(tmp_path, {"classes": list(CLASS_NAMES), "ood": {"valid_flag_rate": 0.06, "test_flag_rate": 0.04},
                                "split_counts": {"train": dict(zip(CLASS_NAMES, [90, 50, 180, 20])),
                                                 "valid": dict(zip(CLASS_NAMES, [5, 3, 10, 1])),
                                                 "test": dict(zip(CLASS_NAMES, [5, 2, 10, 1]))}})
    assert card.baseline() == {"class_counts": dict(zip(CLASS_NAMES, [100, 55, 200, 22])), "ood_rate": 0.04}
    assert ModelCard(tmp_path, {"classes": list(CLASS_NAMES)}).baseline()["ood_rate"] is None


def _write_summary(out, summary):
    folder = out / summary["run"] / "report"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "summary.json").write_text(json.dumps(summary))


def _predictions(archive, labels: list[str]) -> pd.DataFrame:
    rows = []
    for i, label in enumerate(labels):
        probabilities = np.full(len(CLASS_NAMES), 0.1 / 3)
        probabilities[CLASS_NAMES.index(label)] = 0.9
        rows.append({"path": str(archive / f"{i}.png"), "sha256": f"{i:064d}", "size": 10, "predicted_label": label,
                     **dict(zip(PROBABILITY_COLUMNS.values(), probabilities)), "ood_score": 0.1,
                     "out_of_distribution": False, "model_version": "m-1", "engine": "onnxruntime",
                     "scored_at": pd.Timestamp("2026-01-01"), "status": "ok", "error_code": "", "error_reason": ""})
    return pd.DataFrame(rows)[PREDICTION_COLUMNS]


def test_the_nightly_report_shows_drift_against_earlier_runs_with_a_trend_chart(tmp_path):
    archive, out = tmp_path / "archive", tmp_path / "out"
    nights = {"2026-01-01": ["Normal"] * 40 + ["COVID"] * 40, "2026-01-02": ["Normal"] * 45 + ["COVID"] * 35,
              "2026-01-03": ["COVID"] * 80}
    for night, labels in nights.items():
        state = {"run": night, "model_version": "m-1", "engine": "onnxruntime", "archives": [str(archive)],
                 "started_at": f"{night}T02:00:00+0000", "baseline": BALANCED}
        summary = write_report(out / night, _predictions(archive, labels), state, [archive], None, 0.5, 2)
    saved = json.loads((out / "2026-01-03" / "report" / "summary.json").read_text())
    assert saved["drift"] == summary["drift"] and summary["drift"]["shifted"]
    assert _verdicts(summary["drift"], "last 2 runs")["class_mix"]
    assert [row["run"] for row in summary["drift"]["trend"]] == list(nights)
    report = out / "2026-01-03" / "report"
    assert (report / DRIFT_PNG).stat().st_size > 0
    page = (report / "index.html").read_text()
    assert "Has the archive changed?" in page and "class mix against the last 2 runs" in page and DRIFT_PNG in page
