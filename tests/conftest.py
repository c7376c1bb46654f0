"""Shared fixtures: one local Ray per session, small synthetic datasets, the real sample set."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# A Ray Data hang must fail in minutes, not the default 30; no usage stats; no auth token.
os.environ.setdefault("RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S", "180")
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "xray_real"


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    """A local Ray for this test session, in its own temp dir, stopped at the end."""
    import ray

    os.environ.pop("RAY_ADDRESS", None)
    temp_dir = tmp_path_factory.mktemp("ray")
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=str(temp_dir), log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def phantom_root(tmp_path_factory) -> Path:
    """A small phantom dataset in the Radiography DB layout (12 images per class, 128 px)."""
    from xray_ray import synth

    root = tmp_path_factory.mktemp("phantoms")
    synth.write_dataset(root, per_class=12, size=128, seed=1)
    return root


@pytest.fixture(scope="session")
def real_root() -> Path:
    """The 240 real X-rays beside the project, read in place; tests using it skip without it."""
    if not (REAL_DATA / "index.csv").is_file():
        pytest.skip(f"real sample set not present at {REAL_DATA}")
    return REAL_DATA
