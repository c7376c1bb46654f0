"""`xray-ray serve`, `score` and `demo` run as a user runs them (RAY_AUTH_MODE unset): every TCP listener their
process trees own is on loopback, their Ray refuses a driver without its token, and Ctrl-C (SIGINT to the
foreground process group) or systemd's stop (SIGTERM to every process) ends each of them, and every Ray
process it started, within 20 s, losing nothing committed."""

from __future__ import annotations

import base64
import json
import re
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.helpers import REPO
from tests.running import Command, healthy, user_env
from xray_ray.images import synth
from xray_ray.processes import command_line, free_port
from xray_ray.loopback import is_loopback_host
from xray_ray.ray_runtime import LEAN_SYSTEM_CONFIG
from xray_ray.scoring.run import read_predictions

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

STOP_SECONDS = 20
HOWS = ["interrupt", "terminate"]
JOIN = "import sys, ray; ray.init(address=sys.argv[1]); print('joined', ray.cluster_resources().get('CPU'))"


def assert_all_on_loopback(command: Command, what: str) -> list[dict]:
    listeners = command.listeners()
    print(f"\n{what}: {len(listeners)} TCP listeners")
    for row in listeners:
        print(f"  {row['address']:>18}:{row['port']:<6} pid {row['pid']:<7} {Path(row['process']).name[:60]}")
    assert listeners, "no listener found: the process tree was not read"
    exposed = [row for row in listeners if not is_loopback_host(row["address"])]
    assert not exposed, f"{what} listens beyond loopback: {exposed}"
    return listeners


def ray_system_config(command: Command) -> dict:
    """The system config the command's own Ray was started with: what its GCS server was given (--config_list)."""
    for pid in command.processes():
        given = [arg for arg in command_line(pid).decode(errors="replace").split("\0")
                 if arg.startswith("--config_list=")]
        if given:
            return json.loads(base64.b64decode(given[0].partition("=")[2]))
    raise AssertionError("no process of the command's Ray was given a system config")


def fresh_home(tmp_path: Path) -> Path:
    """A new user's home folder: a command run with it must leave no Ray token there (~/.ray/auth_token)."""
    home = tmp_path / "home"
    home.mkdir()
    return home


def assert_no_ray_token_left(home: Path) -> None:
    assert not (home / ".ray").exists(), f"Ray's default token folder was made: {list((home / '.ray').rglob('*'))}"


def assert_stops(command: Command, how: str) -> None:
    seconds = command.stop(how, STOP_SECONDS)
    print(f"stopped by {how} in {seconds:.1f} s, exit code {command.process.returncode}")
    assert command.process.poll() is not None, f"still running {seconds:.0f} s after {how}"
    left = {pid: command_line(pid)[:200] for pid in command.leftovers()}
    assert not left, f"processes left after {how}: {left}"
    assert seconds <= STOP_SECONDS, f"{how} took {seconds:.1f} s"


def join(address: str, env: dict[str, str], timeout: float = 90) -> subprocess.CompletedProcess:
    """A driver joining the Ray at `address` (with Ray's loopback mode on, so only the token decides)."""
    command = [sys.executable, "-c", JOIN, address]
    try:
        return subprocess.run(command, env={**env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"},
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:  # a refused driver may keep retrying: refused all the same
        output = [b.decode(errors="replace") if isinstance(b, bytes) else (b or "") for b in (err.stdout, err.stderr)]
        return subprocess.CompletedProcess(command, -9, *output)


def assert_refuses_a_driver_without_the_token(address: str, token_file: Path | None = None) -> None:
    refused = join(address, user_env(), timeout=20)  # refused at once, or retrying with an auth error
    assert refused.returncode != 0 and "joined" not in refused.stdout
    assert "auth" in refused.stderr.lower(), refused.stderr[-2000:]
    if token_file is not None:  # the same driver with the token gets in: the refusal was the token's doing
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        admitted = join(address, user_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file)))
        assert admitted.returncode == 0 and "joined" in admitted.stdout, admitted.stderr[-2000:]


