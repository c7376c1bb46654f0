"""Tuning: `ray job submit` end to end, trials across (declared) GPU workers, resume after the
driver is killed, and a trial that fails once being retried.

Tiny on purpose: the compact CNN at 64 px, 20 phantoms per class, 2 epochs, 2-4 trials.
Drivers and clusters run in their own processes and Ray temp dirs; the test starts and
stops each of them by process id.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.helpers import REPO
from xray_ray.processes import free_port, stop_process_group

BIN = Path(sys.executable).parent  # the venv's bin: its python, ray
CI_CONFIG = "configs/tune_ci.yaml"

pytestmark = pytest.mark.slow


def _short_tmp(prefix: str) -> Path:
    """Ray's Unix sockets need a short path: pytest's tmp_path is too long for them."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def _env(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    # Ray on Linux turns 127.0.0.1 into the machine's address; without multi-host mode, heads, nodes and
    # drivers stay on the loopback interface.
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", RAY_USAGE_STATS_ENABLED="0",
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S="180",
               TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def _wait_for(check, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = check()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) before {what}:\n{_tail(log)}")
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}:\n{_tail(log)}")


def _tail(log: Path | None, lines: int = 60) -> str:
    if log is None or not log.exists():
        return ""
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


# --------------------------------------------------------------------------- settings (no Ray)


def test_tune_settings_from_yaml_and_overrides():
    from ray.tune.search.sample import Float, Integer

    from xray_ray.tuning.experiment import load_experiment_config
    from xray_ray.tuning.search import first_point, search_space

    config, settings = load_experiment_config(REPO / "configs/tune_demo.yaml",
                                              ["tune.num_samples=3", "tune.l2=[1e-3, 1e-2]", "lra.epochs=4"])
    assert settings.num_samples == 3 and config.lra.epochs == 4 and config.model.backbone == "compact"
    assert settings.l2 == [1e-3, 1e-2] and settings.mode == "max" and settings.score == "best_val_accuracy"
    space = search_space(settings)
    assert set(space) == {"model.dropout", "model.l2", "lra.factor", "lra.patience"}
    assert isinstance(space["model.dropout"], Float) and (space["model.dropout"].lower, space["model.dropout"].upper) == (0.2, 0.5)
    assert isinstance(space["model.l2"].sampler, Float._LogUniform)
    assert isinstance(space["lra.patience"], Integer) and (space["lra.patience"].lower, space["lra.patience"].upper) == (1, 4)
    # the base config's values come first (its l2, 1e-4, clipped to the overridden bounds)
    assert first_point(config, settings) == {"model.dropout": 0.45, "model.l2": 1e-3, "lra.factor": 0.5, "lra.patience": 2}
    _, fixed = load_experiment_config(None, ["model.weights=none", "tune.dropout=[0.3, 0.3]", "tune.metric=val_loss"])
    assert search_space(fixed)["model.dropout"] == 0.3 and fixed.mode == "min"


@pytest.mark.parametrize("override, message", [
    ("tune.metric=accuracy", "tune.metric"), ("tune.l2=[0, 0.1]", "tune.l2"), ("tune.dropout=[0.6, 0.2]", "tune.dropout"),
    ("tune.scheduler=hyperband", "tune.scheduler"), ("tune.colour=red", "unknown setting"),
])
def test_bad_tune_settings_are_refused_with_their_name(override, message):
    from xray_ray.tuning.experiment import load_experiment_config

    with pytest.raises(ValueError, match=message):
        load_experiment_config(None, ["model.weights=none", override])


def test_gpus_per_trial_auto_follows_the_cluster(monkeypatch, caplog):
    import ray

    from xray_ray.tuning.experiment import gpus_per_trial, load_experiment_config

    _, settings = load_experiment_config(None, ["model.weights=none", "tune.gpus_per_trial=auto"])
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    with caplog.at_level("WARNING"):
        assert gpus_per_trial(settings) == 0
    assert "no GPU" in caplog.text and "trains on CPU" in caplog.text
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0, "GPU": 2.0})
    assert gpus_per_trial(settings) == 1
    _, fixed = load_experiment_config(None, ["model.weights=none", "tune.gpus_per_trial=0.5"])
    assert gpus_per_trial(fixed) == 0.5


