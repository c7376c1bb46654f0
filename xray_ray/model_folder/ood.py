"""The out-of-distribution score: how unlike the training images an input is, fitted at export.

Two views of an input, each a Gaussian fitted to the training split's images and scored by
the squared Mahalanobis distance:

* feature view: the pooled backbone features (the graph's `features` output), one mean
  per class and one shared (tied) covariance; the distance is to the nearest class mean.
  This catches inputs the network "sees" as unlike any class it learned.
* input view: a signature of the model input itself, an 8 x 8 thumbnail (the overall
  brightness layout of a frontal chest film) and eleven image statistics (mean, spread,
  five quantiles, edge energy at full and quarter resolution, left-right asymmetry,
  share of black and of white pixels), each standardised by the training images. This
  catches inputs whatever the features happen to say about them: blank or constant
  images, documents, gradients, noise, photographs.

Covariances are estimated with Ledoit-Wolf shrinkage towards a scaled identity and
inverted through their eigen-decomposition, so 1280 features from a few hundred images
still give a well-conditioned metric. Each view's distance is put on a common scale by
its validation scores (0 at their median, 1 at their 95th percentile), and the score
is the larger of the two: an input is as unusual as its most unusual view.

The arrays live in `ood.npz` (no pickles); the threshold and how it was set live in the
card's `ood` section. Only numpy here: inference processes score without TensorFlow.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

THUMBNAIL = 8
"""Side of the input view's thumbnail."""
SCALE_PERCENTILE = 95.0
"""Each view's validation percentile that maps to 1 on the common scale."""
VIEWS = ("features", "input")


def _shrink(planes: np.ndarray, side: int) -> np.ndarray:
    return np.stack([np.asarray(Image.fromarray(plane).resize((side, side), Image.Resampling.BOX)) for plane in planes])


def _edge_energy(planes: np.ndarray) -> np.ndarray:
    return np.abs(np.diff(planes, axis=1)).mean(axis=(1, 2)) + np.abs(np.diff(planes, axis=2)).mean(axis=(1, 2))


