"""Calibrated confidence: temperature or vector scaling of the model's log-probabilities, fitted at export.

A network trained to low loss tends to be over-confident: among answers given with
confidence 0.95, fewer than 95 % are right. Rescaling its logits fixes much of that
without changing what it learned. Softmax ignores a constant added to every logit, so
scaling the log-probabilities the exported graph returns is the same as scaling its
logits: `softmax(log p / T)` (temperature, one number) or `softmax(w * log p + b)`
(vector scaling, one weight and one bias per class; it may change the argmax).

Both are fitted on the validation split by minimising the negative log-likelihood. Which
one ships is decided by k-fold cross-validation on that split (held-out NLL): vector
scaling has 2K parameters and over-fits a small validation set, temperature cannot, and
when neither beats the raw probabilities on held-out folds, none ships (method `none`:
the answer is the network's own probabilities, and the card says so).

Only numpy and scipy: Serve replicas and scoring actors apply the result without
TensorFlow. The figures (ECE, Brier score, NLL) are the ones the card records.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize, minimize_scalar
from scipy.special import log_softmax

ECE_BINS = 15
"""Equal-width confidence bins of the expected calibration error (the usual choice in the literature)."""
METHODS = ("none", "temperature", "vector")
FOLDS = 5
_TINY = 1e-38  # float32's smallest normal: a probability that underflowed to 0 becomes log 1e-38, not -inf
_VECTOR_L2 = 1e-3  # pulls vector scaling towards the identity (w = 1, b = 0) when the data say little


def log_probabilities(probabilities: np.ndarray) -> np.ndarray:
    """log p as float64, finite even where p underflowed to 0."""
    return np.log(np.maximum(np.asarray(probabilities, np.float64), _TINY))


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE: the mean |accuracy - confidence| over equal-width confidence bins, weighted by their share of images."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    gaps = [abs(correct[which == b].mean() - confidence[which == b].mean()) * (which == b).sum()
            for b in range(bins) if (which == b).any()]
    return float(np.sum(gaps) / len(labels))


def reliability_bins(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> list[dict]:
    """Per non-empty confidence bin: its range, mean confidence, accuracy and image count (the reliability diagram)."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    return [{"low": b / bins, "high": (b + 1) / bins, "confidence": float(confidence[which == b].mean()),
             "accuracy": float(correct[which == b].mean()), "images": int((which == b).sum())}
            for b in range(bins) if (which == b).any()]


