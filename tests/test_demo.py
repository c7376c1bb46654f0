"""The demo's whole flow at its smallest setting, run as the README runs it, and every artefact it promises."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tests.helpers import REPO

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

SMALLEST = ["--per-class", "8", "--archive-per-class", "2", "--set", "tune.num_samples=2", "--set", "lra.epochs=2",
            "--set", "tune.grace_period=1", "--set", "tune.max_concurrent_trials=1"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """`xray-ray demo` in a fresh process (its own Ray head), at the smallest setting."""
    out = tmp_path_factory.mktemp("demo")
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-m", "xray_ray.cli", "demo", "--out", str(out), *SMALLEST],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1100)
    assert done.returncode == 0, (done.stdout[-4000:], done.stderr[-4000:])
    return out, done.stdout


def test_demo_prints_every_stage_the_reports_and_labels_numbers_synthetic(demo_run):
    out, stdout = demo_run
    for stage in ("synthesize", "start a local Ray head", "index", "jobs/tune.py", "jobs/score.py", "serve", "stop"):
        assert stage in stdout
    assert "backbone: compact" in stdout
    assert "Headline (SYNTHETIC)" in stdout
    for report in json.loads((out / "demo_summary.json").read_text())["reports"].values():
        assert report in stdout and Path(report).is_file()


def test_demo_leaves_every_artefact(demo_run):
    out, _ = demo_run
    index = pd.read_parquet(out / "index.parquet")
    assert len(index) == 4 * 8 and index["readable"].all()
    trials = pd.read_csv(out / "reports" / "tune" / "trials.csv")
    assert len(trials) == 2
    model = out / "models" / "best"
    card = json.loads((model / "model_card.json").read_text())
    assert (model / "model.keras").is_file() and card["onnx"]["usable"]
    assert card["metrics"]["test"]["n"] > 0
    test_report = out / "reports" / "tune" / "best_model"
    assert json.loads((test_report / "classification_report.json").read_text())["n"] == card["metrics"]["test"]["n"]
    for page in (test_report / "index.html", out / "reports" / "tune" / "index.html"):
        assert page.stat().st_size > 1000
    assert (test_report / "confusion_matrix.png").stat().st_size > 5000
    scored = json.loads((out / "scores" / "demo" / "report" / "summary.json").read_text())
    assert scored["scored"] == 4 * 2 and scored["errors"] == 3
    flagged_known = scored["out_of_distribution_with_known_class"]["images"]
    assert scored["ground_truth"]["n"] + flagged_known == 4 * 2  # flagged images are counted apart


def test_demo_served_the_best_model_and_refused_the_bad_file(demo_run):
    out, _ = demo_run
    summary = json.loads((out / "demo_summary.json").read_text())
    statuses = [answer["status"] for answer in summary["serve_answers"]]
    assert statuses.count(200) == 4 and statuses[-1] in (400, 422)
    assert {a["label"] for a in summary["serve_answers"] if a["status"] == 200} <= {
        "COVID", "Lung_Opacity", "Normal", "Viral Pneumonia"}
    assert summary["model_version"] == json.loads((out / "models/best/model_card.json").read_text())["version"]


# The real sample (240 X-rays beside the project) through `make demo DATA=... BACKBONE=compact`, smallest setting.
REAL_SMALLEST = ["--backbone", "compact", "--set", "data.image_size=64", "--set", "tune.num_samples=1",
                 "--set", "lra.epochs=1", "--set", "tune.grace_period=1", "--set", "tune.cpus_per_trial=1"]


def _demo(out: Path, *args: str, **env_extra: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    env.update(env_extra)
    return subprocess.run([sys.executable, "-m", "xray_ray.cli", "demo", "--out", str(out), *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1100)


def test_demo_on_the_real_sample_scores_it_against_its_class_folders(real_root, tmp_path):
    done = _demo(tmp_path / "real", "--data", str(real_root), *REAL_SMALLEST)
    assert done.returncode == 0, (done.stdout[-4000:], done.stderr[-4000:])
    assert "Headline (real data)" in done.stdout
    summary = json.loads((tmp_path / "real" / "demo_summary.json").read_text())
    assert summary["data"] == "real dataset" and 0 <= summary["test_accuracy"] <= 1
    scored = json.loads((tmp_path / "real" / "scores" / "demo" / "report" / "summary.json").read_text())
    flagged_known = scored["out_of_distribution_with_known_class"]["images"]
    assert scored["ground_truth"]["n"] + flagged_known == 240  # every image, its class folder as truth
    assert [a["status"] for a in summary["serve_answers"]].count(200) == 4


def test_demo_with_efficientnetb1_and_no_weights_file_fails_before_starting(real_root, tmp_path):
    done = _demo(tmp_path / "out", "--data", str(real_root), KERAS_HOME=str(tmp_path / "keras"))
    assert done.returncode != 0
    assert f"efficientnetb1_notop.h5 in the folder {tmp_path / 'keras' / 'models'}" in done.stdout + done.stderr
    assert "start a local Ray head" not in done.stdout  # nothing was started