def input_signature(batch: np.ndarray) -> np.ndarray:
    """(N, S, S, 3) model inputs (0-255) -> (N, 75): an 8 x 8 thumbnail and 11 image statistics, in 0-1 units."""
    planes = np.asarray(batch, np.float32)[..., 0] / 255.0
    flat = planes.reshape(len(planes), -1)
    stats = np.column_stack([flat.mean(axis=1), flat.std(axis=1), *np.percentile(flat, [5, 25, 50, 75, 95], axis=1),
                             _edge_energy(planes), _edge_energy(_shrink(planes, max(THUMBNAIL, planes.shape[1] // 4))),
                             np.abs(planes - planes[:, :, ::-1]).mean(axis=(1, 2)),
                             (flat < 0.04).mean(axis=1), (flat > 0.96).mean(axis=1)])
    return np.concatenate([_shrink(planes, THUMBNAIL).reshape(len(planes), -1), stats], axis=1).astype(np.float64)


def ledoit_wolf(residuals: np.ndarray) -> tuple[np.ndarray, float]:
    """(shrunk covariance, shrinkage) of centred rows: Ledoit & Wolf (2004), target the scaled identity."""
    n, d = residuals.shape
    sample = residuals.T @ residuals / n
    mu = np.trace(sample) / d
    target_gap = ((sample - mu * np.eye(d)) ** 2).sum()
    squares = residuals ** 2
    spread = ((squares.T @ squares).sum() / n - (sample ** 2).sum()) / n  # variance of the sample covariance
    shrinkage = float(np.clip(spread / target_gap, 0.0, 1.0)) if target_gap > 0 else 1.0
    return (1 - shrinkage) * sample + shrinkage * mu * np.eye(d), shrinkage


@dataclass
class Gaussians:
    """Class means and one shared covariance, kept as a whitening matrix: distance = |(x / scale) W - mean|^2.

    `scale` (per dimension) is 1 for features; for the input signature it is each
    dimension's training spread, floored at a tenth of the median spread so that a
    dimension which never varied in training cannot dominate.
    """

    means: np.ndarray  # (C, D), already divided by `scale` and multiplied by `whitening`
    whitening: np.ndarray  # (D, D)
    scale: np.ndarray  # (D,)

    @classmethod
    def fit(cls, samples: np.ndarray, groups: np.ndarray, standardise: bool = False) -> tuple[Gaussians, float]:
        """Fit one mean per group with a tied, shrunk covariance; returns it and the shrinkage used."""
        samples = np.asarray(samples, np.float64)
        scale = np.ones(samples.shape[1])
        if standardise:
            spread = samples.std(axis=0)
            scale = np.maximum(spread, 0.1 * np.median(spread) + 1e-12)
        samples = samples / scale
        names = np.unique(groups)
        means = np.stack([samples[groups == g].mean(axis=0) for g in names])
        residuals = samples - means[np.searchsorted(names, groups)]
        covariance, shrinkage = ledoit_wolf(residuals)
        values, vectors = np.linalg.eigh(covariance)
        values = np.maximum(values, values.max() * 1e-9 + 1e-12)  # never divide by a numerical zero
        whitening = vectors / np.sqrt(values)
        return cls(means @ whitening, whitening, scale), shrinkage

    def distance(self, samples: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distance of each row to the nearest mean."""
        white = (np.asarray(samples, np.float64) / self.scale) @ self.whitening
        return ((white[:, None, :] - self.means[None]) ** 2).sum(axis=2).min(axis=1)


@dataclass
class OodDetector:
    """Both views and their common scale: `score` > the card's threshold means out of distribution."""

    views: dict[str, Gaussians]
    centre: np.ndarray  # per view (in VIEWS order): the validation median
    spread: np.ndarray  # per view: validation SCALE_PERCENTILE minus the median

    def view_distances(self, features: np.ndarray, signatures: np.ndarray) -> np.ndarray:
        """(N, 2) raw squared distances, feature view then input view (`signatures` from `input_signature`)."""
        return np.stack([self.views["features"].distance(features), self.views["input"].distance(signatures)], axis=1)

    def score_views(self, features: np.ndarray, signatures: np.ndarray) -> np.ndarray:
        """(N,) out-of-distribution score: the larger of the two views' distances on the common scale."""
        return ((self.view_distances(features, signatures) - self.centre) / self.spread).max(axis=1)

    def score(self, features: np.ndarray, inputs: np.ndarray) -> np.ndarray:
        """`score_views` for pooled features and the model inputs (N, S, S, 3) they came from."""
        return self.score_views(features, input_signature(inputs))

    @classmethod
    def fit(cls, train_features: np.ndarray, train_labels: np.ndarray, train_signatures: np.ndarray,
            valid_features: np.ndarray, valid_signatures: np.ndarray) -> tuple[OodDetector, dict]:
        """Fit the Gaussians on the training split and the common scale on the validation split."""
        features, feature_shrinkage = Gaussians.fit(train_features, np.asarray(train_labels))
        inputs, input_shrinkage = Gaussians.fit(train_signatures, np.zeros(len(train_signatures), int), standardise=True)
        detector = cls({"features": features, "input": inputs}, np.zeros(2), np.ones(2))
        distances = detector.view_distances(valid_features, valid_signatures)
        detector.centre = np.median(distances, axis=0)
        detector.spread = np.maximum(np.percentile(distances, SCALE_PERCENTILE, axis=0) - detector.centre, 1e-12)
        return detector, {"feature_dim": int(features.whitening.shape[0]), "feature_shrinkage": feature_shrinkage,
                          "input_shrinkage": input_shrinkage,
                          "input_signature": f"{THUMBNAIL}x{THUMBNAIL} thumbnail + 11 image statistics"}

    def save(self, path: str | Path) -> None:
        """Write the arrays as `.npz` (no pickled objects)."""
        arrays = {f"{view}_{part}": getattr(self.views[view], part) for view in VIEWS
                  for part in ("means", "whitening", "scale")}
        with open(path, "wb") as file:
            np.savez(file, centre=self.centre, spread=self.spread, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> OodDetector:
        """The detector written by `save`; pickled content is refused."""
        with np.load(path, allow_pickle=False) as arrays:
            a = {key: arrays[key] for key in arrays.files}
        views = {view: Gaussians(a[f"{view}_means"], a[f"{view}_whitening"], a[f"{view}_scale"]) for view in VIEWS}
        return cls(views, a["centre"], a["spread"])