def test_existing_experiment_model_or_missing_resume_are_refused_before_any_work(tmp_path):
    from xray_ray.config_training import TuneConfig
    from xray_ray.tuning.experiment import check_can_start
    from xray_ray.tuning.storage import plan

    experiment = plan(TuneConfig(), "exp", str(tmp_path / "tune"), tmp_path / "model", tmp_path / "reports")
    assert experiment.path == str(tmp_path / "tune" / "exp")
    with pytest.raises(FileNotFoundError, match="no experiment to resume"):
        check_can_start(experiment, resume=True, overwrite=False)
    (tmp_path / "model").mkdir()
    with pytest.raises(FileExistsError, match="model folder"):
        check_can_start(experiment, resume=False, overwrite=False)
    assert check_can_start(experiment, resume=False, overwrite=True) is None
    (tmp_path / "tune" / "exp").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="--resume"):
        check_can_start(experiment, resume=False, overwrite=True)


def test_relative_outputs_leave_a_ray_jobs_temporary_working_dir(tmp_path, monkeypatch):
    from xray_ray.config_training import TuneConfig
    from xray_ray.tuning.storage import plan

    monkeypatch.delenv("XRAY_RAY_HOME", raising=False)
    job_dir = tmp_path / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123abcd"
    job_dir.mkdir(parents=True)
    monkeypatch.chdir(job_dir)
    experiment = plan(TuneConfig())
    assert experiment.out == Path.home() / "xray-ray" / "models" / "xray-tune"
    monkeypatch.setenv("XRAY_RAY_HOME", str(tmp_path / "home"))
    experiment = plan(TuneConfig(), storage_path="s3://bucket/tune")
    assert experiment.report_dir == tmp_path / "home" / "reports" / "tune" / "xray-tune"
    assert experiment.path == "s3://bucket/tune/xray-tune"


def test_every_option_is_documented_by_both_entry_points():
    from typer.testing import CliRunner

    from xray_ray.cli import app

    options = ["--config", "--set", "--index", "--data", "--name", "--storage-path", "--out", "--report-dir",
               "--resume", "--overwrite", "--address"]
    job = subprocess.run([str(BIN / "python"), "jobs/tune.py", "--help"], cwd=REPO, env=_env(COLUMNS="200"),
                         capture_output=True, text=True, timeout=120)
    cli = CliRunner().invoke(app, ["tune", "--help"], env={"COLUMNS": "200"})
    for output in (job.stdout, cli.output):
        for option in options:
            assert option in output, option


# --------------------------------------------------------------------------- experiments on Ray


@pytest.fixture(scope="module")
def tiny_index(ray_local, tmp_path_factory) -> Path:
    """20 phantoms per class at 64 px and their index; returns the folder holding both."""
    from xray_ray.images import synth
    from xray_ray.images.index import build_index, save_index

    root = tmp_path_factory.mktemp("tune_data")
    synth.write_dataset(root / "phantoms", per_class=20, size=64, seed=7)
    frame, _ = build_index(root / "phantoms")
    save_index(frame, root / "index.parquet")
    return root


@pytest.fixture(scope="class")
def ray_head():
    """A local head as a user starts one (`ray start --head`), on free ports and its own temp dir."""
    from xray_ray.ray_runtime import LocalHead

    with LocalHead(num_cpus=2) as head:
        yield head
    shutil.rmtree(head.temp_dir, ignore_errors=True)


