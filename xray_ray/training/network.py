"""The network: a backbone (EfficientNetB1, or a compact CNN for CPU work) and the origin's head.

The head is the notebook's: BatchNormalization, Dense(256, relu, kernel L2, activity and
bias L1), Dropout, Dense(4, softmax), trained with Adamax on categorical cross-entropy.
Both backbones share it, so LRA, export, serving and scoring never care which one ran.
Keras is imported inside the functions: importing this module must not start TensorFlow.
"""

from __future__ import annotations

import os
from pathlib import Path

from xray_ray.config import CLASS_NAMES
from xray_ray.config_training import ModelConfig

EFFICIENTNET_WEIGHTS_FILE = "efficientnetb1_notop.h5"
EFFICIENTNET_WEIGHTS_URL = "https://storage.googleapis.com/keras-applications/" + EFFICIENTNET_WEIGHTS_FILE


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights were asked for but the file is not where it was asked for."""


def keras_weights_cache() -> Path:
    """The folder where Keras keeps application weights ($KERAS_HOME/models, default ~/.keras/models)."""
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models"


def resolve_weights(model_cfg: ModelConfig) -> str | None:
    """What to hand Keras for the backbone's weights: None (random), or a local file path.

    `imagenet` means the file in Keras's cache folder. Nothing is downloaded at run time (a
    hospital cluster is often air-gapped, and a download that hangs is worse than an error):
    when the file is missing the error names the exact file, the folder to place it in, and
    where Keras publishes it. Cheap and TensorFlow-free, so jobs call it before any work.
    """
    weights = model_cfg.weights
    if weights == "none":
        return None
    if weights == "imagenet":
        if model_cfg.backbone != "efficientnetb1":
            raise WeightsUnavailableError(
                f"the {model_cfg.backbone} backbone has no pretrained weights: use model.weights=none"
            )
        cached = keras_weights_cache() / EFFICIENTNET_WEIGHTS_FILE
        if not cached.is_file():
            raise WeightsUnavailableError(
                f"model.weights=imagenet needs the file {EFFICIENTNET_WEIGHTS_FILE} in the folder {cached.parent} "
                f"(that is, {cached}) on every node that trains; nothing is downloaded at run time. Copy it there "
                f"(Keras publishes it at {EFFICIENTNET_WEIGHTS_URL}; set KERAS_HOME to use another folder), "
                f"or give model.weights=/path/to/{EFFICIENTNET_WEIGHTS_FILE}, or train from scratch with "
                f"model.weights=none."
            )
        return str(cached)
    path = Path(weights).expanduser()
    if not path.is_file():
        raise WeightsUnavailableError(f"model.weights={weights!r}: no such file")
    return str(path)


def _compact_backbone(image_size: int):
    """Three conv blocks and global average pooling: learns phantoms from scratch in seconds on a CPU.

    Average (not max) pooling: diffuse findings such as an interstitial pattern are spread
    over the lungs, and averaging generalised better than max on held-out phantoms.
    """
    import keras
    from keras import layers

    inputs = keras.Input((image_size, image_size, 3))
    x = layers.Rescaling(1.0 / 255)(inputs)  # takes 0-255 like EfficientNet, which rescales inside
    for filters in (32, 64, 128):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
        x = layers.BatchNormalization()(x)
        x = layers.Activation("relu")(x)
        x = layers.MaxPooling2D()(x)
    outputs = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, outputs, name="compact")


def _backbone(model_cfg: ModelConfig, image_size: int):
    import keras

    if model_cfg.backbone == "compact":
        backbone = _compact_backbone(image_size)
    else:
        backbone = keras.applications.EfficientNetB1(
            include_top=False, weights=None, input_shape=(image_size, image_size, 3), pooling="max"
        )
    weights = resolve_weights(model_cfg)
    if weights is not None:
        backbone.load_weights(weights)
    return backbone


def batchnorm_layers(model) -> list:
    """Every BatchNormalization layer, nested models included."""
    import keras

    return [layer for layer in model._flatten_layers() if isinstance(layer, keras.layers.BatchNormalization)]


def build_model(model_cfg: ModelConfig, image_size: int, seed: int = 123):
    """Backbone + the origin's head, compiled; the backbone is the layer named `backbone`."""
    import keras
    from keras import layers, regularizers

    keras.utils.set_random_seed(seed)
    backbone = _backbone(model_cfg, image_size)
    backbone.name = "backbone"
    inputs = keras.Input((image_size, image_size, 3), name="image")
    # Fine-tuning pretrained weights keeps the backbone's BatchNorm in inference mode (keras-io's
    # guide); from scratch its statistics must be learned, so it follows the training flag.
    features = backbone(inputs, training=False) if model_cfg.weights != "none" else backbone(inputs)
    x = layers.BatchNormalization(name="head_bn")(features)
    x = layers.Dense(
        model_cfg.units,
        activation="relu",
        kernel_regularizer=regularizers.l2(model_cfg.l2),
        activity_regularizer=regularizers.l1(model_cfg.l1),
        bias_regularizer=regularizers.l1(model_cfg.l1),
        name="head_dense",
    )(x)
    x = layers.Dropout(model_cfg.dropout, seed=seed, name="head_dropout")(x)
    outputs = layers.Dense(len(CLASS_NAMES), activation="softmax", dtype="float32", name="probabilities")(x)
    model = keras.Model(inputs, outputs, name=f"xray_{model_cfg.backbone}")
    for layer in batchnorm_layers(model):
        layer.momentum = model_cfg.bn_momentum
    set_trainable(model, model_cfg)
    return model


