"""cluster.yaml is a valid Ray cluster-launcher config, with the shape the README promises."""

from __future__ import annotations

import pytest
import yaml

from tests.helpers import REPO

CLUSTER_YAML = REPO / "cluster.yaml"


@pytest.fixture()
def config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_cluster_yaml_passes_rays_own_schema(config):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(config))  # ray/autoscaler/ray-schema.json, plus Ray's own checks


def test_schema_check_can_fail(config):
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    config["available_node_types"]["gpu_worker"]["min_workers"] = "zero"
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(config))


def test_gpu_workers_scale_from_zero_on_pinned_ray_images(config):
    import ray

    workers = config["available_node_types"]["gpu_worker"]
    assert config["provider"]["type"] == "aws"
    assert workers["min_workers"] == 0 and workers["max_workers"] >= 1
    assert config["head_node_type"] == "head"
    for image in (config["docker"]["image"], config["docker"]["head_image"]):
        assert image.startswith(f"rayproject/ray:{ray.__version__}-") and "ray-ml" not in image
    assert config["docker"]["image"].endswith("-gpu")
    assert any("[gpu]" in command for command in config["worker_setup_commands"])
    assert "CHANGE" in CLUSTER_YAML.read_text()


def test_dashboard_stays_on_the_heads_loopback(config):
    (command,) = [c for c in config["head_start_ray_commands"] if "ray start" in c]
    assert "--dashboard-host=127.0.0.1" in command and "--disable-usage-stats" in command


def _start_commands(config: dict, key: str) -> list[str]:
    return [c for c in config[key] if "ray start" in c]


def test_every_node_starts_ray_with_token_auth_and_the_mounted_token(config):
    token = "/home/ray/.ray/auth_token"
    source = config["file_mounts"][token]
    assert source.startswith("~/") and not (CLUSTER_YAML.parent / source).exists()  # outside the project
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        (command,) = _start_commands(config, key)
        assert "RAY_AUTH_MODE=token" in command and "RAY_AUTH_TOKEN_PATH=~/.ray/auth_token" in command
        assert "RAY_AUTH_MODE=disabled" not in CLUSTER_YAML.read_text()
        chmod = [c for c in config[key] if c.startswith("chmod 600 ~/.ray/auth_token")]
        assert chmod and config[key].index(chmod[0]) < config[key].index(command), key
    assert "chmod 600 ~/.ray/auth_token" in config["setup_commands"]  # head and workers alike


def test_the_token_is_never_committed_nor_shipped(config):
    import subprocess

    for copy in ("ray_auth_token", "secrets/auth_token", ".xray-ray/ray_auth_token"):
        ignored = subprocess.run(["git", "check-ignore", "-q", copy], cwd=CLUSTER_YAML.parent, check=False)
        assert ignored.returncode == 0, copy  # a copy inside the project is ignored by git (and by --working-dir)
    assert any("auth_token" in pattern for pattern in config["rsync_exclude"])
