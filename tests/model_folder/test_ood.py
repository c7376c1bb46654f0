"""The out-of-distribution score's math: shrinkage, Mahalanobis distances, the two views, the arrays on disk."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.covariance import ledoit_wolf as sklearn_ledoit_wolf

from tests.helpers import phantom_batch
from xray_ray.model_folder.classifier import Predictions
from xray_ray.model_folder.ood import Gaussians, OodDetector, input_signature, ledoit_wolf


def test_shrinkage_matches_scikit_learn_and_keeps_few_samples_invertible():
    rng = np.random.default_rng(0)
    samples = rng.normal(size=(40, 100)) @ rng.normal(size=(100, 100))  # fewer samples than dimensions
    centred = samples - samples.mean(axis=0)
    ours, shrinkage = ledoit_wolf(centred)
    theirs, their_shrinkage = sklearn_ledoit_wolf(centred, assume_centered=True)
    assert shrinkage == pytest.approx(their_shrinkage) and 0 < shrinkage < 1
    np.testing.assert_allclose(ours, theirs, rtol=1e-9, atol=1e-9)
    assert np.linalg.eigvalsh(ours).min() > 0


def test_distance_is_the_squared_mahalanobis_distance_to_the_nearest_class_mean():
    rng = np.random.default_rng(1)
    groups = np.repeat([0, 1, 2], 200)
    samples = rng.normal(size=(600, 5)) + np.array([[0] * 5, [6] * 5, [-6] * 5])[groups]
    gaussians, _ = Gaussians.fit(samples, groups)
    means = np.stack([samples[groups == g].mean(0) for g in range(3)])
    covariance, _ = ledoit_wolf(samples - means[groups])
    precision = np.linalg.inv(covariance)
    query = rng.normal(size=(7, 5)) * 4
    expected = np.min([np.einsum("ni,ij,nj->n", query - m, precision, query - m) for m in means], axis=0)
    np.testing.assert_allclose(gaussians.distance(query), expected, rtol=1e-8)


def _detector(tmp_path):
    """A detector on phantom signatures and made-up features, saved and loaded back."""
    rng = np.random.default_rng(2)
    train, labels = phantom_batch(12, seed=3, size=64)
    valid, _ = phantom_batch(6, seed=4, size=64)
    features = lambda n: rng.normal(size=(n, 16))
    detector, details = OodDetector.fit(features(len(train)), labels.argmax(1), input_signature(train),
                                        features(len(valid)), input_signature(valid))
    detector.save(tmp_path / "ood.npz")
    return OodDetector.load(tmp_path / "ood.npz"), detector, details, features, valid


def test_views_are_scaled_by_the_validation_scores_and_survive_a_round_trip(tmp_path):
    loaded, detector, details, features, valid = _detector(tmp_path)
    assert details["feature_dim"] == 16 and "thumbnail" in details["input_signature"]
    valid_features = features(len(valid))
    np.testing.assert_allclose(loaded.score(valid_features, valid), detector.score(valid_features, valid))
    distances = loaded.view_distances(valid_features, input_signature(valid))
    assert distances.shape == (len(valid), 2) and (distances > 0).all()
    blank = np.zeros((3, 64, 64, 3), np.float32)
    noise = np.random.default_rng(5).uniform(0, 255, (3, 64, 64, 3)).astype(np.float32)
    held_out, _ = phantom_batch(3, seed=6, size=64)
    typical = np.percentile(loaded.score(features(len(held_out)), held_out), 95)
    for strange in (blank, noise):  # the input view alone sees these, whatever the features say
        assert (loaded.score(features(3), strange) > 3 * max(typical, 1)).all()


def test_pickled_arrays_are_refused(tmp_path):
    with open(tmp_path / "ood.npz", "wb") as file:
        np.savez(file, feature_means=np.array([object()], dtype=object))
    with pytest.raises(ValueError, match="pickle"):
        OodDetector.load(tmp_path / "ood.npz")


def test_answer_rows_carry_calibrated_and_raw_confidence_and_the_flag():
    raw = np.array([[0.97, 0.01, 0.01, 0.01], [0.1, 0.2, 0.3, 0.4]])
    calibrated = np.array([[0.7, 0.1, 0.1, 0.1], [0.2, 0.2, 0.25, 0.35]])
    rows = Predictions(calibrated, ["a", "b", "c", "d"], "v1", "onnxruntime", raw, np.array([3.5, 0.2]),
                       np.array([True, False])).rows()
    assert rows[0]["label"] == "a" and rows[0]["confidence"] == 0.7 and rows[0]["raw_confidence"] == 0.97
    assert rows[0]["out_of_distribution"] is True and rows[0]["ood_score"] == 3.5
    assert rows[1]["out_of_distribution"] is False and rows[1]["label"] == "d"
    plain = Predictions(raw, ["a", "b", "c", "d"], "v0", "keras").rows()  # a model exported without a detector
    assert plain[0]["ood_score"] is None and plain[0]["out_of_distribution"] is False
    assert plain[0]["confidence"] == plain[0]["raw_confidence"] == 0.97
