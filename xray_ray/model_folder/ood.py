"""The out-of-distribution score: how unlike the training images an input is, fitted at export.

Two views of an input, each a Gaussian fitted to the training split's images and scored by
the squared Mahalanobis distance:

* feature view: the pooled backbone features (the graph's `features` output), one mean
  per class and one shared (tied) covariance; the distance is to the nearest class mean.
  This catches inputs the network "sees" as unlike any class it learned.
* input view: a signature of the model input itself, standardised by the training images:
  a 4 x 4 thumbnail (the overall brightness layout of a frontal chest film), 12 image
  statistics (mean, spread, five quantiles, edge energy at full and quarter resolution,
  left-right asymmetry, share of black and of white pixels) and 7 texture statistics
  (the detail lost at each of four halvings of resolution, the median and 90th-percentile
  spread of 8 x 8 patches, the grey-level entropy). A radiograph has structure at every
  scale; gradients, photographs, documents, drawings and blank images do not, whatever the
  features happen to say about them. Statistics of the flattest patches (their share, the
  10th-percentile spread) were measured and left out: they follow the source's native
  resolution (how much pixel noise the resize averages away), so they flagged 96 % of
  phantoms drawn at 299 px for a model trained on 96 px ones.

Covariances are estimated with Ledoit-Wolf shrinkage towards a scaled identity and
inverted through their eigen-decomposition, so 1280 features from a few hundred images
still give a well-conditioned metric.

Each view's log distance is put on a z scale by held-out in-distribution images: the
feature view by the validation split, the input view by the validation split and the
training split's own out-of-fold distances (each fold scored by Gaussians fitted on the
other folds: five times more held-out images than validation alone, so the scale is steadier).
The score is the larger z: an input is as unusual as its most unusual view. `threshold_for`
turns a target false-flag rate into the threshold on that score.

The arrays live in `ood.npz` (no pickles); the threshold and how it was set live in the
card's `ood` section. Only numpy here: inference processes score without TensorFlow.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist

import numpy as np
from PIL import Image

THUMBNAIL = 4
"""Side of the input view's thumbnail."""
DETAIL_LEVELS = 4
"""Halvings of resolution whose lost detail the signature measures."""
PATCH = 8
"""Side of the patches whose spread the signature measures."""
SIGNATURE_SIZE = THUMBNAIL ** 2 + 12 + DETAIL_LEVELS + 3
OUT_OF_FOLD_FOLDS = 5
"""Folds of the training split scored out of fold for the input view's scale."""
VIEWS = ("features", "input")
FORMAT = 2
"""Version of `ood.npz`'s layout; 1 (an 8 x 8 thumbnail, validation-percentile scale) is refused on load."""


def _resize(planes: np.ndarray, side: int, resample=Image.Resampling.BOX) -> np.ndarray:
    return np.stack([np.asarray(Image.fromarray(plane).resize((side, side), resample)) for plane in planes])


def _edge_energy(planes: np.ndarray) -> np.ndarray:
    return np.abs(np.diff(planes, axis=1)).mean(axis=(1, 2)) + np.abs(np.diff(planes, axis=2)).mean(axis=(1, 2))