ARCHIVE_FILES = 4 * 300


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    """1,200 different phantoms at 299 px, scored on one thread: long enough to be interrupted mid-run even on
    a fast CPU (400 on two threads finished within a second of the first committed part on an AMX machine)."""
    root = tmp_path_factory.mktemp("archive")
    synth.write_dataset(root, per_class=ARCHIVE_FILES // 4, size=299, seed=3)
    return root


@pytest.mark.parametrize("how", HOWS)
def test_serve_listens_on_loopback_refuses_tokenless_drivers_and_stops(compact_model, tmp_path, how):
    port, metrics_port, home = free_port(), free_port(), fresh_home(tmp_path)
    server = Command(["serve", "--model", str(compact_model[0]), "--port", str(port), "--num-cpus", "0.5"],
                     tmp_path / "serve.log", tmp_path,
                     env=user_env(XRAY_RAY_METRICS_PORT=str(metrics_port), HOME=str(home)))
    url = f"http://127.0.0.1:{port}"

    try:
        server.wait_for(lambda: healthy(url), 240, "a healthy replica")
        listeners = assert_all_on_loopback(server, "xray-ray serve")
        assert {port, metrics_port} <= {row["port"] for row in listeners}  # Prometheus' port: fixed, on loopback
        metrics = f"http://127.0.0.1:{metrics_port}/metrics"
        server.wait_for(lambda: metrics in server.output(), 60, "the metrics address printed")
        assert httpx.get(metrics, timeout=10).status_code == 200
        assert ray_system_config(server).get("enable_metrics_collection", True), "a Ray that serves keeps its metrics"
        if how == "interrupt":
            gcs = next(row["port"] for row in listeners if Path(row["process"]).name == "gcs_server")
            assert_refuses_a_driver_without_the_token(f"127.0.0.1:{gcs}")
        assert_stops(server, how)
    finally:
        server.kill()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/healthz", timeout=5)
    assert_no_ray_token_left(home)


@pytest.mark.parametrize("how", HOWS)
def test_score_listens_on_loopback_stops_and_a_rerun_loses_nothing_committed(compact_model, archive, tmp_path, how):
    out = tmp_path / "scores"
    args = ["score", "--archive", str(archive), "--model", str(compact_model[0]), "--out", str(out), "--run", "night",
            "--files-per-task", "32", "--commit-rows", "32", "--batch-size", "16", "--threads", "1"]
    home = fresh_home(tmp_path)
    scoring = Command(args, tmp_path / "score.log", tmp_path, env=user_env(HOME=str(home)))
    try:
        scoring.wait_for(lambda: any(out.glob("night/predictions/part-*.parquet")), 300, "a committed part")
        assert_all_on_loopback(scoring, "xray-ray score")
        assert LEAN_SYSTEM_CONFIG.items() <= ray_system_config(scoring).items(), "score's own Ray is lean by default"
        assert_stops(scoring, how)
    finally:
        scoring.kill()
    committed = read_predictions(out / "night")
    assert 0 < len(committed) < ARCHIVE_FILES, "the run was not stopped mid-way"
    assert_no_ray_token_left(home)

    rerun = Command(args, tmp_path / "rerun.log", tmp_path)
    try:
        rerun.wait_for(lambda: rerun.process.poll() == 0, 600, "the re-run to finish")
    finally:
        rerun.kill()
    rows = read_predictions(out / "night")
    assert len(rows) == ARCHIVE_FILES and rows["path"].is_unique and (rows["status"] == "ok").all()
    kept = rows.set_index("path").loc[committed["path"]]
    assert (kept["predicted_label"].to_numpy() == committed["predicted_label"].to_numpy()).all()


@pytest.mark.parametrize("how", HOWS)
def test_demo_head_listens_on_loopback_refuses_tokenless_drivers_and_stops(tmp_path, how):
    out = tmp_path / "demo"
    demo = Command(["demo", "--out", str(out), "--per-class", "8", "--archive-per-class", "2",
                    "--set", "tune.num_samples=1", "--set", "lra.epochs=500", "--set", "lra.patience=500",
                    "--set", "lra.stop_patience=500"], tmp_path / "demo.log", REPO)  # still tuning when stopped
    try:
        demo.wait_for(lambda: "jobs/tune.py" in demo.output(), 300, "the tuning stage")
        assert_all_on_loopback(demo, "xray-ray demo (its driver and its Ray head)")
        if how == "interrupt":
            gcs, token_file = re.search(r"Ray at (\S+);.*token file: (\S+)", demo.output()).groups()
            assert_refuses_a_driver_without_the_token(gcs, Path(token_file))
        assert_stops(demo, how)
    finally:
        demo.kill()
    assert "stop what the demo started" in demo.output()