def calibration_metrics(probabilities: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """ECE, multi-class Brier score (sum over classes of the squared error, mean over images) and NLL (nats)."""
    probabilities = np.asarray(probabilities, np.float64)
    labels = np.asarray(labels, int)
    onehot = np.eye(probabilities.shape[1])[labels]
    return {"ece": expected_calibration_error(probabilities, labels),
            "brier": float(((probabilities - onehot) ** 2).sum(axis=1).mean()),
            "nll": float(-log_probabilities(probabilities)[np.arange(len(labels)), labels].mean())}


@dataclass
class Calibration:
    """A fitted rescaling of log-probabilities; `apply` maps raw probabilities to calibrated ones."""

    method: str  # "none", "temperature" or "vector"
    temperature: float = 1.0
    weights: np.ndarray | None = None  # (K,) for vector scaling
    bias: np.ndarray | None = None

    def logits(self, probabilities: np.ndarray) -> np.ndarray:
        log_p = log_probabilities(probabilities)
        if self.method != "vector":
            return log_p / self.temperature
        return log_p * self.weights + self.bias

    def apply(self, probabilities: np.ndarray) -> np.ndarray:
        """Calibrated probabilities (rows sum to 1) for raw ones of shape (N, K)."""
        return np.exp(log_softmax(self.logits(probabilities), axis=1))

    def as_dict(self) -> dict:
        """The parameters as the card stores them."""
        if self.method != "vector":
            return {"method": self.method, "temperature": self.temperature}
        return {"method": "vector", "weights": self.weights.tolist(), "bias": self.bias.tolist()}

    @classmethod
    def from_dict(cls, section: dict) -> Calibration:
        """The calibration the card's `calibration` section describes; ValueError when malformed."""
        method = section.get("method")
        if method == "none":
            return cls("none")
        if method == "temperature":
            temperature = float(section["temperature"])
            if not np.isfinite(temperature) or temperature <= 0:
                raise ValueError(f"calibration temperature must be positive, got {temperature}")
            return cls("temperature", temperature=temperature)
        if method == "vector":
            weights, bias = (np.asarray(section[key], np.float64) for key in ("weights", "bias"))
            if weights.shape != bias.shape or weights.ndim != 1 or not np.isfinite([*weights, *bias]).all():
                raise ValueError("calibration weights and bias must be finite vectors of one length")
            return cls("vector", weights=weights, bias=bias)
        raise ValueError(f"unknown calibration method {method!r}; expected one of {METHODS}")


def _nll(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(-log_softmax(logits, axis=1)[np.arange(len(labels)), labels].mean())


def fit_temperature(probabilities: np.ndarray, labels: np.ndarray) -> Calibration:
    """The temperature T in [0.05, 20] minimising the NLL of softmax(log p / T)."""
    log_p = log_probabilities(probabilities)
    best = minimize_scalar(lambda log_t: _nll(log_p / np.exp(log_t), labels), bounds=(np.log(0.05), np.log(20.0)),
                           method="bounded", options={"xatol": 1e-6})
    return Calibration("temperature", temperature=float(np.exp(best.x)))


def fit_vector(probabilities: np.ndarray, labels: np.ndarray) -> Calibration:
    """Per-class weight and bias minimising the NLL of softmax(w * log p + b), lightly pulled to the identity."""
    log_p = log_probabilities(probabilities)
    n, k = log_p.shape
    onehot = np.eye(k)[labels]
    start = fit_temperature(probabilities, labels).temperature

    def loss(params):
        w, b = params[:k], params[k:]
        log_q = log_softmax(log_p * w + b, axis=1)
        residual = np.exp(log_q) - onehot  # d NLL / d logits, per image
        penalty = _VECTOR_L2 * (((w - 1) ** 2).sum() + (b ** 2).sum())
        grad = np.concatenate([(residual * log_p).sum(0) / n + 2 * _VECTOR_L2 * (w - 1),
                               residual.sum(0) / n + 2 * _VECTOR_L2 * b])
        return -(log_q * onehot).sum() / n + penalty, grad

    best = minimize(loss, np.concatenate([np.full(k, 1 / start), np.zeros(k)]), jac=True, method="L-BFGS-B")
    return Calibration("vector", weights=best.x[:k], bias=best.x[k:])


FITTERS = {"none": lambda probabilities, labels: Calibration("none"), "temperature": fit_temperature,
           "vector": fit_vector}


def cross_validated(probabilities: np.ndarray, labels: np.ndarray, folds: int = FOLDS, seed: int = 0) -> dict:
    """Held-out figures of each method (and of no calibration) by k-fold cross-validation on one labelled set."""
    n = len(labels)
    folds = max(2, min(folds, n))
    order = np.random.default_rng(seed).permutation(n)
    held_out = {name: np.zeros_like(probabilities, dtype=np.float64) for name in METHODS[1:]}
    for fold in np.array_split(order, folds):
        rest = np.setdiff1d(order, fold)
        for name in METHODS[1:]:
            held_out[name][fold] = FITTERS[name](probabilities[rest], labels[rest]).apply(probabilities[fold])
    return {"folds": folds, "none": calibration_metrics(probabilities, labels),
            **{name: calibration_metrics(held_out[name], labels) for name in METHODS[1:]}}


def choose_and_fit(probabilities: np.ndarray, labels: np.ndarray) -> tuple[Calibration, dict]:
    """The method with the lowest cross-validated NLL (the simpler one on a tie: none, then temperature),
    refitted on the whole set, and the cross-validation figures that decided it."""
    probabilities = np.asarray(probabilities, np.float64)
    labels = np.asarray(labels, int)
    if len(labels) < 2:
        raise ValueError(f"calibration needs at least 2 labelled images, got {len(labels)}")
    measured = cross_validated(probabilities, labels)
    method = min(METHODS, key=lambda name: measured[name]["nll"])  # min keeps the first (simplest) on a tie
    return FITTERS[method](probabilities, labels), measured