def _check_export_matches_best_trial(reports: Path, out: Path, trials: int) -> pd.DataFrame:
    """The report's best trial is the exported model, and every promised file exists."""
    from xray_ray.model_folder.card import ModelCard

    table = pd.read_csv(reports / "trials.csv")
    summary = json.loads((reports / "summary.json").read_text())
    card = ModelCard.read(out).data
    assert len(table) == trials and table["trial_id"].is_unique
    assert set(table["stop_reason"]) <= {"max_epochs", "stop_patience", "asha"}, table["stop_reason"].tolist()
    assert (table["node_id"].astype(str).str.len() > 10).all()
    winner = table.loc[table["best_val_accuracy"].idxmax()]  # ties go to the first trial, as in the export
    assert summary["best_trial"] == winner["trial_id"] == card["tune"]["trial_id"]
    assert card["tune"]["best_val_accuracy"] == pytest.approx(winner["best_val_accuracy"])
    for key in ("model.dropout", "model.l2", "lra.factor", "lra.patience"):
        assert card["tune"]["params"][key] == pytest.approx(winner[key])
    assert card["hyperparameters"]["dropout"] == pytest.approx(winner["model.dropout"])
    assert card["hyperparameters"]["lra_patience"] == winner["lra.patience"]
    assert card["version"] == summary["model_version"] and card["synthetic_data"] is True
    test_report = json.loads((reports / "best_model" / "classification_report.json").read_text())
    assert test_report["accuracy"] == pytest.approx(card["metrics"]["test"]["accuracy"])
    for name in ("index.html", "validation_curves.png", "best_model/index.html", "best_model/confusion_matrix.png"):
        assert (reports / name).is_file(), name
    html = (reports / "index.html").read_text()
    assert winner["trial_id"] in html and "best_model/index.html" in html and "synthetic" in html.lower()
    return table


def _finished_trials(experiment: Path) -> set[str]:
    """Trial ids the experiment's saved state lists as finished."""
    finished = set()
    for state in experiment.glob("experiment_state-*.json"):
        try:
            entries = json.loads(state.read_text())["trial_data"]
        except (OSError, ValueError, KeyError):
            continue  # being rewritten
        for trial_json, _ in entries:
            trial = json.loads(trial_json)
            if trial.get("status") == "TERMINATED":
                finished.add(trial["trial_id"])
    return finished


