"""The golden set every export records, and the registry's gate, pointer, history and rollback.

Real model folders: the session's compact model, copies of it under other versions (the same
network and figures, so the gate lets them through), copies made worse, broken or stale on
purpose, and one real model at another input size."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from tests.conftest import COMPACT_CONFIG
from tests.helpers import copy_as, train_and_export
from xray_ray.cli import app
from xray_ray.model_folder import registry
from xray_ray.model_folder.card import GOLDEN_FILE, ONNX_FILE, ModelCard
from xray_ray.model_folder.classifier import Classifier
from xray_ray.model_folder.golden import GOLDEN_PER_CLASS, GoldenSetError
from xray_ray.model_folder.reliability import fit_and_measure
from xray_ray.training.evaluate import card_split

pytestmark = pytest.mark.slow


def worse(card: ModelCard, by: float) -> dict:
    """The card's test metrics with accuracy lowered by `by`."""
    metrics = json.loads(json.dumps(card["metrics"]))
    metrics["test"]["accuracy"] -= by
    return metrics


def test_export_records_a_golden_set_that_every_load_reproduces(compact_model):
    folder = compact_model[0]
    card = ModelCard.read(folder)
    golden = card["golden"]
    assert len(golden["images"]) == GOLDEN_PER_CLASS * len(card.classes)
    assert {image["label"] for image in golden["images"]} == set(card.classes)
    assert card["files"][GOLDEN_FILE]["sha256"] == golden["sha256"]
    for engine in ("onnxruntime", "keras"):  # the other engine reproduces them within the parity tolerance
        assert Classifier(folder, engine=engine).version == card.version


@pytest.mark.parametrize("tamper, message", [
    (lambda card: card["golden"]["images"][0]["probabilities"].__setitem__(0, 0.9), "probabilities"),
    (lambda card: card["calibration"].update(method="temperature", temperature=3.0), "golden"),
    (lambda card: card["golden"]["images"][1].update(input_sha256="0" * 64), "digest"),
])
def test_a_folder_that_no_longer_answers_its_golden_set_is_refused(compact_model, tmp_path, tamper, message):
    folder = copy_as(compact_model[0], tmp_path / "tampered", "tampered")
    card = ModelCard.read(folder)
    tamper(card.data)
    card.write()
    with pytest.raises(GoldenSetError, match=message):
        Classifier(folder)


def test_first_promotion_then_a_comparable_model_moves_the_pointer_and_records_history(compact_model, tmp_path):
    reg = tmp_path / "reg"
    first = registry.promote(reg, compact_model[0], reason="first")
    assert first["from"] is None and registry.current_version(reg) == first["to"]
    second = copy_as(compact_model[0], tmp_path / "b", "compact-b")
    event = registry.promote(reg, second, reason="retrained")
    assert (event["from"], event["to"], event["forced"]) == (first["to"], "compact-b", False)
    assert event["figures"]["current"]["accuracy"] == event["figures"]["candidate"]["accuracy"]
    assert registry.current_folder(reg) == reg / "models" / "compact-b"
    assert ModelCard.read(registry.current_folder(reg)).version == "compact-b"
    assert [e["reason"] for e in registry.history(reg)] == ["first", "retrained"]


def test_gate_refuses_a_worse_model_naming_the_figure_and_changes_nothing(compact_model, tmp_path):
    reg = tmp_path / "reg"
    registry.promote(reg, compact_model[0])
    before = (reg / registry.CURRENT_FILE).read_bytes(), (reg / registry.HISTORY_FILE).read_bytes()
    candidate = copy_as(compact_model[0], tmp_path / "worse", "worse", metrics=worse(compact_model[2], 0.05))
    with pytest.raises(registry.PromotionRefused, match=r"accuracy") as refused:
        registry.promote(reg, candidate)
    assert refused.value.check == "accuracy"
    assert ((reg / registry.CURRENT_FILE).read_bytes(), (reg / registry.HISTORY_FILE).read_bytes()) == before
    assert not (reg / "models" / "worse").exists()
    forced = registry.promote(reg, candidate, force=True, reason="known regression, accepted")
    assert forced["forced"] and registry.current_version(reg) == "worse"


def test_gate_refuses_another_input_size(compact_model, learn_index, tmp_path):
    small = tmp_path / "other_size"
    train_and_export(small, 80, backbone="compact", config_file=COMPACT_CONFIG)
    split = card_split(ModelCard.read(compact_model[0]), learn_index)
    fit_and_measure(small, split.part("train"), split.part("valid"), split.part("test"))
    ModelCard.read(small).update(index_fingerprint=compact_model[2]["index_fingerprint"])
    reg = tmp_path / "reg"
    registry.promote(reg, compact_model[0])
    with pytest.raises(registry.PromotionRefused, match="80 px") as refused:
        registry.promote(reg, small)
    assert refused.value.check == "input size"


@pytest.mark.parametrize("breakage, check", [
    (lambda folder: (folder / ONNX_FILE).write_bytes((folder / ONNX_FILE).read_bytes()[:5000]), "onnx export"),
    (lambda folder: ModelCard.read(folder).update(golden=None), "golden set"),
])
def test_force_never_skips_the_models_own_checks(compact_model, tmp_path, breakage, check):
    reg = tmp_path / "reg"
    registry.promote(reg, compact_model[0])
    broken = copy_as(compact_model[0], tmp_path / "broken", "broken")
    breakage(broken)
    with pytest.raises(registry.PromotionRefused) as refused:
        registry.promote(reg, broken, force=True)
    assert refused.value.check == check
    assert registry.current_version(reg) == compact_model[2]["version"]


def test_rollback_goes_back_one_step_at_a_time_and_stops_at_the_first(compact_model, tmp_path):
    reg = tmp_path / "reg"
    versions = [compact_model[2]["version"], "compact-b", "compact-c"]
    registry.promote(reg, compact_model[0])
    for version in versions[1:]:
        registry.promote(reg, copy_as(compact_model[0], tmp_path / version, version))
    assert registry.rollback(reg, reason="bad night")["to"] == "compact-b"
    assert registry.rollback(reg)["to"] == versions[0]
    with pytest.raises(registry.PromotionRefused, match="no earlier model"):
        registry.rollback(reg)
    assert registry.current_version(reg) == versions[0]
    assert registry.standing(registry.history(reg)) == versions[:1]


def test_cli_promote_and_rollback(compact_model, tmp_path):
    reg = tmp_path / "reg"
    runner = CliRunner()
    worse_model = copy_as(compact_model[0], tmp_path / "w", "w", metrics=worse(compact_model[2], 0.2))
    done = runner.invoke(app, ["promote", "--model", str(compact_model[0]), "--registry", str(reg)])
    assert done.exit_code == 0, done.output
    refused = runner.invoke(app, ["promote", "--model", str(worse_model), "--registry", str(reg)])
    assert refused.exit_code == 3 and "accuracy" in refused.output
    assert runner.invoke(app, ["rollback", "--registry", str(reg)]).exit_code == 3
