"""Grad-CAM in numpy on the ONNX Runtime path: the head's gradient, and parity with TensorFlow's GradientTape."""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers import phantom_batch
from tests.model_folder.conftest import SIZE
from xray_ray.model_folder import gradcam
from xray_ray.model_folder.classifier import Classifier

pytestmark = pytest.mark.timeout(900)
SLOW_FIXTURES = {"models"}  # trains networks (tests/model_folder/conftest.py)


def _random_head(rng: np.random.Generator, channels: int = 6, units: int = 5, classes: int = 4) -> dict:
    return {"bn_scale": rng.uniform(0.5, 2, channels), "bn_shift": rng.normal(size=channels),
            "dense_w": rng.normal(size=(channels, units)), "dense_b": rng.normal(size=units),
            "out_w": rng.normal(size=(units, classes)), "out_b": rng.normal(size=classes)}


@pytest.mark.parametrize("pooling", ["avg", "max"])
def test_map_gradients_match_finite_differences(pooling):
    rng = np.random.default_rng(0)
    head, maps = _random_head(rng), rng.normal(size=(2, 3, 4, 6))
    classes = np.array([1, 3])

    def score(m: np.ndarray) -> np.ndarray:
        pooled = m.mean(axis=(1, 2)) if pooling == "avg" else m.max(axis=(1, 2))
        return gradcam.logits(pooled, head)[0][np.arange(2), classes]

    features = maps.mean(axis=(1, 2)) if pooling == "avg" else maps.max(axis=(1, 2))
    analytic = gradcam.map_gradients(maps, pooling, gradcam.feature_gradients(features, head, classes))
    numeric = np.zeros_like(maps)
    step = 1e-6
    for index in np.ndindex(maps.shape[1:]):
        moved = maps.copy()
        moved[(slice(None), *index)] += step
        numeric[(slice(None), *index)] = (score(moved) - score(maps)) / step
    np.testing.assert_allclose(analytic, numeric, atol=1e-4)
    if pooling == "max":  # only each channel's maximum receives gradient
        assert ((analytic != 0).sum(axis=(1, 2)) <= 1).all()


def test_grid_is_the_positive_part_of_the_gradient_weighted_maps_and_normalises_to_one():
    rng = np.random.default_rng(1)
    head, maps = _random_head(rng), np.abs(rng.normal(size=(3, 4, 4, 6)))
    classes = np.array([0, 1, 2])
    grid = gradcam.gradcam_grid(maps, "avg", head, classes)
    weights = gradcam.feature_gradients(maps.mean(axis=(1, 2)), head, classes) / 16
    np.testing.assert_allclose(grid, np.maximum(np.einsum("nhwk,nk->nhw", maps, weights), 0))
    shown = gradcam.normalised(np.concatenate([grid, np.zeros((1, 4, 4))]))
    assert shown.min() >= 0 and np.allclose(shown[:3].reshape(3, -1).max(axis=1)[grid.reshape(3, -1).max(1) > 0], 1)
    assert not shown[3].any()  # no positive evidence anywhere: an empty map, not a division by zero
    with pytest.raises(ValueError, match="pooling"):
        gradcam.gradcam_grid(maps, "sum", head, classes)


def test_upsample_keeps_range_and_orientation():
    grid = np.zeros((1, 4, 4), np.float32)
    grid[0, 0, 3] = 1.0  # top right
    up = gradcam.upsample(grid, 32)
    assert up.shape == (1, 32, 32) and up.min() >= 0 and up.max() <= 1
    row, column = np.unravel_index(up[0].argmax(), (32, 32))
    assert row < 8 and column >= 24


def _tensorflow_gradcam(model, batch: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """The textbook Grad-CAM with GradientTape on the Keras model, before its relu: sum_k w_k A_k with
    w_k the spatial mean of d logit / d A_k, A the pooling layer's input."""
    import keras
    import tensorflow as tf

    backbone = model.get_layer("backbone")
    pooling = backbone.layers[-1]
    maps = keras.Model(backbone.inputs, pooling.input)(batch, training=False)
    output = model.get_layer("probabilities")
    with tf.GradientTape() as tape:
        tape.watch(maps)
        hidden = model.get_layer("head_dense")(model.get_layer("head_bn")(pooling(maps), training=False))
        logits = tf.matmul(hidden, output.kernel) + output.bias  # the pre-softmax score
        score = tf.reduce_sum(logits * tf.one_hot(classes, logits.shape[-1]), axis=1)
    weights = tf.reduce_mean(tape.gradient(score, maps), axis=(1, 2))
    return tf.einsum("nhwk,nk->nhw", maps, weights).numpy()


def _to_unit_range(maps: np.ndarray) -> np.ndarray:
    low, span = maps.min(axis=(1, 2), keepdims=True), np.ptp(maps, axis=(1, 2), keepdims=True)
    return (maps - low) / np.where(span > 0, span, 1.0)


def _correlations(ours: np.ndarray, theirs: np.ndarray) -> list[float]:
    """Per image, the correlation of two maps upsampled to the input size (images where either is constant skipped)."""
    ours, theirs = gradcam.upsample(ours, SIZE), gradcam.upsample(theirs, SIZE)
    return [np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(ours, theirs) if a.std() > 0 and b.std() > 0]


@pytest.mark.parametrize("name", ["compact", "effb1"])
def test_numpy_gradcam_on_onnxruntime_matches_tensorflow_gradienttape(models, name):
    """Parity on the same conv maps and class: the maps before the relu for every image (an untrained
    network often has no positive evidence, so the final maps alone could be empty on both sides),
    and the final normalised maps wherever they show something."""
    exported = models[name]
    x, _ = phantom_batch(3, seed=41, size=SIZE)
    classifier = Classifier(exported.folder, engine="onnxruntime")
    head = classifier.head()
    assert classifier.card.data["pooling"] == str(head["pooling"]) == ("avg" if name == "compact" else "max")
    for asked in (None, "Lung_Opacity"):  # the predicted class, then one class for every image
        explanation = gradcam.explain(classifier, x, None if asked is None else [asked] * len(x))
        classes = np.array([classifier.classes.index(c) for c in explanation.explained])
        reference = _tensorflow_gradcam(exported.model, x, classes)
        outputs = classifier.forward(x, gradcam.GRAPH_OUTPUTS)
        raw = gradcam.weighted_maps(outputs["conv_maps"], str(head["pooling"]), head, classes, outputs["features"])
        before_relu = _correlations(_to_unit_range(raw), _to_unit_range(reference))
        assert len(before_relu) == len(x) and min(before_relu) >= 0.99, before_relu
        final = _correlations(explanation.grid, gradcam.normalised(np.maximum(reference, 0)))
        assert final and min(final) >= 0.99, final
        print(f"{name} {asked or 'predicted'}: correlation before relu >= {min(before_relu):.5f}, "
              f"final maps >= {min(final):.5f} on {len(final)} of {len(x)} images with positive evidence")
    assert explanation.grid.shape[1:] == outputs["conv_maps"].shape[1:3]
    assert explanation.predictions.engine == "onnxruntime"
    np.testing.assert_allclose(explanation.predictions.probabilities, classifier.predict_arrays(x).probabilities,
                               atol=1e-6)


def test_unknown_class_is_refused(models):
    x, _ = phantom_batch(1, seed=2, size=SIZE)
    with pytest.raises(ValueError, match="unknown class 'Pneumothorax'"):
        gradcam.explain(Classifier(models["compact"].folder), x, ["Pneumothorax"] * len(x))