def set_trainable(model, model_cfg: ModelConfig) -> None:
    """Freeze the backbone (`head`), unfreeze it all (`all`) or from a named layer on; then recompile."""
    import keras

    backbone = model.get_layer("backbone")
    choice = model_cfg.trainable
    backbone.trainable = choice != "head"
    if choice not in ("all", "head"):
        names = [layer.name for layer in backbone.layers]
        start = next((i for i, name in enumerate(names) if name.startswith(choice)), None)
        if start is None:
            raise ValueError(f"model.trainable={choice!r}: no backbone layer starts with that name")
        for layer in backbone.layers[:start]:
            layer.trainable = False
    model.compile(
        optimizer=keras.optimizers.Adamax(learning_rate=model_cfg.learning_rate),
        loss="categorical_crossentropy",
        metrics=["accuracy"],
    )


def refresh_batchnorm(model, batches, max_batches: int) -> int:
    """Re-estimate BatchNorm moving statistics as the average over training batches, each
    weighted by its number of images (so a short last batch counts for what it holds).

    After training from scratch the moving averages (momentum 0.99) lag the weights, and
    inference-mode accuracy collapses. Forward passes in training mode, with the momentum
    set per batch and no optimizer step, make them match the final weights.
    Returns the number of batches used.
    """
    layers = [layer for layer in batchnorm_layers(model) if layer.trainable]
    momenta = [layer.momentum for layer in layers]
    used = seen = 0
    try:
        for x in batches:
            if used == max_batches:
                break
            for layer in layers:
                layer.momentum = seen / (seen + len(x))
            model(x, training=True)
            used, seen = used + 1, seen + len(x)
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
    return used


def predict_with_batch_statistics(model, x, batch_size: int = 64):
    """Probabilities with every BatchNorm normalising by its batch's own statistics and dropout off.

    This is what the trained weights compute before the moving averages matter: the reference
    that inference mode should reach once the statistics are refreshed. The moving statistics
    are left as they were (momentum 1 keeps them), so calling this changes nothing.
    """
    import keras
    import numpy as np

    norms = batchnorm_layers(model)
    dropouts = [layer for layer in model._flatten_layers() if isinstance(layer, keras.layers.Dropout)]
    momenta, rates = [layer.momentum for layer in norms], [layer.rate for layer in dropouts]
    try:
        for layer in norms:
            layer.momentum = 1.0
        for layer in dropouts:
            layer.rate = 0.0
        return np.concatenate([np.asarray(model(x[i:i + batch_size], training=True))
                               for i in range(0, len(x), batch_size)])
    finally:
        for layer, momentum in zip(norms, momenta):
            layer.momentum = momentum
        for layer, rate in zip(dropouts, rates):
            layer.rate = rate
