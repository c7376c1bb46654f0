"""Grad-CAM on the fast engine: where in the image the model found its evidence for a class.

Grad-CAM (Selvaraju et al., 2017) weights each channel k of the backbone's last
convolutional maps A by the spatial mean of d(score)/dA_k and keeps the positive part of
sum_k w_k A_k. Here the score is the class's logit, the pre-softmax output (as in the
paper): the softmax probability's gradient mixes in every other class's logit and vanishes
as the probability saturates, so a confident answer would get a weak, noisy map.

No TensorFlow and no gradient graph: the exported graph already returns `conv_maps` and
the pooled `features` in the same pass as the probabilities, and between the maps and the
logits there are only global pooling and the head (folded BatchNorm, Dense relu, Dense),
whose weights are in `head.npz`. The gradient through that is a few small matrix products
in numpy, so an explanation costs one ordinary forward pass plus microseconds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from xray_ray.model_folder.classifier import Classifier, Predictions

GRAPH_OUTPUTS = ("probabilities", "features", "conv_maps")
"""What one explanation needs from the exported graph, in one pass."""


@dataclass
class Explanation:
    """Grad-CAM maps for a batch, with the predictions of the same forward pass."""

    grid: np.ndarray  # (N, H, W) at the conv maps' resolution, in [0, 1]
    heatmaps: np.ndarray  # (N, size, size) upsampled to the model input, in [0, 1]
    explained: list[str]  # the class each map explains
    predictions: Predictions

    def peaks(self) -> list[tuple[int, int]]:
        """(row, column) of each heat map's maximum, in model-input pixels."""
        flat = self.heatmaps.reshape(len(self.heatmaps), -1).argmax(axis=1)
        return [tuple(int(v) for v in np.unravel_index(i, self.heatmaps.shape[1:])) for i in flat]


def logits(features: np.ndarray, head: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The head's pre-softmax scores (N, classes) and its Dense layer's pre-activation (N, units)."""
    # einsum, not @: these products are tiny, and a multi-threaded BLAS call waits for every one of its
    # threads, which on a loaded machine costs more than the arithmetic (measured in bench_explain).
    hidden = np.einsum("nk,ku->nu", features * head["bn_scale"] + head["bn_shift"], head["dense_w"]) + head["dense_b"]
    return np.einsum("nu,uc->nc", np.maximum(hidden, 0), head["out_w"]) + head["out_b"], hidden


def feature_gradients(features: np.ndarray, head: dict[str, np.ndarray], classes: np.ndarray) -> np.ndarray:
    """d logit[classes[i]] / d features[i] for each image i: back through Dense, relu, Dense, folded BN."""
    _, hidden = logits(features, head)
    upstream = head["out_w"].T[classes] * (hidden > 0)  # (N, units): through the output Dense and the relu
    return np.einsum("nu,ku->nk", upstream, head["dense_w"]) * head["bn_scale"]  # (N, channels)


def map_gradients(maps: np.ndarray, pooling: str, feature_grad: np.ndarray) -> np.ndarray:
    """d logit / d maps (N, H, W, K) through global pooling.

    Average pooling spreads the gradient evenly (1 / (H W) per position); max pooling sends
    it to each channel's maximum, shared equally among ties as TensorFlow's reduce_max does.
    """
    if pooling == "avg":
        height, width = maps.shape[1:3]
        return np.broadcast_to(feature_grad[:, None, None, :] / (height * width), maps.shape)
    if pooling == "max":
        winners = maps == maps.max(axis=(1, 2), keepdims=True)
        return winners * (feature_grad[:, None, None, :] / winners.sum(axis=(1, 2), keepdims=True))
    raise ValueError(f"pooling must be 'avg' or 'max', got {pooling!r}")


def weighted_maps(maps: np.ndarray, pooling: str, head: dict[str, np.ndarray], classes: np.ndarray,
                  features: np.ndarray | None = None) -> np.ndarray:
    """sum_k w_k A_k at the maps' resolution (N, H, W), before the relu; w_k = spatial mean of d logit / d A_k."""
    maps = np.asarray(maps, np.float64)
    if features is None:
        features = maps.mean(axis=(1, 2)) if pooling == "avg" else maps.max(axis=(1, 2))
    gradients = map_gradients(maps, pooling, feature_gradients(np.asarray(features, np.float64), head, classes))
    return np.einsum("nhwk,nk->nhw", maps, gradients.mean(axis=(1, 2)))


def gradcam_grid(maps: np.ndarray, pooling: str, head: dict[str, np.ndarray], classes: np.ndarray,
                 features: np.ndarray | None = None) -> np.ndarray:
    """relu(sum_k w_k A_k) at the maps' resolution (N, H, W), unnormalised: only evidence for the class."""
    return np.maximum(weighted_maps(maps, pooling, head, classes, features), 0)


def normalised(grid: np.ndarray) -> np.ndarray:
    """Each map divided by its maximum (so 1 is the strongest evidence, 0 none); all-zero maps stay zero."""
    peak = grid.reshape(len(grid), -1).max(axis=1)
    return (grid / np.where(peak > 0, peak, 1.0)[:, None, None]).astype(np.float32)


def upsample(grid: np.ndarray, size: int) -> np.ndarray:
    """Maps (N, H, W) in [0, 1] resized bilinearly to (N, size, size), as the input was resized to the model."""
    return np.stack([np.asarray(Image.fromarray(g.astype(np.float32))
                                .resize((size, size), Image.Resampling.BILINEAR)) for g in grid]).clip(0, 1)


def explain(classifier: Classifier, batch: np.ndarray, classes: Sequence[str | None] | None = None) -> Explanation:
    """Grad-CAM for preprocessed inputs (N, size, size, 3): of each image's predicted class, or of
    `classes[i]` where given (a class name; None keeps the predicted one). One forward pass."""
    outputs = classifier.forward(batch, GRAPH_OUTPUTS)
    head = classifier.head()
    predictions = classifier.answer(outputs, np.asarray(batch, np.float32))
    chosen = predictions.probabilities.argmax(axis=1)
    for i, name in enumerate(classes or []):
        if name is not None:
            if name not in classifier.classes:
                raise ValueError(f"unknown class {name!r}; expected one of {classifier.classes}")
            chosen[i] = classifier.classes.index(name)
    grid = normalised(gradcam_grid(outputs["conv_maps"], str(head["pooling"]), head, chosen, outputs["features"]))
    return Explanation(grid, upsample(grid, classifier.image_size), [classifier.classes[i] for i in chosen],
                       predictions)
