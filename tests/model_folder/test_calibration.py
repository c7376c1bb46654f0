"""Calibration math: the metrics, temperature and vector scaling, choosing between them, the card round trip."""

from __future__ import annotations

import numpy as np
import pytest

from xray_ray.model_folder.calibration import (
    Calibration,
    calibration_metrics,
    choose_and_fit,
    expected_calibration_error,
    fit_temperature,
    reliability_bins,
)


def overconfident(n: int, seed: int, sharpness: float = 4.0) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities whose true temperature is `sharpness`: softmax(sharpness * z) where z is calibrated."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 4))
    true = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    labels = np.array([rng.choice(4, p=p) for p in true])
    sharp = np.exp(sharpness * z)
    return sharp / sharp.sum(axis=1, keepdims=True), labels


def test_metrics_on_hand_computed_cases():
    probabilities = np.array([[0.9, 0.1, 0, 0], [0.6, 0.4, 0, 0], [0.3, 0.7, 0, 0]])
    labels = np.array([0, 1, 1])
    # bins: 0.9 (right), 0.6 (wrong), 0.7 (right): |1-.9| + |0-.6| + |1-.7| over 3
    assert expected_calibration_error(probabilities, labels) == pytest.approx((0.1 + 0.6 + 0.3) / 3)
    figures = calibration_metrics(probabilities, labels)
    assert figures["brier"] == pytest.approx(((0.01 + 0.01) + (0.36 + 0.36) + (0.09 + 0.09)) / 3)
    assert figures["nll"] == pytest.approx(-(np.log(0.9) + np.log(0.4) + np.log(0.7)) / 3)
    assert [b["images"] for b in reliability_bins(probabilities, labels)] == [1, 1, 1]
    # a probability that underflowed to 0 gives a large finite NLL, not inf
    assert np.isfinite(calibration_metrics(np.array([[1.0, 0, 0, 0]]), np.array([2]))["nll"])


def test_temperature_recovers_the_sharpening_and_lowers_held_out_ece():
    fit_p, fit_y = overconfident(3000, seed=1)
    calibration = fit_temperature(fit_p, fit_y)
    assert calibration.temperature == pytest.approx(4.0, rel=0.1)
    test_p, test_y = overconfident(2000, seed=2)
    before, after = calibration_metrics(test_p, test_y), calibration_metrics(calibration.apply(test_p), test_y)
    assert after["ece"] < before["ece"] / 3 and after["nll"] < before["nll"] and after["brier"] < before["brier"]
    np.testing.assert_allclose(calibration.apply(test_p).sum(axis=1), 1.0)
    assert (calibration.apply(test_p).argmax(1) == test_p.argmax(1)).all()  # temperature never changes the answer


def test_choice_is_by_cross_validated_nll_and_vector_scaling_can_win():
    p, y = overconfident(400, seed=3)
    calibration, measured = choose_and_fit(p, y)
    assert set(measured) == {"folds", "none", "temperature", "vector"} and measured["folds"] == 5
    assert measured["temperature"]["nll"] < measured["none"]["nll"]
    assert calibration.method == min(("none", "temperature", "vector"), key=lambda m: measured[m]["nll"])
    # a per-class bias the data need: class 0 is over-predicted, only vector scaling can fix that
    biased = p * np.array([20.0, 1, 1, 1])
    biased /= biased.sum(axis=1, keepdims=True)
    calibration, measured = choose_and_fit(biased, y)
    assert calibration.method == "vector" and measured["vector"]["nll"] < measured["temperature"]["nll"]


def test_already_calibrated_probabilities_are_left_alone():
    p, y = overconfident(300, seed=5, sharpness=1.0)  # drawn from their own probabilities: calibrated already
    calibration, measured = choose_and_fit(p, y)
    if calibration.method == "none":
        np.testing.assert_allclose(calibration.apply(p), p, atol=1e-12)
    else:  # a fitted method only ships when it beat the raw probabilities on held-out folds
        assert measured[calibration.method]["nll"] < measured["none"]["nll"]
    assert Calibration.from_dict({"method": "none"}).apply(p[:3]) == pytest.approx(p[:3])


def test_card_round_trip_and_malformed_sections_are_refused():
    p, y = overconfident(200, seed=4)
    for fitted in (fit_temperature(p, y), choose_and_fit(p * [20.0, 1, 1, 1], y)[0]):
        again = Calibration.from_dict(fitted.as_dict())
        np.testing.assert_allclose(again.apply(p), fitted.apply(p))
    for section in ({"method": "temperature", "temperature": 0}, {"method": "platt"},
                    {"method": "vector", "weights": [1, 1], "bias": [0]}):
        with pytest.raises(ValueError):
            Calibration.from_dict(section)
