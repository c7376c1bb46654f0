"""One Ray session for every command: library code refuses to run without one and never starts a default Ray,
and each command, run by a user whose home folder is new, leaves no Ray token there and listens on loopback only.

Before the session, `xray-ray train` let Ray Data start a default Ray, which wrote ~/.ray/auth_token with mode
0644 and opened Ray's dashboard.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import REPO
from tests.running import Command, user_env
from xray_ray.loopback import is_loopback_host

OUTSIDE_A_SESSION = """
import json, sys
from pathlib import Path

import xray_ray  # as every entry point does, before Ray
import ray
from xray_ray.config import load_config
from xray_ray.config_services import ScoreConfig, ServeConfig
from xray_ray.images import synth
from xray_ray.images.index import build_index, discover
from xray_ray.ray_runtime import NoRaySessionError
from xray_ray.scoring.preflight import RunInputs
from xray_ray.scoring.run import score
from xray_ray.serving.app import start
from xray_ray.training.data import prepare

root = Path(sys.argv[1])
synth.write_dataset(root / "data", per_class=2, size=64, seed=0)
frame = __import__("pandas").DataFrame({"path": ["a", "b"], "label": ["COVID", "Normal"]})
calls = {
    "build_index": lambda: build_index(root / "data"),
    "prepare": lambda: prepare(frame, (0.5, 0.25, 0.25), 1, "undersample"),
    "score": lambda: score(ScoreConfig(archives=[str(root)], out=str(root / "out"), model=str(root)),
                           RunInputs([root], None, None)),
    "serve": lambda: start(ServeConfig(model=str(root))),
    "ray_data": lambda: ray.data.from_items([1, 2]).count(),  # Ray's own auto-start, switched off
}
found = {}
for name, call in calls.items():
    try:
        call()
        found[name] = "ran"
    except NoRaySessionError as err:
        found[name] = "refused: " + str(err)
    except Exception as err:
        found[name] = type(err).__name__ + ": " + str(err)
found["ray_initialized"] = ray.is_initialized()
print(json.dumps(found))
"""


def test_ray_needing_functions_refuse_outside_a_session_and_start_nothing(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    done = subprocess.run([sys.executable, "-c", OUTSIDE_A_SESSION, str(tmp_path)], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=user_env(HOME=str(home)))
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    for name in ("build_index", "prepare", "score", "serve"):
        assert found[name].startswith("refused: ") and "ray_session()" in found[name], (name, found[name])
    assert "Ray has not been started" in found["ray_data"], found["ray_data"]
    assert found["ray_initialized"] is False
    assert not (home / ".ray").exists()


def run_watching(args: list[str], home: Path, cwd: Path, timeout: float = 900) -> list[dict]:
    """`xray-ray ARGS` as a user with home folder `home`; every TCP listener its process tree opened while it ran."""
    command = Command(args, cwd / f"{args[0]}.log", cwd, env=user_env(HOME=str(home)))
    seen: dict[tuple, dict] = {}
    deadline = time.monotonic() + timeout
    try:
        while command.process.poll() is None:
            assert time.monotonic() < deadline, f"{args[0]} still running after {timeout} s"
            seen.update({(row["address"], row["port"], row["pid"]): row for row in command.listeners()})
            time.sleep(0.3)
    finally:
        command.kill()
    assert command.process.returncode == 0, command.output()[-3000:]
    return list(seen.values())


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_each_command_in_a_fresh_home_leaves_no_token_and_listens_on_loopback_only(tmp_path):
    """synth, index, train, evaluate, refit and tune as a new user runs them (serve and score: tests/test_stops.py).
    Ray-using commands open their listeners on 127.0.0.1 only; evaluate and refit need no Ray and open none."""
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    small = ["--config", str(REPO / "configs" / "compact_cpu.yaml"), "--set", "data.image_size=64",
             "--set", "lra.epochs=1"]
    runs = {
        "synth": ["synth", "data", "--per-class", "8", "--size", "64"],
        "index": ["index", "data", "--out", "index.parquet"],
        "train": ["train", "--index", "index.parquet", "--out", "models/m", *small],
        "evaluate": ["evaluate", "--model", "models/m", "--index", "index.parquet"],
        "refit": ["refit", "--model", "models/m", "--index", "index.parquet"],
        "tune": ["tune", "--index", "index.parquet", "--name", "t", *small, "--set", "tune.num_samples=1",
                 "--set", "tune.scheduler=none", "--set", "tune.max_concurrent_trials=1"],
    }
    for name, args in runs.items():
        listeners = run_watching(args, home, work)
        exposed = [row for row in listeners if not is_loopback_host(row["address"])]
        assert not exposed, f"{name} listened beyond loopback: {exposed}"
        if name in ("synth", "evaluate", "refit"):
            assert not listeners, f"{name} needs no Ray, yet listened: {listeners}"
        else:
            assert listeners, f"{name} opened no listener: its Ray was not seen"
        assert not (home / ".ray").exists(), f"{name} left {home / '.ray'}: {list((home / '.ray').rglob('*'))}"
