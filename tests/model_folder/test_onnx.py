"""The ONNX Runtime engine: export with a parity check, engine selection, and no TensorFlow where it serves."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import REPO as ROOT  # noqa: N811
from tests.helpers import Exported, phantom_batch
from tests.model_folder.conftest import SIZE
from xray_ray.config import CLASS_NAMES
from xray_ray.files import sha256_hex
from xray_ray.images import synth
from xray_ray.model_folder import onnx_export
from xray_ray.model_folder.card import (
    CARD_FILE,
    MODEL_FILE,
    EngineUnavailableError,
    ModelCard,
)
from xray_ray.model_folder.classifier import Classifier
from xray_ray.model_folder.engines import onnx_threads
from xray_ray.model_folder.export import export_model

pytestmark = pytest.mark.timeout(600)
SLOW_FIXTURES = {"models", "keras_engine"}  # they train networks (`models`: tests/model_folder/conftest.py)



@pytest.fixture(scope="module")
def keras_engine(models):
    """The keras-engine Classifier per model, loaded once (loading EfficientNetB1 takes a while)."""
    loaded: dict[str, Classifier] = {}

    def get(name: str) -> Classifier:
        if name not in loaded:
            loaded[name] = Classifier(models[name].folder, engine="keras")
        return loaded[name]

    return get


def _assert_parity(keras_p: np.ndarray, onnx_p: np.ndarray) -> None:
    assert keras_p.shape == onnx_p.shape
    assert np.abs(keras_p - onnx_p).max() <= onnx_export.PARITY_TOLERANCE, np.abs(keras_p - onnx_p).max()
    assert (keras_p.argmax(1) == onnx_p.argmax(1)).all()


def _assert_varies(probabilities: np.ndarray) -> None:
    """An untrained network answers 0.25 everywhere, and parity on it would prove nothing."""
    assert probabilities.std(axis=0).max() > 1e-3, probabilities[:4]


def _copy(exported: Exported, target: Path) -> Path:
    shutil.copytree(exported.folder, target)
    return target


@pytest.mark.parametrize("name", ["compact", "effb1"])
def test_export_writes_usable_onnx_with_parity_in_the_card(models, name):
    exported = models[name]
    card = ModelCard.read(exported.folder).data
    assert card == json.loads(json.dumps(exported.card))
    section = card["onnx"]
    assert section["usable"] is True and "warning" not in section and "warnings" not in card
    assert section["file"] == "model.onnx" and (exported.folder / "model.onnx").is_file()
    assert section["converter"] == "tf2onnx 1.17.0" and section["opset"] == 15
    assert section["onnxruntime"] == "1.32.0"
    assert card["files"]["model.onnx"]["sha256"] == section["sha256"]
    parity = section["parity"]
    assert parity["passed"] and parity["max_abs_diff"] <= onnx_export.PARITY_TOLERANCE and parity["argmax_differs"] == 0
    assert parity["argmax_agreement"] == 1.0 and parity["images"] == 4 * onnx_export.PARITY_PER_CLASS
    assert parity["probability_std_across_images"] > 1e-3
    assert card["versions"]["onnxruntime"] == "1.32.0"


@pytest.mark.parametrize("name", ["compact", "effb1"])
def test_engines_agree_on_synthetic_images(models, keras_engine, name):
    exported = models[name]
    x, _ = phantom_batch(5, seed=99, size=SIZE)  # not the images it trained or was parity-checked on
    keras_p = keras_engine(name).predict_arrays(x).probabilities
    onnx_p = Classifier(exported.folder, engine="onnxruntime").predict_arrays(x).probabilities
    _assert_varies(keras_p)
    _assert_parity(keras_p, onnx_p)
    np.testing.assert_allclose(keras_p, np.asarray(exported.model.predict_on_batch(x)), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["compact", "effb1"])
def test_engines_agree_on_real_images(models, keras_engine, name, real_root):
    with open(real_root / "index.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    subset = [str(real_root / row["file_path"]) for label in CLASS_NAMES
              for row in [r for r in rows if r["label"] == label][:10]]
    assert len(subset) == 40
    keras_p, keras_errors = keras_engine(name).predict_files(subset)
    onnx_p, onnx_errors = Classifier(models[name].folder, engine="onnxruntime").predict_files(subset)
    assert keras_errors == onnx_errors == [""] * len(subset)
    _assert_varies(keras_p)
    _assert_parity(keras_p, onnx_p)


def test_engine_selection(models, keras_engine, tmp_path):
    exported = models["compact"]
    x, _ = phantom_batch(1, seed=7, size=SIZE)

    default = Classifier(exported.folder)
    answer = default.predict_arrays(x)
    assert default.engine == answer.engine == "onnxruntime" and default.provider == "CPUExecutionProvider"
    assert default.threads == os.cpu_count()  # this test process is a Ray driver at most, never a worker
    assert {row["engine"] for row in answer.rows()} == {"onnxruntime"}
    assert {row["model_version"] for row in answer.rows()} == {exported.card["version"]}
    assert default.describe()["engine"] == "onnxruntime"

    keras_answer = keras_engine("compact").predict_arrays(x)
    assert keras_answer.engine == "keras" and {row["engine"] for row in keras_answer.rows()} == {"keras"}

    without = _copy(exported, tmp_path / "without")
    (without / "model.onnx").unlink()
    assert Classifier(without).engine == "keras"
    with pytest.raises(EngineUnavailableError, match="model.onnx is missing"):
        Classifier(without, engine="onnxruntime")

    old = _copy(exported, tmp_path / "old")  # exported before ONNX support: no card section, no file
    (old / "model.onnx").unlink()
    card = json.loads((old / CARD_FILE).read_text())
    del card["onnx"]
    (old / CARD_FILE).write_text(json.dumps(card))
    assert Classifier(old).engine == "keras"
    with pytest.raises(EngineUnavailableError, match="no ONNX export"):
        Classifier(old, engine="onnxruntime")

    with pytest.raises(ValueError, match="engine must be one of"):
        Classifier(exported.folder, engine="tensorrt")


def test_corrupt_onnx_is_refused(models, tmp_path, caplog):
    exported = models["compact"]
    corrupt = _copy(exported, tmp_path / "corrupt")
    (corrupt / "model.onnx").write_bytes(b"\x08\x07garbage, not a protobuf graph" * 10)
    with pytest.raises(EngineUnavailableError, match=r"model.onnx is corrupt or was replaced: its sha256"):
        Classifier(corrupt, engine="onnxruntime")
    with caplog.at_level(logging.WARNING, logger="xray_ray.model_folder.classifier"):
        fallback = Classifier(corrupt)
    assert fallback.engine == "keras" and "corrupt" in caplog.text

    # The same garbage with a card that vouches for it: ONNX Runtime's own refusal is the message.
    card = json.loads((corrupt / CARD_FILE).read_text())
    card["files"]["model.onnx"]["sha256"] = sha256_hex((corrupt / "model.onnx").read_bytes())
    (corrupt / CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(EngineUnavailableError, match="ONNX Runtime cannot load"):
        Classifier(corrupt, engine="onnxruntime")
    assert Classifier(corrupt).engine == "keras"


def test_failed_conversion_keeps_the_keras_export(models, tmp_path, monkeypatch, caplog):
    def broken(model, image_size):
        raise RuntimeError("simulated converter bug")

    monkeypatch.setattr(onnx_export, "convert", broken)
    exported = models["compact"]
    with caplog.at_level(logging.WARNING, logger="xray_ray.model_folder.onnx_export"):
        card = export_model(exported.model, tmp_path / "noonnx", {**exported.card, "name": "noonnx"})
    assert "simulated converter bug" in caplog.text
    folder = tmp_path / "noonnx"
    assert (folder / MODEL_FILE).is_file() and not (folder / "model.onnx").exists()
    assert ModelCard.read(folder).data == json.loads(json.dumps(card))
    assert card["onnx"]["usable"] is False and "simulated converter bug" in card["onnx"]["reason"]
    assert any("not written" in line for line in card["warnings"])
    assert "model.onnx" not in card["files"]
    assert Classifier(folder).engine == "keras"
    with pytest.raises(EngineUnavailableError, match="unusable: conversion failed"):
        Classifier(folder, engine="onnxruntime")


def test_parity_failure_marks_the_file_unusable(models, tmp_path, monkeypatch, caplog):
    import onnx
    from onnx import numpy_helper

    real_convert = onnx_export.convert

    def drifting(model, image_size):  # a converter that silently changes the weights by 10 %
        graph = onnx.load_from_string(real_convert(model, image_size))
        for init in graph.graph.initializer:
            values = numpy_helper.to_array(init)
            if values.dtype == np.float32 and values.size > 1:
                init.CopyFrom(numpy_helper.from_array(values * np.float32(1.1), init.name))
        return graph.SerializeToString()

    monkeypatch.setattr(onnx_export, "convert", drifting)
    exported = models["compact"]
    with caplog.at_level(logging.WARNING, logger="xray_ray.model_folder.onnx_export"):
        card = export_model(exported.model, tmp_path / "drift", {**exported.card, "name": "drift"})
    assert "parity check failed" in caplog.text and "NOT usable" in caplog.text
    section = card["onnx"]
    assert section["usable"] is False and section["parity"]["passed"] is False
    assert section["parity"]["max_abs_diff"] > onnx_export.PARITY_TOLERANCE
    assert any("NOT usable" in line for line in card["warnings"])
    assert (tmp_path / "drift" / "model.onnx").is_file()  # kept for diagnosis, never used
    assert Classifier(tmp_path / "drift").engine == "keras"
    with pytest.raises(EngineUnavailableError, match="parity check failed"):
        Classifier(tmp_path / "drift", engine="onnxruntime")


def test_parity_comparison_rules():
    base = np.array([[0.7, 0.1, 0.1, 0.1], [0.2, 0.5, 0.2, 0.1]])
    tolerance = onnx_export.PARITY_TOLERANCE
    assert onnx_export.compare(base, base + tolerance / 2)["passed"]
    assert not onnx_export.compare(base, base + tolerance * 2)["passed"]
    swapped = base.copy()
    swapped[1] = [0.5, 0.2, 0.2, 0.1]
    result = onnx_export.compare(base, swapped)
    assert not result["passed"] and result["argmax_differs"] == 1 and result["argmax_agreement"] == 0.5
    assert not onnx_export.compare(base, base[:1])["passed"]


def _png(label: str, seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(synth.phantom(label, 96, np.random.default_rng(seed))).save(buffer, format="PNG")
    return buffer.getvalue()


def test_onnxruntime_process_never_imports_tensorflow(models, keras_engine, tmp_path):
    exported = models["effb1"]
    images = [tmp_path / f"{i}.png" for i in range(4)]
    for i, path in enumerate(images):
        path.write_bytes(_png(CLASS_NAMES[i], i))
    code = (
        "import json, sys\n"
        "from xray_ray.model_folder.classifier import Classifier\n"
        f"classifier = Classifier({str(exported.folder)!r})\n"
        f"answer = classifier.predict([open(p, 'rb').read() for p in {[str(p) for p in images]!r}])\n"
        "print(json.dumps({'engine': answer.engine, 'rows': answer.rows(),\n"
        "                  'probabilities': answer.probabilities.tolist(),\n"
        "                  'loaded': sorted(m for m in ('tensorflow', 'keras', 'tf2onnx') if m in sys.modules)}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], check=False, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["loaded"] == [], f"an onnxruntime process imported {result['loaded']}"
    assert result["engine"] == "onnxruntime" and {r["engine"] for r in result["rows"]} == {"onnxruntime"}
    assert {r["model_version"] for r in result["rows"]} == {exported.card["version"]}
    here = keras_engine("effb1").predict([p.read_bytes() for p in images]).probabilities
    _assert_parity(here, np.array(result["probabilities"]))


def test_ray_actor_on_onnxruntime_never_imports_tensorflow(models, ray_local):
    import ray

    exported = models["effb1"]
    x, _ = phantom_batch(2, seed=3, size=SIZE)

    # A fresh worker (its own runtime env), so no earlier task can have imported TensorFlow into it.
    @ray.remote(num_cpus=1, runtime_env={"env_vars": {"XRAY_TEST_ONNX_ACTOR": "1"}})
    class Scorer:
        def __init__(self, model_dir):
            from xray_ray.model_folder.classifier import Classifier

            self.classifier = Classifier(model_dir)

        def score(self, batch):
            import sys

            answer = self.classifier.predict_arrays(batch)
            return {"engine": answer.engine, "threads": self.classifier.threads,
                    "provider": self.classifier.provider, "probabilities": answer.probabilities,
                    "loaded": sorted(m for m in ("tensorflow", "keras", "tf2onnx") if m in sys.modules)}

    actor = Scorer.remote(str(exported.folder))
    try:
        result = ray.get(actor.score.remote(x), timeout=300)
    finally:
        ray.kill(actor)
    assert result["loaded"] == [], f"a scoring actor on onnxruntime imported {result['loaded']}"
    assert result["engine"] == "onnxruntime" and result["provider"] == "CPUExecutionProvider"
    assert result["threads"] == 1  # exactly the one CPU Ray reserved for the actor
    _assert_parity(np.asarray(exported.model.predict_on_batch(x)), result["probabilities"])
    assert onnx_threads() == os.cpu_count()  # the driver is not a Ray worker


@pytest.mark.parametrize("name", ["compact", "effb1"])
def test_graph_outputs_features_and_maps_on_both_engines_and_the_head_file_reproduces_the_answer(models, name):
    """The exported graph's extra outputs agree across engines, and head.npz turns features into the probabilities."""
    x, _ = phantom_batch(2, seed=13, size=SIZE)
    names = ("probabilities", "features", "conv_maps")
    folder = models[name].folder
    fast, reference = Classifier(folder).forward(x, names), Classifier(folder, engine="keras").forward(x, names)
    for output in names:
        scale = np.abs(reference[output]).max()
        np.testing.assert_allclose(fast[output], reference[output], rtol=0, atol=2e-3 * scale)
    maps = fast["conv_maps"]
    pooled = maps.mean(axis=(1, 2)) if models[name].card["pooling"] == "avg" else maps.max(axis=(1, 2))
    np.testing.assert_allclose(pooled, fast["features"], rtol=1e-4, atol=1e-4 * np.abs(pooled).max())
    head = Classifier(folder).head()
    hidden = np.maximum(0, (fast["features"] * head["bn_scale"] + head["bn_shift"]) @ head["dense_w"] + head["dense_b"])
    logits = hidden @ head["out_w"] + head["out_b"]
    softmax = np.exp(logits - logits.max(axis=1, keepdims=True))
    np.testing.assert_allclose(softmax / softmax.sum(axis=1, keepdims=True), fast["probabilities"], atol=1e-4)
