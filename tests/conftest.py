"""Shared fixtures: one local Ray per session, small synthetic datasets, the real sample set.

The `slow` marker goes on every test that trains a network or starts Ray or Serve, and on
nothing else: tests using a fixture that does so are marked here, and an unmarked test that
leaves Ray running fails, so `make test-fast` stays fast by construction.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from xray_ray.config import load_config

# A Ray Data hang must fail in minutes, not the default 30; no usage stats. Ray's token auth stays as the
# product sets it: on for every Ray the tests start through xray_ray (a test disables it only for a head it
# starts itself, explicitly).
os.environ.setdefault("RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S", "180")
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

COMPACT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "compact_cpu.yaml"
EFFICIENTNETB1_CONFIG = COMPACT_CONFIG.with_name("efficientnetb1_scratch_cpu.yaml")
REAL_DATA = Path(os.environ.get("XRAY_RAY_REAL_DATA",
                                Path(__file__).resolve().parents[1].parent / "shared" / "data" / "xray_real"))


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    """A local Ray for this test session, started as every command starts one (loopback, token auth), in its
    own temp dir, stopped at the end. Subprocesses inherit its token settings and can join it."""
    from xray_ray.ray_runtime import ray_session

    os.environ.pop("RAY_ADDRESS", None)
    with ray_session(num_cpus=2, log_to_driver=False, temp_dir=str(tmp_path_factory.mktemp("ray"))):
        yield


@pytest.fixture(scope="session")
def phantom_root(tmp_path_factory) -> Path:
    """A small phantom dataset in the Radiography DB layout (12 images per class, 128 px)."""
    from xray_ray.images import synth

    root = tmp_path_factory.mktemp("phantoms")
    synth.write_dataset(root, per_class=12, size=128, seed=1)
    return root


@pytest.fixture(scope="session")
def real_root() -> Path:
    """The 240 real X-rays beside the project, read in place; tests using it skip without it."""
    if not (REAL_DATA / "index.csv").is_file():
        pytest.skip(f"real sample set not present at {REAL_DATA}")
    return REAL_DATA


@pytest.fixture(scope="session")
def learn_index(ray_local, tmp_path_factory):
    """150 phantoms per class at 96 px, indexed: enough for the compact CNN to show learning."""
    from xray_ray.images import synth
    from xray_ray.images.index import build_index

    root = tmp_path_factory.mktemp("learn")
    synth.write_dataset(root, per_class=150, size=96, seed=11)
    frame, _ = build_index(root)
    return frame


@pytest.fixture(scope="session")
def compact_model(learn_index, tmp_path_factory):
    """One compact model trained, exported and evaluated through `xray-ray train`'s code path."""
    from xray_ray.training.run import train_and_export

    out = tmp_path_factory.mktemp("models") / "compact"
    reports = tmp_path_factory.mktemp("reports")
    card = train_and_export(learn_index, load_config(COMPACT_CONFIG), out, reports)
    return out, reports, card


SLOW_FIXTURES = {"ray_local", "learn_index", "compact_model"}
"""Fixtures that start Ray or train a network; modules add their own through `slow_fixtures`."""


def pytest_collection_modifyitems(config, items):
    for item in items:
        extra = set(getattr(item.module, "SLOW_FIXTURES", ()))
        if (SLOW_FIXTURES | extra) & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _slow_marker_is_honest(request):
    """A test not marked slow must not leave a Ray running that it started."""
    def ray_running() -> bool:
        ray = sys.modules.get("ray")
        return ray is not None and ray.is_initialized()

    before = ray_running()
    yield
    if request.node.get_closest_marker("slow") is None:
        assert before or not ray_running(), "this test starts Ray: mark it slow"
