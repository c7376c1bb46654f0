"""The RayService's serveConfigV2 is a Serve config our application accepts, without starting Ray."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
from pathlib import Path

import pytest
import yaml

from tests.deploy.kube import REPO, mounts, pod_templates, the
from xray_ray.config import CLASS_NAMES, SERVE_APP_NAME
from xray_ray.model_folder.card import CARD_FILE
from xray_ray.model_folder.registry import CURRENT_FILE
from xray_ray.config_services import ServeConfig
from xray_ray.serving.settings import checked_model


@pytest.fixture()
def serve_config() -> dict:
    return yaml.safe_load(the("RayService")["spec"]["serveConfigV2"])


@pytest.fixture()
def application(serve_config) -> dict:
    (app,) = serve_config["applications"]
    return app


def test_serve_config_v2_parses_as_rays_serve_deploy_schema(serve_config):
    from ray.serve.schema import ServeDeploySchema  # the schema of Serve's REST API, which KubeRay calls

    (app,) = ServeDeploySchema(**serve_config).applications
    assert app.name == SERVE_APP_NAME and app.route_prefix == "/"


def test_it_is_the_application_of_configs_serve_yaml(application):
    (reference,) = yaml.safe_load((REPO / "configs" / "serve.yaml").read_text())["applications"]
    assert {key: application[key] for key in ("name", "route_prefix", "import_path")} == \
        {key: reference[key] for key in ("name", "route_prefix", "import_path")}
    assert application["import_path"] == "xray_ray.serving.app:app_builder"
    assert set(reference["args"]) - {"model"} <= set(application["args"])  # the cluster follows a registry


def _registry(folder: Path) -> Path:
    """The smallest registry the app builder accepts: a current model whose card holds the classes, an input
    size and a version."""
    (folder / "models" / "m-1").mkdir(parents=True)
    (folder / "models" / "m-1" / CARD_FILE).write_text(json.dumps({"classes": list(CLASS_NAMES), "input": {"size": 64},
                                                                  "version": "m-1"}))
    (folder / CURRENT_FILE).write_text(json.dumps({"version": "m-1", "folder": "models/m-1"}))
    return folder


def test_its_args_build_serve_settings(application, tmp_path):
    fields = {field.name for field in dataclasses.fields(ServeConfig)}
    args = application["args"]
    assert set(args) <= fields, f"not `serve:` settings: {set(args) - fields}"
    settings = checked_model(ServeConfig(**{**args, "registry": str(_registry(tmp_path))}))  # it reads the card
    assert settings.ongoing_requests >= settings.max_batch_size


def test_a_broken_args_set_is_refused(application, tmp_path):
    with pytest.raises(ValueError, match="max_ongoing_requests"):
        ServeConfig(**{**application["args"], "max_ongoing_requests": 1})


def _pods():
    return pod_templates(the("RayService")["spec"]["rayClusterConfig"])


def _mounted(path: str, pod: dict) -> tuple[dict, dict]:
    """The (mount, volume) whose mount path holds `path`."""
    matches = [value for mount_path, value in mounts(pod).items() if Path(path).is_relative_to(mount_path)]
    assert matches, f"{path} is on no volume of this pod"
    return max(matches, key=lambda value: len(value[0]["mountPath"]))


def test_listening_beyond_loopback_requires_a_token_from_a_secret(serve_config, application):
    host = serve_config["http_options"]["host"]
    assert not ipaddress.ip_address(host).is_loopback
    token_file = application["args"]["token_file"]
    for pod in _pods():  # the app may be built and its replicas placed on any node
        mount, volume = _mounted(token_file, pod)
        assert mount["readOnly"] and "secret" in volume
        items = {item["path"]: item["key"] for item in volume["secret"]["items"]}
        assert items[str(Path(token_file).relative_to(mount["mountPath"]))] == "token"


def test_the_registry_is_on_a_read_only_volume_of_every_pod(application):
    for pod in _pods():
        mount, volume = _mounted(application["args"]["registry"], pod)
        assert mount["readOnly"] and volume["persistentVolumeClaim"]["readOnly"]


def test_the_service_and_the_nightly_job_follow_the_same_registry(application):
    """Upgrades go through `xray-ray promote`: the manifest names the registry, never a model folder."""
    assert "model" not in application["args"]
    nightly = the("RayCronJob")["spec"]["jobTemplate"]["entrypoint"].split()
    assert nightly[nightly.index("--registry") + 1] == application["args"]["registry"]


def test_serve_deploy_schema_refuses_a_broken_config(serve_config):
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    serve_config["applications"][0].pop("import_path")
    with pytest.raises(ValidationError, match="import_path"):
        ServeDeploySchema(**serve_config)