def _lost_detail(planes: np.ndarray) -> np.ndarray:
    """(N, DETAIL_LEVELS): mean absolute difference between each level and its half-size copy scaled back up."""
    bands = []
    for _ in range(DETAIL_LEVELS):
        coarse = _resize(planes, max(planes.shape[1] // 2, 1))
        bands.append(np.abs(planes - _resize(coarse, planes.shape[1], Image.Resampling.BILINEAR)).mean(axis=(1, 2)))
        planes = coarse
    return np.column_stack(bands)


def _patch_spread(planes: np.ndarray) -> np.ndarray:
    """(N, patches): the standard deviation of every whole PATCH x PATCH tile."""
    n, side = len(planes), planes.shape[1] // PATCH * PATCH
    tiles = planes[:, :side, :side].reshape(n, side // PATCH, PATCH, side // PATCH, PATCH)
    return tiles.std(axis=(2, 4)).reshape(n, -1)


def _entropy(planes: np.ndarray, bins: int = 32) -> np.ndarray:
    shares = np.stack([np.histogram(plane, bins=bins, range=(0, 1))[0] for plane in planes]) / planes[0].size
    return -(shares * np.log(np.where(shares > 0, shares, 1))).sum(axis=1)


def input_signature(batch: np.ndarray) -> np.ndarray:
    """(N, S, S, 3) model inputs (0-255) -> (N, SIGNATURE_SIZE): thumbnail, image and texture statistics."""
    planes = np.asarray(batch, np.float32)[..., 0] / 255.0
    flat = planes.reshape(len(planes), -1)
    stats = np.column_stack([flat.mean(axis=1), flat.std(axis=1), *np.percentile(flat, [5, 25, 50, 75, 95], axis=1),
                             _edge_energy(planes), _edge_energy(_resize(planes, max(THUMBNAIL, planes.shape[1] // 4))),
                             np.abs(planes - planes[:, :, ::-1]).mean(axis=(1, 2)),
                             (flat < 0.04).mean(axis=1), (flat > 0.96).mean(axis=1)])
    texture = np.column_stack([np.log(_lost_detail(planes) + 1e-4),
                               np.log(np.percentile(_patch_spread(planes), [50, 90], axis=1).T + 1e-4), _entropy(planes)])
    return np.concatenate([_resize(planes, THUMBNAIL).reshape(len(planes), -1), stats, texture],
                          axis=1).astype(np.float64)


def threshold_for(false_flag_rate: float, views: int = len(VIEWS)) -> float:
    """The score above which an in-distribution image is flagged with probability `false_flag_rate`.

    Each view's z is standard normal on in-distribution images (log distances, fitted on held-out
    ones), so with independent views P(max z <= t) = Phi(t) ** views. Views that agree with each
    other flag less often than this, never more.
    """
    if not 0 < false_flag_rate < 1:
        raise ValueError(f"the false-flag rate must be between 0 and 1, not {false_flag_rate}")
    return NormalDist().inv_cdf((1 - false_flag_rate) ** (1 / views))


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


def out_of_fold_distances(signatures: np.ndarray, folds: int = OUT_OF_FOLD_FOLDS) -> np.ndarray:
    """Input-view distance of every training signature from Gaussians fitted on the other folds (rows dealt in turn)."""
    fold_of = np.arange(len(signatures)) % folds
    distances = np.empty(len(signatures))
    for fold in range(folds):
        held, rest = fold_of == fold, fold_of != fold
        gaussians, _ = Gaussians.fit(signatures[rest], np.zeros(int(rest.sum()), int), standardise=True)
        distances[held] = gaussians.distance(signatures[held])
    return distances


def _log(distances: np.ndarray) -> np.ndarray:
    return np.log(np.maximum(distances, 1e-12))


def z_scale(held_out_log_distances: np.ndarray) -> tuple[float, float]:
    """(centre, spread) that map a view's log distance to its z: the held-out images' mean and standard deviation."""
    return float(held_out_log_distances.mean()), max(float(held_out_log_distances.std(ddof=1)), 1e-6)


def z_scores(distances: np.ndarray, centre, spread) -> np.ndarray:
    """Squared distances -> z: the log distance standardised by `z_scale`'s (centre, spread)."""
    return (_log(distances) - centre) / spread


def fit_input_view(train_signatures: np.ndarray, valid_signatures: np.ndarray) -> tuple[Gaussians, float, np.ndarray]:
    """The input view's Gaussian on the training signatures, its shrinkage, and the log distances of its held-out
    images: the validation split and the training split out of fold (the signature does not depend on the network)."""
    train_signatures = np.asarray(train_signatures, np.float64)
    gaussians, shrinkage = Gaussians.fit(train_signatures, np.zeros(len(train_signatures), int), standardise=True)
    held_out = np.concatenate([gaussians.distance(valid_signatures), out_of_fold_distances(train_signatures)])
    return gaussians, shrinkage, _log(held_out)


@dataclass
class OodDetector:
    """Both views and their z scales: `score` > the card's threshold (`threshold_for`) means out of distribution."""

    views: dict[str, Gaussians]
    centre: np.ndarray  # per view (in VIEWS order): mean log distance of its held-out in-distribution images
    spread: np.ndarray  # per view: their standard deviation

    def view_distances(self, features: np.ndarray, signatures: np.ndarray) -> np.ndarray:
        """(N, 2) raw squared distances, feature view then input view (`signatures` from `input_signature`)."""
        return np.stack([self.views["features"].distance(features), self.views["input"].distance(signatures)], axis=1)

    def view_scores(self, features: np.ndarray, signatures: np.ndarray) -> np.ndarray:
        """(N, 2) each view's z: its log distance standardised by its held-out images."""
        return z_scores(self.view_distances(features, signatures), self.centre, self.spread)

    def score_views(self, features: np.ndarray, signatures: np.ndarray) -> np.ndarray:
        """(N,) out-of-distribution score: the larger of the two views' z."""
        return self.view_scores(features, signatures).max(axis=1)

    def score(self, features: np.ndarray, inputs: np.ndarray) -> np.ndarray:
        """`score_views` for pooled features and the model inputs (N, S, S, 3) they came from."""
        return self.score_views(features, input_signature(inputs))

    @classmethod
    def fit(cls, train_features: np.ndarray, train_labels: np.ndarray, train_signatures: np.ndarray,
            valid_features: np.ndarray, valid_signatures: np.ndarray) -> tuple[OodDetector, dict]:
        """Fit the Gaussians on the training split and each view's z scale on its held-out images.

        The feature view's held-out images are the validation split only: the network has seen
        the training images, so their features are closer than new ones (`fit_input_view` for the other).
        """
        features, feature_shrinkage = Gaussians.fit(train_features, np.asarray(train_labels))
        inputs, input_shrinkage, input_held_out = fit_input_view(train_signatures, valid_signatures)
        held_out = {"features": _log(features.distance(valid_features)), "input": input_held_out}
        centre, spread = (np.array(values) for values in zip(*(z_scale(held_out[view]) for view in VIEWS)))
        details = {"feature_dim": int(features.whitening.shape[0]), "feature_shrinkage": feature_shrinkage,
                   "input_shrinkage": input_shrinkage, "held_out_images": {v: len(held_out[v]) for v in VIEWS},
                   "input_signature": f"{THUMBNAIL}x{THUMBNAIL} thumbnail, 12 image and 7 texture statistics"}
        return cls({"features": features, "input": inputs}, centre, spread), details

    def save(self, path: str | Path) -> None:
        """Write the arrays as `.npz` (no pickled objects)."""
        arrays = {f"{view}_{part}": getattr(self.views[view], part) for view in VIEWS
                  for part in ("means", "whitening", "scale")}
        with open(path, "wb") as file:
            np.savez(file, format=np.array(FORMAT), centre=self.centre, spread=self.spread, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> OodDetector:
        """The detector written by `save`; pickled content and other layouts are refused."""
        with np.load(path, allow_pickle=False) as arrays:
            a = {key: arrays[key] for key in arrays.files}
        written = int(a["format"]) if "format" in a else 1
        if written != FORMAT:
            raise ValueError(f"{path} holds an out-of-distribution detector in layout {written}, this xray-ray reads "
                             f"layout {FORMAT}: refit it, without retraining, with `xray-ray refit --model "
                             f"{Path(path).parent} --index <the index.parquet it was trained on>`")
        views = {view: Gaussians(a[f"{view}_means"], a[f"{view}_whitening"], a[f"{view}_scale"]) for view in VIEWS}
        return cls(views, a["centre"], a["spread"])
