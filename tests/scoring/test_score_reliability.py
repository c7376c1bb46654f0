"""Archive scoring end to end on a local Ray: bad files, killed actors and drivers, nightly increments, real images.

Every test scores a few small phantoms with the session's compact 64 px model, so each
run takes seconds; the model itself is trained once per session (conftest).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from tests.badfiles import (
    BAD_CODES,
    dicom_bytes,
    dicom_raw_values,
    write_bad_files,
    write_good_files,
)
from tests.helpers import REPO as ROOT
from xray_ray.cli import app
from xray_ray.images import synth
from xray_ray.model_folder.card import ModelCard
from xray_ray.model_folder.classifier import Classifier
from xray_ray.processes import command_line, process_tree
from xray_ray.config_services import ScoreConfig
from xray_ray.scoring.pipeline import PREDICTION_COLUMNS, PROBABILITY_COLUMNS
from xray_ray.scoring.run import read_predictions, score

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model(compact_model, ray_local) -> Path:
    return compact_model[0]


def _score(archive: Path, model: Path, out: Path, run: str, **options) -> dict:
    return score(ScoreConfig(archives=[str(archive)], model=str(model), out=str(out), run=run, **options))


def _rows(out: Path) -> pd.DataFrame:
    """Every committed prediction row of every run under `out`."""
    return pd.concat([read_predictions(f) for f in sorted(out.iterdir()) if (f / "run.json").is_file()],
                     ignore_index=True)


def _phantoms(root: Path, per_class: int) -> Path:
    # drawn at the size the compact model's phantoms were drawn at (learn_index: 96 px), so its
    # out-of-distribution check sees them as its own kind of image (drawn at 64 px, most are flagged)
    synth.write_dataset(root, per_class=per_class, size=96, seed=5)
    return root


@pytest.mark.timeout(900)
def test_bad_file_archive_scores_every_good_file_and_reports_every_bad_one(model, tmp_path):
    archive = _phantoms(tmp_path / "archive", per_class=2)
    bad = write_bad_files(archive / "incoming" / "bad")
    good = write_good_files(archive / "incoming" / "good")
    del good["dicom_no_preamble"]  # no extension and no DICM marker: not an image file by the rule
    (archive / "incoming" / "good" / "dicom_no_preamble").unlink()
    (archive / "incoming" / "good" / "scan0001").write_bytes(dicom_bytes(dicom_raw_values()))  # found by DICM
    good["scan0001"] = None
    (archive / "incoming" / "loop").symlink_to("..")
    (archive / "incoming" / "self.png").symlink_to("self.png")
    out = tmp_path / "out"

    result = CliRunner().invoke(app, ["score", "--archive", str(archive), "--model", str(model), "--out", str(out),
                                      "--run", "night1", "--batch-size", "8"])
    assert result.exit_code == 0, result.output

    rows = read_predictions(out / "night1")
    assert list(rows.columns) == PREDICTION_COLUMNS
    by_name = {os.path.relpath(p, archive): r for p, r in zip(rows["path"], rows.to_dict("records"))}
    assert len(rows) == len(by_name) == 8 + len(good) + len(bad) + 2
    for name in good:
        row = by_name[f"incoming/good/{name}"]
        assert row["status"] == "ok" and row["predicted_label"] and abs(
            sum(row[c] for c in PROBABILITY_COLUMNS.values()) - 1) < 1e-4, name
    scored = rows[rows["status"] == "ok"]
    direct = Classifier(model).predict([Path(p).read_bytes() for p in scored["path"]])
    np.testing.assert_allclose(scored[list(PROBABILITY_COLUMNS.values())].to_numpy(dtype=np.float64), direct.probabilities, atol=1e-5)
    assert list(scored["predicted_label"]) == direct.labels
    for name, reason in bad.items():
        row = by_name[f"incoming/bad/{name}"]
        assert row["status"] == "error" and reason in row["error_reason"] and pd.isna(row["prob_COVID"]), name
        assert row["error_code"] == BAD_CODES[name], name
    assert "symlink loop" in by_name["incoming/loop"]["error_reason"]
    assert "Too many levels of symbolic links" in by_name["incoming/self.png"]["error_reason"]
    assert by_name["incoming/bad/empty.png"]["size"] == 0 and pd.isna(by_name["incoming/self.png"]["size"])

    report = out / "night1" / "report"
    summary = json.loads((report / "summary.json").read_text())
    assert summary["errors"] == len(bad) + 2 and summary["synthetic_data"] is True
    codes = [BAD_CODES[name] for name in bad] + ["unreadable"] * 2
    assert summary["error_codes"] == {code: codes.count(code) for code in sorted(set(codes))}
    flagged_known = summary["out_of_distribution_with_known_class"]["images"]
    assert summary["ground_truth"]["n"] + flagged_known == 8  # only the phantoms sit in class folders
    errors = pd.read_csv(report / "errors.csv")
    assert len(errors) == len(bad) + 2 and errors["reason"].str.len().min() > 0
    page = (report / "index.html").read_text()
    assert "Synthetic data" in page and summary["model_version"] in page and "onnxruntime" in page
    for name in ("confidence_by_class.png", "confusion_matrix.png", "review.csv", "files_Viral_Pneumonia.csv"):
        assert (report / name).is_file(), name


@pytest.mark.timeout(900)
def test_nightly_runs_score_only_new_files_and_new_model_versions(model, tmp_path):
    archive = _phantoms(tmp_path / "archive", per_class=3)
    out = tmp_path / "out"
    first = _score(archive, model, out, "night1")
    assert first["scored"] == 12 and first["skipped_already_scored"] == 0

    again = _score(archive, model, out, "night1")  # the same night, again: nothing new
    assert again["scored_this_time"] == 0 and again["skipped_already_scored"] == 12
    assert len(_rows(out)) == 12 and len(list((out / "night1" / "predictions").iterdir())) == 1

    _phantoms(archive, per_class=4)  # the next night brings one more file per class
    second = _score(archive, model, out, "night2")
    assert second["scored"] == 4 and second["skipped_already_scored"] == 12
    rows = _rows(out)
    assert len(rows) == 16 and rows["path"].is_unique and rows["sha256"].is_unique

    retrained = tmp_path / "model-v2"
    shutil.copytree(model, retrained)
    version = ModelCard.read(retrained).update(version="compact-v2").version
    third = _score(archive, retrained, out, "night2")  # a new model version the same night rescores everything
    assert third["run"] == "night2.2" and third["scored"] == 16 and third["model_version"] == version
    assert set(read_predictions(out / "night2.2")["model_version"]) == {version}
    assert len(_rows(out)) == 32


def _scoring_actor() -> int | None:
    """The pid of a scoring actor of the Ray this test process runs (never another one's)."""
    return next((pid for pid in process_tree(os.getpid())[1:] if b"ActorScorer" in command_line(pid)), None)


def _parts(folder: Path) -> int:
    return len(list((folder / "predictions").glob("part-*.parquet")))


@pytest.mark.timeout(900)
def test_killing_a_scoring_actor_loses_and_duplicates_no_rows(model, tmp_path):
    archive = _phantoms(tmp_path / "archive", per_class=40)
    out = tmp_path / "out"
    killed = []

    def kill_actor_once_rows_arrive():
        deadline = time.time() + 300
        while time.time() < deadline and not killed:
            pid = _scoring_actor()
            if pid and _parts(out / "night1") >= 1:
                os.kill(pid, signal.SIGKILL)
                killed.append((pid, _parts(out / "night1")))
            time.sleep(0.02)

    watcher = threading.Thread(target=kill_actor_once_rows_arrive, daemon=True)
    watcher.start()
    summary = _score(archive, model, out, "night1", batch_size=2, commit_rows=4, files_per_task=8)
    watcher.join(timeout=5)
    assert killed, "the scoring actor was never seen"
    assert killed[0][1] < 160 / 8, "the actor was killed after the run had finished"
    rows = read_predictions(out / "night1")
    assert len(rows) == summary["scored"] == 160 and rows["path"].is_unique
    assert (rows["status"] == "ok").all()


@pytest.mark.timeout(900)
def test_killing_the_driver_then_rerunning_completes_without_duplicates(model, tmp_path):
    import ray

    archive = _phantoms(tmp_path / "archive", per_class=40)
    out = tmp_path / "out"
    command = [sys.executable, str(ROOT / "jobs" / "score.py"), "--archive", str(archive), "--model", str(model),
               "--out", str(out), "--run", "night1", "--batch-size", "2", "--commit-rows", "4", "--files-per-task", "8"]
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}  # this session's Ray
    log = tmp_path / "driver.log"
    with open(log, "w") as output:
        driver = subprocess.Popen(command, cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 300
        while _parts(out / "night1") < 1 and driver.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert driver.poll() is None, f"the driver ended by itself:\n{log.read_text()[-3000:]}"
        driver.kill()
    finally:
        driver.wait(timeout=60)
    state = json.loads((out / "night1" / "run.json").read_text())
    committed = len(read_predictions(out / "night1"))
    assert state["status"] == "running" and 0 < committed < 160, "the driver was not killed mid-run"

    summary = _score(archive, model, out, "night1")
    rows = read_predictions(out / "night1")
    assert len(rows) == 160 and rows["path"].is_unique
    assert summary["scored_this_time"] == 160 - committed and summary["skipped_already_scored"] == committed
    assert json.loads((out / "night1" / "run.json").read_text())["status"] == "complete"


@pytest.mark.timeout(900)
def test_real_images_with_class_folder_labels_give_the_full_report(model, real_root, tmp_path):
    out = tmp_path / "out"
    summary = _score(real_root, model, out, "real")
    files = pd.read_csv(real_root / "index.csv")
    assert summary["files"] == len(files) and summary["synthetic_data"] is False
    # a model trained on phantoms may flag many real X-rays: flagged images are counted apart from the accuracy
    truth, flagged = summary["ground_truth"], summary["out_of_distribution"]
    assert summary["scored"] == len(files) - summary["errors"] == summary["in_distribution"] + flagged
    assert summary["out_of_distribution_with_known_class"]["images"] == flagged
    assert (truth["n"] if truth else 0) == summary["in_distribution"]
    report = out / "real" / "report"
    for name in ("index.html", "summary.json", "confidence_by_class.png", "review.csv", "errors.csv", "counts.csv",
                 "files_COVID.csv", "out_of_distribution.csv", *(("confusion_matrix.png", "classification_report.csv")
                                                                   if truth else ())):
        assert (report / name).stat().st_size > 0, name
    page = (report / "index.html").read_text()
    assert ("How often the model was right" in page) == bool(truth) and "Synthetic data" not in page
    if truth:
        assert truth["source"] == "class folders" and sum(map(sum, truth["confusion"])) == truth["n"]

    again = _score(real_root, model, out, "real", labels=str(real_root / "index.csv"))  # the same truth from a CSV
    assert again["scored_this_time"] == 0
    assert again["out_of_distribution_with_known_class"] == summary["out_of_distribution_with_known_class"]
    if truth:
        assert again["ground_truth"]["source"] == "labels CSV" and again["ground_truth"]["confusion"] == truth["confusion"]
    assert not any(real_root.glob("**/report"))  # nothing written into the shared data


def test_predictions_stream_out_of_a_read_task_before_it_ends(model, tmp_path):
    """One read task holds every file; its images still reach the actors, and their rows the driver, a block of
    about one model batch at a time, so parts are committed while the task is still reading."""
    archive = _phantoms(tmp_path / "archive", per_class=12)
    _score(archive, model, tmp_path / "out", "streamed", batch_size=8, files_per_task=1000, commit_rows=8)
    parts = sorted((tmp_path / "out" / "streamed" / "predictions").glob("part-*.parquet"))
    sizes = [len(pd.read_parquet(part, columns=["path"])) for part in parts]
    assert sum(sizes) == 48 and len(parts) >= 2, sizes  # one 48-row block would have made one part


def test_summary_breaks_the_run_down_by_stage_and_the_default_pool_fits_the_cluster(model, tmp_path):
    """Every stage has its seconds, start-up is apart, and with no flags the pool is sized from this 2-CPU Ray."""
    archive = _phantoms(tmp_path / "archive", per_class=6)
    summary = _score(archive, model, tmp_path / "out", "timed", batch_size=4, files_per_task=8, commit_rows=8)
    timing = summary["timing"]
    assert timing["images_scored"] == summary["scored"] == 24
    busy = timing["stage_busy_s"]
    assert set(busy) == {"discovery", "read", "hash", "decode_preprocess", "model", "write", "report"}
    assert 0 <= timing["queue_wait_s_per_image"] <= timing["wall_s"]  # a wait per image, not summed over images
    assert all(seconds >= 0 for seconds in busy.values())
    assert busy["model"] > 0 and busy["decode_preprocess"] > 0 and busy["write"] > 0 and busy["report"] > 0
    assert 0 < timing["startup_s"]["first_result_s"] <= timing["wall_s"]
    assert timing["startup_s"]["model_load_s_per_actor_sum"] > 0
    saved = json.loads((tmp_path / "out" / "timed" / "report" / "summary.json").read_text())
    assert saved["timing"] == timing
    pool = json.loads((tmp_path / "out" / "timed" / "run.json").read_text())["pool"]
    assert pool == {"min_actors": 1, "max_actors": 1, "cpus_per_actor": 1.5, "gpus_per_actor": 0.0, "read_cpus": 0.5}


@pytest.mark.timeout(600)
def test_scoring_with_a_registry_uses_its_current_model_and_follows_a_promotion(model, tmp_path):
    from tests.helpers import copy_as
    from xray_ray.model_folder import registry

    archive, out, reg = _phantoms(tmp_path / "archive", per_class=1), tmp_path / "out", tmp_path / "reg"
    first = registry.promote(reg, model)["to"]
    night = score(ScoreConfig(archives=[str(archive)], registry=str(reg), out=str(out), run="night1"))
    assert night["model_version"] == first and night["scored"] == 4
    assert set(read_predictions(out / "night1")["model_version"]) == {first}
    second = registry.promote(reg, copy_as(model, tmp_path / "retrained", "compact-promoted"))["to"]
    again = score(ScoreConfig(archives=[str(archive)], registry=str(reg), out=str(out), run="night1"))
    assert again["model_version"] == second and again["scored"] == 4  # the ledger rescores for a new version
    assert set(read_predictions(out / again["run"])["model_version"]) == {second}
