"""What the exported graph exposes besides the class probabilities, so inference needs no TensorFlow.

The trained network is backbone -> global pooling -> the origin's head (BatchNorm, Dense
relu, Dropout, Dense softmax). The exported graph returns three outputs for one forward
pass: `probabilities`, the pooled backbone `features` (for calibration-free statistics
such as the out-of-distribution score) and the backbone's last convolutional `conv_maps`
(the input of its global pooling, for Grad-CAM). The head's weights are saved beside it
as plain arrays (`head.npz`), so gradients through the head are computed in numpy.

Building the graph needs Keras (the training process has it); reading `head.npz` does not.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

OUTPUTS = ("probabilities", "features", "conv_maps")
"""Output names of the exported graph, in order."""


def inference_model(model):
    """A Keras model with the same weights as `model` answering (probabilities, features, conv_maps)."""
    import keras  # the training process's engine; never imported by inference-only processes

    backbone = model.get_layer("backbone")
    pooling = backbone.layers[-1]  # global average (compact) or max (EfficientNetB1, pooling="max") pooling
    extractor = keras.Model(backbone.inputs, [pooling.input, backbone.outputs[0]], name="extractor")
    image = keras.Input(model.input_shape[1:], name="image")
    maps, features = extractor(image, training=False)
    x = model.get_layer("head_bn")(features, training=False)
    x = model.get_layer("head_dense")(x)
    probabilities = model.get_layer("probabilities")(x)  # dropout is the identity at inference
    named = [keras.layers.Identity(name=name)(tensor) for name, tensor in zip(OUTPUTS[1:], (features, maps))]
    return keras.Model(image, [probabilities, *named], name=f"{model.name}_inference")


def pooling_kind(model) -> str:
    """`avg` or `max`: how the backbone pools its last maps into features (Grad-CAM's gradient depends on it)."""
    name = type(model.get_layer("backbone").layers[-1]).__name__.lower()
    if "average" in name:
        return "avg"
    if "max" in name:
        return "max"
    raise ValueError(f"the backbone ends with {name}, not a global pooling layer")


def head_arrays(model) -> dict[str, np.ndarray]:
    """The head's weights as float32 arrays: BatchNorm scale and shift folded, both Dense layers."""
    bn = model.get_layer("head_bn")
    gamma, beta, mean, variance = (np.asarray(w, np.float64) for w in bn.get_weights())
    scale = gamma / np.sqrt(variance + bn.epsilon)
    dense_w, dense_b = model.get_layer("head_dense").get_weights()
    out_w, out_b = model.get_layer("probabilities").get_weights()
    return {"bn_scale": scale.astype(np.float32), "bn_shift": (beta - mean * scale).astype(np.float32),
            "dense_w": np.asarray(dense_w, np.float32), "dense_b": np.asarray(dense_b, np.float32),
            "out_w": np.asarray(out_w, np.float32), "out_b": np.asarray(out_b, np.float32),
            "pooling": np.array(pooling_kind(model))}


def save_head(model, path: str | Path) -> None:
    """Write `head_arrays(model)` as an .npz file (no pickled objects)."""
    with open(path, "wb") as file:
        np.savez(file, **head_arrays(model))


def load_head(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays written by `save_head`; pickled content is refused."""
    with np.load(path, allow_pickle=False) as arrays:
        return {key: arrays[key] for key in arrays.files}