def _result_lines(experiment: Path, trial_id: str) -> list[dict]:
    path = experiment / f"trial_{trial_id}" / "result.json"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class TestOnALocalHead:
    """Against a head started the way the README says (one head for both tests)."""

    @pytest.mark.timeout(600)
    def test_ray_job_submit_tunes_and_exports_the_best_trial(self, ray_head, tiny_index, tmp_path):
        """The README's command against a local head: index, 2 trials side by side, export, reports."""
        out, reports = tmp_path / "model", tmp_path / "reports"
        log = tmp_path / "job.log"
        with open(log, "w") as sink:
            done = subprocess.run(
                [str(BIN / "ray"), "job", "submit", "--address", ray_head.dashboard, "--working-dir", str(REPO), "--",
                 "python", "jobs/tune.py", "--config", CI_CONFIG, "--data", str(tiny_index / "phantoms"), "--name", "job",
                 "--storage-path", str(tmp_path / "tune"), "--out", str(out), "--report-dir", str(reports)],
                env=_env(**ray_head.client_env()), cwd=REPO, stdout=sink, stderr=subprocess.STDOUT, timeout=560)
        output = log.read_text(errors="replace")
        assert done.returncode == 0 and "succeeded" in output, _tail(log, 120)
        assert "best trial" in output and "test accuracy" in output
        table = _check_export_matches_best_trial(reports, out, trials=2)
        first = table.iloc[0]  # the origin's defaults are the first point of the search
        assert (first["model.dropout"], first["model.l2"], first["lra.factor"], first["lra.patience"]) == (0.45, 0.016, 0.5, 1)
        assert (tmp_path / "tune" / "job" / "xray_experiment.json").is_file()
        assert (reports / "index.parquet").is_file()  # --data indexed the folder first

    @pytest.mark.timeout(600)
    def test_resume_after_the_driver_is_killed_keeps_finished_trials(self, ray_head, tiny_index, tmp_path):
        """Kill the driver once a trial has finished; --resume completes the rest without re-running it."""
        storage, out, reports = tmp_path / "tune", tmp_path / "model", tmp_path / "reports"
        experiment = storage / "resume"
        common = [str(BIN / "python"), "jobs/tune.py", "--name", "resume", "--storage-path", str(storage), "--out", str(out),
                  "--report-dir", str(reports), "--address", ray_head.gcs]
        env = _env(TUNE_GLOBAL_CHECKPOINT_S="0", **ray_head.client_env())  # save the experiment state at every step (see the README on resume)
        log = tmp_path / "first.log"
        with open(log, "w") as sink:
            first = subprocess.Popen(
                common + ["--config", CI_CONFIG, "--index", str(tiny_index / "index.parquet"), "--set", "tune.num_samples=2",
                          "--set", "tune.max_concurrent_trials=1", "--set", "tune.scheduler=none", "--set", "lra.epochs=1",
                          "--set", "tune.reuse_actors=false"],
                env=env, cwd=REPO, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            finished = _wait_for(lambda: _finished_trials(experiment), 420, "a finished trial", first, log)
        finally:
            first.send_signal(signal.SIGKILL)  # the driver dies without any chance to clean up
            first.wait(30)
            stop_process_group(first, grace=0)
        killed_at = time.time()
        assert len(finished) == 1, "the whole experiment finished before the driver was killed"
        before = {trial_id: _result_lines(experiment, trial_id) for trial_id in finished}
        log = tmp_path / "resumed.log"
        with open(log, "w") as sink:
            resumed = subprocess.run(common + ["--resume"], env=env, cwd=REPO, stdout=sink, stderr=subprocess.STDOUT,
                                     timeout=480)
        assert resumed.returncode == 0, _tail(log, 120)
        table = _check_export_matches_best_trial(reports, out, trials=2)
        assert (table["epochs_run"] == 1).all()
        for trial_id, lines in before.items():
            assert _result_lines(experiment, trial_id) == lines, "a finished trial ran again"
            row = table[table["trial_id"] == trial_id].iloc[0]
            assert row["restarts"] == 0 and row["finished_at"] < killed_at
        other = table[~table["trial_id"].isin(finished)].iloc[0]
        assert other["finished_at"] > killed_at


@pytest.mark.timeout(300)
def test_a_trial_that_fails_once_is_retried_and_the_experiment_completes(ray_local, tiny_index, tmp_path):
    """FailureConfig at the experiment level: the failed trial restarts from its checkpoint and finishes."""
    from xray_ray.images.index import load_index
    from xray_ray.training.run import prepare_training_data
    from xray_ray.tuning.experiment import fit_trials, load_experiment_config
    from xray_ray.tuning.results import trial_table
    from xray_ray.tuning.search import run_trial
    from xray_ray.tuning.storage import plan

    marker = tmp_path / "failed-once"

    def flaky(params, training, config):
        if not marker.exists():  # the first trial to start fails once, after its first epoch
            marker.touch()
            run_trial({**params, "lra.epochs": 1}, training, config)
            raise RuntimeError("simulated worker loss after epoch 1")
        run_trial(params, training, config)

    config, settings = load_experiment_config(REPO / CI_CONFIG, ["tune.max_failures=1", "tune.num_samples=1"])
    experiment = plan(settings, "retry", str(tmp_path / "tune"), tmp_path / "model", tmp_path / "reports")
    training = prepare_training_data(load_index(tiny_index / "index.parquet"), config)
    results = fit_trials(training, config, settings, experiment, trainable=flaky)
    assert marker.exists() and not results.errors  # Tuner.fit does not raise on failed trials
    table = trial_table(results, settings, config.lra.epochs)
    assert len(table) == 1 and table["epochs_run"].tolist() == [2] and table["restarts"].tolist() == [1]
    retried = table.iloc[0]
    lines = _result_lines(tmp_path / "tune" / "retry", retried["trial_id"])
    assert [line["epoch"] for line in lines] == [1, 2]  # epoch 2 continued from the epoch-1 checkpoint
    assert lines[0]["started_at"] < lines[1]["started_at"]  # in a new process


# --------------------------------------------------------------------------- GPU workers


def _serve_cluster(folder: Path) -> None:
    """Run in its own process: a head with no CPUs and two workers that each declare one GPU.

    Writes the address and worker node ids to `folder/cluster.json`, then holds the cluster
    until `folder/stop` appears (or for 15 minutes at most).
    """
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "node_ip_address": "127.0.0.1", "include_dashboard": False,
        "gcs_server_port": free_port(), "dashboard_agent_listen_port": free_port()})
    try:
        workers = [cluster.add_node(num_cpus=2, num_gpus=1, node_ip_address="127.0.0.1") for _ in range(2)]
        cluster.wait_for_nodes()
        (folder / "cluster.json").write_text(json.dumps({"address": cluster.address,
                                                         "workers": [w.node_id for w in workers]}))
        deadline = time.time() + 900
        while not (folder / "stop").exists() and time.time() < deadline:
            time.sleep(0.5)
    finally:
        cluster.shutdown()


