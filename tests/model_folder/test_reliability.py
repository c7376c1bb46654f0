"""Calibration and the out-of-distribution flag, fitted at export, on real trained models (slow: they train)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tests.helpers import train_and_export
from tests.nonchest import nonchest_set
from xray_ray.config import CLASS_NAMES
from xray_ray.images.preprocess import preprocess
from xray_ray.images.synth import phantom
from xray_ray.model_folder.card import OOD_FILE, ModelCard
from xray_ray.model_folder.classifier import Classifier
from xray_ray.model_folder.onnx_export import PARITY_TOLERANCE
from xray_ray.model_folder.ood import threshold_for
from xray_ray.model_folder.reliability import OOD_FALSE_FLAG_RATE, fit_reliability

pytestmark = pytest.mark.timeout(1200)
SLOW_FIXTURES = {"overconfident"}

HELD_OUT_MAX_FLAGGED = 0.15
NONCHEST_MIN_FLAGGED = 0.70
"""Floors for a compact model trained on phantoms; benchmarks/bench_ood.py measures the real-data figures."""


def phantom_files(folder, per_class: int, seed: int, side: int = 96) -> pd.DataFrame:
    """Phantom PNGs drawn exactly as tests.helpers.phantom_batch draws them, indexed as (path, label)."""
    folder.mkdir(parents=True)
    rows = []
    for c, label in enumerate(CLASS_NAMES):
        for i in range(per_class):
            path = folder / f"{c}-{i}.png"
            Image.fromarray(phantom(label, side, np.random.default_rng([seed, c, i]))).save(path)
            rows.append({"path": str(path), "label": label})
    return pd.DataFrame(rows)


def held_out_phantoms(count: int, size: int, seed: int = 404, side: int = 96) -> np.ndarray:
    """Model inputs of `count` fresh phantoms drawn at `side` px (the training phantoms' 96 unless told)."""
    return np.stack([preprocess(phantom(CLASS_NAMES[i % 4], side, np.random.default_rng([seed, i])), size)
                     for i in range(count)])


@pytest.fixture(scope="module")
def overconfident(tmp_path_factory):
    """A compact CNN over-trained (40 epochs) on 6 phantoms per class, then calibrated on 25 per class."""
    root = tmp_path_factory.mktemp("overconfident")
    exported = train_and_export(root / "model", 64, "compact", epochs=40, per_class=6, seed=21)
    train = phantom_files(root / "train", 6, seed=21)
    valid, test = phantom_files(root / "valid", 25, seed=31), phantom_files(root / "test", 25, seed=41)
    fit_reliability(exported.folder, train, valid, test)
    return exported.folder


def test_calibration_lowers_the_held_out_ece_of_an_overconfident_model(overconfident):
    section = ModelCard.read(overconfident)["calibration"]
    test = section["test"]
    assert test["before"]["ece"] > 0.05, "the model is not over-confident: the test would prove nothing"
    assert test["after"]["ece"] < test["before"]["ece"] and test["after"]["nll"] < test["before"]["nll"]
    assert section["method"] in ("temperature", "vector") and section["fitted_on"] == "valid"
    if section["method"] == "temperature":
        assert section["temperature"] > 1  # over-confidence is softened, not sharpened
    classifier = Classifier(overconfident)
    answer = classifier.predict_arrays(held_out_phantoms(8, 64))
    assert (answer.confidence < answer.raw_probabilities.max(axis=1) + 1e-12).mean() > 0.5
    rows = answer.rows()
    assert all({"confidence", "raw_confidence", "ood_score", "out_of_distribution"} <= set(row) for row in rows)


def test_exported_model_carries_calibration_and_detector_in_card_and_report(compact_model):
    folder, reports, card = compact_model
    card = ModelCard.read(folder)
    assert card.verified_file(OOD_FILE).is_file()
    for split in ("valid", "test"):
        assert set(card["calibration"][split]) == {"images", "before", "after"}
        assert set(card["calibration"][split]["after"]) == {"ece", "brier", "nll"}
    ood = card["ood"]
    assert ood["false_flag_target"] == OOD_FALSE_FLAG_RATE and ood["fitted_on"] == "train"
    assert ood["threshold"] == pytest.approx(threshold_for(OOD_FALSE_FLAG_RATE))
    assert ood["held_out_images"]["input"] > ood["held_out_images"]["features"] == card["calibration"]["valid"]["images"]
    assert 0 < ood["valid_flag_rate"] <= 0.1 and ood["feature_dim"] == 128
    assert {"calibration", "ood"} <= set(card.public())
    page = (reports / "index.html").read_text()
    assert "Calibrated confidence" in page and "Out-of-distribution flag" in page
    assert (reports / "reliability.png").stat().st_size > 0


@pytest.mark.parametrize("side", [96, 299])
def test_phantom_model_flags_few_held_out_phantoms_whatever_their_native_resolution(compact_model, side):
    """The model trained on phantoms drawn at 96 px; at 299 px the same scenes lose their pixel noise in the
    resize, as a film digitised at another resolution would. That is not out of distribution."""
    classifier = Classifier(compact_model[0])
    held_out = classifier.predict_arrays(held_out_phantoms(80, classifier.image_size, side=side))
    assert held_out.out_of_distribution.mean() <= HELD_OUT_MAX_FLAGGED


def test_phantom_model_flags_nonchest_inputs(compact_model):
    classifier = Classifier(compact_model[0])
    # phantoms at other sizes are this model's own distribution, so that kind is left out here
    images = [image for kind, image in nonchest_set(4, seed=3) if kind != "phantom_other_size_or_contrast"]
    flagged = classifier.predict(images).out_of_distribution
    assert flagged.mean() >= NONCHEST_MIN_FLAGGED, flagged
    black = classifier.predict([np.zeros((7000, 7000), np.uint8)])
    assert black.out_of_distribution[0] and black.rows()[0]["label"] in CLASS_NAMES  # still answered, but marked


def test_keras_and_onnxruntime_give_the_same_ood_score(compact_model):
    folder = compact_model[0]
    size = ModelCard.read(folder).image_size
    batch = np.concatenate([held_out_phantoms(8, size),
                            np.stack([preprocess(image, size) for _, image in nonchest_set(1, seed=5)])])
    keras, onnx = (Classifier(folder, engine=engine).predict_arrays(batch) for engine in ("keras", "onnxruntime"))
    assert onnx.engine == "onnxruntime" and keras.engine == "keras"
    relative = np.abs(keras.ood_score - onnx.ood_score) / np.maximum(np.abs(onnx.ood_score), 1.0)
    assert relative.max() <= 1e-3, relative
    assert (keras.out_of_distribution == onnx.out_of_distribution).all()
    np.testing.assert_allclose(keras.probabilities, onnx.probabilities, atol=PARITY_TOLERANCE)
