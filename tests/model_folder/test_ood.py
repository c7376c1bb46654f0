"""The out-of-distribution score's math: shrinkage, Mahalanobis distances, the two views, the threshold, the arrays on disk."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.covariance import ledoit_wolf as sklearn_ledoit_wolf

from tests.helpers import phantom_batch, write_first_layout
from xray_ray.model_folder.classifier import Predictions
from xray_ray.model_folder.ood import (
    FORMAT,
    SIGNATURE_SIZE,
    Gaussians,
    OodDetector,
    input_signature,
    ledoit_wolf,
    out_of_fold_distances,
    threshold_for,
)


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
    return OodDetector.load(tmp_path / "ood.npz"), detector, details, features, valid, len(train)


def test_views_are_scaled_by_held_out_images_and_survive_a_round_trip(tmp_path):
    loaded, detector, details, features, valid, train_images = _detector(tmp_path)
    assert details["feature_dim"] == 16 and "thumbnail" in details["input_signature"]
    assert details["held_out_images"] == {"features": len(valid), "input": len(valid) + train_images}
    valid_features = features(len(valid))
    np.testing.assert_allclose(loaded.score(valid_features, valid), detector.score(valid_features, valid))
    distances = loaded.view_distances(valid_features, input_signature(valid))
    assert distances.shape == (len(valid), 2) and (distances > 0).all()
    blank = np.zeros((3, 64, 64, 3), np.float32)
    noise = np.random.default_rng(5).uniform(0, 255, (3, 64, 64, 3)).astype(np.float32)
    ramp = np.broadcast_to(np.linspace(0, 255, 64, dtype=np.float32)[None, None, :, None], (3, 64, 64, 3))
    held_out, _ = phantom_batch(3, seed=6, size=64)
    typical = loaded.score(features(len(held_out)), held_out).max()
    for strange in (blank, noise, ramp):  # the input view alone sees these, whatever the features say
        assert (loaded.score(features(3), strange) > typical + 3).all()


def test_signature_has_one_size_for_any_input_size():
    for side in (32, 64, 97, 240):
        batch = np.random.default_rng(side).uniform(0, 255, (2, side, side, 3)).astype(np.float32)
        signature = input_signature(batch)
        assert signature.shape == (2, SIGNATURE_SIZE) and np.isfinite(signature).all()


def test_out_of_fold_distances_score_each_row_with_gaussians_that_never_saw_it():
    rng = np.random.default_rng(7)
    samples = rng.normal(size=(50, 4))
    samples[13] += 40  # one stray row: only a fit that excludes it finds it far
    out_of_fold = out_of_fold_distances(samples)
    in_sample, _ = Gaussians.fit(samples, np.zeros(50, int), standardise=True)
    assert out_of_fold.argmax() == 13 and out_of_fold[13] > in_sample.distance(samples[13:14])[0]
    assert np.median(out_of_fold) > np.median(in_sample.distance(samples))  # unseen rows are farther


@pytest.mark.parametrize("rate, views", [(0.025, 2), (0.05, 2), (0.01, 1)])
def test_threshold_flags_the_target_share_of_standard_normal_views(rate, views):
    z = np.random.default_rng(8).standard_normal((400_000, views))
    assert (z.max(axis=1) > threshold_for(rate, views)).mean() == pytest.approx(rate, rel=0.05)


@pytest.mark.parametrize("rate", [0, 1, -0.1, 1.5])
def test_threshold_refuses_a_rate_outside_0_and_1(rate):
    with pytest.raises(ValueError, match="between 0 and 1"):
        threshold_for(rate)


def test_a_detector_in_another_layout_is_refused_with_a_way_out(tmp_path):
    _detector(tmp_path)  # writes a current ood.npz
    write_first_layout(tmp_path / "ood.npz", tmp_path / "old.npz")
    with pytest.raises(ValueError, match=f"layout 1, this xray-ray reads layout {FORMAT}: refit it, without "
                                         f"retraining, with `xray-ray refit --model {tmp_path} --index"):
        OodDetector.load(tmp_path / "old.npz")


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