@pytest.mark.timeout(600)
def test_trials_spread_over_gpu_workers_one_per_gpu(tiny_index, tmp_path):
    """4 trials of 1 GPU on two 1-GPU nodes: both nodes, two at a time, never two on one GPU, TF on CPU."""
    folder = _short_tmp("xrc")
    log = folder / "cluster.log"
    with open(log, "w") as sink:
        harness = subprocess.Popen([str(BIN / "python"), "-m", "tests.tuning.test_tune", str(folder)],
                                   env=_env(RAY_TMPDIR=str(folder), RAY_AUTH_MODE="disabled"), cwd=REPO, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        cluster = json.loads(_wait_for(lambda: (folder / "cluster.json").exists() and (folder / "cluster.json").read_text(),
                                       240, "the cluster", harness, log))
        out, reports = tmp_path / "model", tmp_path / "reports"
        driver_log = tmp_path / "driver.log"
        with open(driver_log, "w") as sink:
            done = subprocess.run(
                [str(BIN / "python"), "jobs/tune.py", "--config", CI_CONFIG, "--index", str(tiny_index / "index.parquet"),
                 "--set", "tune.num_samples=4", "--set", "tune.gpus_per_trial=1", "--set", "tune.max_concurrent_trials=0",
                 "--set", "tune.scheduler=none", "--set", "lra.epochs=1", "--name", "gpus", "--storage-path", str(tmp_path / "tune"),
                 "--out", str(out), "--report-dir", str(reports), "--address", cluster["address"]],
                env=_env(RAY_TMPDIR=str(folder), RAY_AUTH_MODE="disabled"), cwd=REPO, stdout=sink, stderr=subprocess.STDOUT, timeout=520)
        assert done.returncode == 0, _tail(driver_log, 120)
    finally:
        (folder / "stop").touch()
        try:
            harness.wait(60)
        except subprocess.TimeoutExpired:
            pass
        stop_process_group(harness, grace=0)
        shutil.rmtree(folder, ignore_errors=True)
    table = _check_export_matches_best_trial(reports, out, trials=4)
    assert set(table["node_id"]) == set(cluster["workers"]), "trials should run on both GPU workers"
    assert (table["gpu_ids"].astype(str) == "0").all()  # each node numbers its one GPU 0
    assert (table["cuda_visible_devices"].astype(str) == "0").all()  # TensorFlow was shown only that GPU (and ran on CPU)
    placements = list(zip(table["node_id"], table["gpu_ids"].astype(str)))
    spans = list(zip(table["started_at"], table["finished_at"]))
    overlapping = [(i, j) for i in range(len(spans)) for j in range(i + 1, len(spans))
                   if spans[i][0] < spans[j][1] and spans[j][0] < spans[i][1]]
    assert overlapping, "no two trials ran at the same time"
    for i, j in overlapping:
        assert placements[i] != placements[j], f"trials {i} and {j} shared a GPU at the same time"
    for t in sorted(s for span in spans for s in span):  # never more than the two GPUs' worth of trials at once
        assert sum(start <= t < end for start, end in spans) <= 2


if __name__ == "__main__":  # the cluster harness of test_trials_spread_over_gpu_workers_one_per_gpu
    _serve_cluster(Path(sys.argv[1]))

