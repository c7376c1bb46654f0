"""A model file is used only when its sha256 matches the card's: `model.keras` as much as `model.onnx`
(the Keras fallback of engine `auto` included). No TensorFlow is needed to refuse one."""

from __future__ import annotations

import json

import pytest

from xray_ray.config import CLASS_NAMES
from xray_ray.files import sha256_hex
from xray_ray.model_folder.card import EngineUnavailableError, ModelCard


@pytest.fixture()
def folder(tmp_path):
    (tmp_path / "model.keras").write_bytes(b"the exported keras model")
    card = {"classes": list(CLASS_NAMES), "input": {"size": 64}, "version": "v1",
            "files": {"model.keras": {"sha256": sha256_hex(b"the exported keras model")}}}
    (tmp_path / "model_card.json").write_text(json.dumps(card))
    return tmp_path


def test_the_recorded_keras_file_is_accepted(folder):
    engine, path, reason = ModelCard.read(folder).choose_engine("auto")
    assert (engine, path.name) == ("keras", "model.keras") and "ONNX" in reason


@pytest.mark.parametrize("engine", ["keras", "auto"])
def test_a_replaced_keras_file_is_refused_before_loading(folder, engine):
    (folder / "model.keras").write_bytes(b"someone else's model, maybe with a Lambda layer")
    with pytest.raises(EngineUnavailableError, match="model.keras is corrupt or was replaced"):
        ModelCard.read(folder).choose_engine(engine)


def test_an_exported_card_records_its_files_and_is_read_back_as_written(tmp_path):
    (tmp_path / "model.keras").write_bytes(b"keras weights")
    (tmp_path / "head.npz").write_bytes(b"head weights")
    onnx = {"usable": False, "sha256": sha256_hex(b"graph"), "warning": "model.onnx is NOT usable: parity"}
    description = {"name": "small", "backbone": "compact", "warnings": ["an earlier warning"]}
    card = ModelCard.exported(tmp_path, description, input_size=64, pooling="avg", onnx=onnx)
    card.write()
    saved = ModelCard.read(tmp_path)
    assert saved.data == card.data and saved.image_size == 64 and saved.classes == list(CLASS_NAMES)
    assert saved.version.startswith("small-") and saved.version.endswith(sha256_hex(b"keras weights")[:8])
    assert saved["files"] == {"model.keras": {"sha256": sha256_hex(b"keras weights")},
                              "head.npz": {"sha256": sha256_hex(b"head weights")},
                              "model.onnx": {"sha256": sha256_hex(b"graph")}}
    assert saved["warnings"] == ["an earlier warning", onnx["warning"]] and saved["metrics"] == {}
    assert saved.choose_engine("auto")[0] == "keras"  # the ONNX section says unusable: the checked Keras file runs
