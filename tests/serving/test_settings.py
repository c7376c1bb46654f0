"""Serve's settings, checked before any Ray starts: exposure without a token, the expected model version,
the memory budget."""

from __future__ import annotations

import json
import logging

import pytest
from typer.testing import CliRunner

from xray_ray.cli import app
from xray_ray.config import CLASS_NAMES
from xray_ray.config_services import ServeConfig
from xray_ray.serving.settings import check_exposure, checked_model, decode_slots, memory_budget_mb


@pytest.fixture()
def model_folder(tmp_path):
    """A model folder whose card is valid (no model files: nothing here loads one)."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model_card.json").write_text(json.dumps({"classes": list(CLASS_NAMES), "input": {"size": 64},
                                                         "version": "compact-v1"}))
    return folder


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10"])
def test_serve_refuses_a_network_host_without_a_token(model_folder, host, monkeypatch):
    monkeypatch.delenv("XRAY_RAY_SERVE_TOKEN", raising=False)
    result = CliRunner().invoke(app, ["serve", "--model", str(model_folder), "--host", host])
    assert result.exit_code == 2 and "--insecure-no-token" in result.output and "exposes" in result.output


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1"])
def test_loopback_needs_no_token(host):
    check_exposure(host, None, insecure_no_token=False)


def test_a_token_or_the_insecure_flag_lets_serve_listen_on_the_network(caplog):
    check_exposure("0.0.0.0", "s3cret-token", insecure_no_token=False)
    assert not caplog.records
    with caplog.at_level(logging.WARNING):
        check_exposure("0.0.0.0", None, insecure_no_token=True)
    assert any("WITHOUT A TOKEN" in record.getMessage() for record in caplog.records)


def test_expect_version_refuses_another_model(model_folder):
    assert checked_model(ServeConfig(model=str(model_folder), expect_version="compact-v1")).model == \
        str(model_folder.resolve())
    result = CliRunner().invoke(app, ["serve", "--model", str(model_folder), "--expect-version", "compact-v2"])
    assert result.exit_code == 2 and "compact-v1" in result.output and "compact-v2" in result.output


def test_memory_budget_grows_with_what_a_replica_may_hold(model_folder):
    small = ServeConfig(model=str(model_folder), num_cpus=1, max_body_mb=1, max_inflight_mb=8)
    more_bodies = ServeConfig(model=str(model_folder), num_cpus=1, max_body_mb=1, max_inflight_mb=64)
    more_decoders = ServeConfig(model=str(model_folder), num_cpus=4, max_body_mb=1, max_inflight_mb=8)
    assert decode_slots(small) == 1 and decode_slots(more_decoders) == 4
    assert memory_budget_mb(small) < memory_budget_mb(more_bodies) and \
        memory_budget_mb(small) < memory_budget_mb(more_decoders)
    with pytest.raises(ValueError, match="max_inflight_mb"):
        ServeConfig(model=str(model_folder), max_body_mb=64, max_inflight_mb=8)
