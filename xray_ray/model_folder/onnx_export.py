"""`model.onnx`: converting an exported Keras model for ONNX Runtime, and proving it answers the same.

Inference runs on ONNX Runtime by default (about 4x Keras on CPU, and no TensorFlow in the
serving and scoring processes), so the ONNX file must give the Keras model's answers. At
export the model is converted with tf2onnx (Keras 3's own ONNX export leaves EfficientNet's
normalisation statistics as extra required inputs, which ONNX Runtime refuses) and both
engines score the same synthetic phantoms through images.preprocess. The card's `onnx`
section records the figures; only a file that passed is marked usable, and the Classifier
also checks the file's sha256 before trusting it.

Importing this module imports neither TensorFlow nor ONNX: conversion pulls them in when
it runs, in the training process that already has TensorFlow.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from xray_ray.config import CLASS_NAMES
from xray_ray.files import atomic_write_bytes, sha256_hex
from xray_ray.images.preprocess import preprocess
from xray_ray.images.synth import phantom
from xray_ray.model_folder.card import ONNX_FILE, package_version
from xray_ray.model_folder.engines import onnx_session
from xray_ray.model_folder.graph import OUTPUTS, inference_model

log = logging.getLogger(__name__)

OPSET = 15
INPUT_NAME = "input"
PARITY_TOLERANCE = 1e-3
"""Largest |Δprob| between Keras and ONNX Runtime for the file to be usable. The two engines' kernels round
differently, and by how much depends on the CPU: 1e-6 to 1.4e-4 measured on real images, 2.2e-4 on phantoms
with EfficientNetB1 on an AVX-512 VNNI machine. A tenth of a percentage point keeps a margin over that and
is still far below any difference a reviewer's threshold could notice; the argmax must agree as well."""
OUTPUT_TOLERANCE = 1e-3
"""Largest relative difference of the features and maps outputs (they feed OOD scores and Grad-CAM)."""
PARITY_PER_CLASS = 4
"""Phantoms per class in the export-time parity batch."""


def parity_inputs(image_size: int, per_class: int = PARITY_PER_CLASS, seed: int = 0) -> np.ndarray:
    """Real-looking model inputs: phantoms of every class at 2x the input size, through images.preprocess."""
    side = max(64, 2 * image_size)
    images = [phantom(label, side, np.random.default_rng([seed, c, i]))
              for c, label in enumerate(CLASS_NAMES) for i in range(per_class)]
    return np.stack([preprocess(image, image_size) for image in images])


def convert(model, image_size: int) -> bytes:
    """The Keras model as a serialized ONNX graph: input `input` (N, size, size, 3) float32, variable batch;
    outputs `graph.OUTPUTS` (probabilities, pooled features, last convolutional maps)."""
    import tensorflow as tf  # conversion runs in the training process, which has TensorFlow already
    import tf2onnx

    logging.getLogger("tf2onnx").setLevel(logging.WARNING)
    signature = [tf.TensorSpec((None, image_size, image_size, 3), tf.float32, name=INPUT_NAME)]
    proto, _ = tf2onnx.convert.from_keras(inference_model(model), input_signature=signature, opset=OPSET)
    return proto.SerializeToString()


def relative_difference(expected: np.ndarray, got: np.ndarray) -> float:
    """max |expected - got| / max |expected|: a scale-free parity figure for features and maps."""
    expected, got = np.asarray(expected, np.float64), np.asarray(got, np.float64)
    if expected.shape != got.shape:
        return float("inf")
    return float(np.abs(expected - got).max() / max(np.abs(expected).max(), 1e-12)) if expected.size else 0.0


def compare(keras_probabilities: np.ndarray, onnx_probabilities: np.ndarray,
            tolerance: float = PARITY_TOLERANCE) -> dict:
    """Parity figures between the two engines' probabilities for the same inputs; `passed` decides usability."""
    a = np.asarray(keras_probabilities, np.float64)
    b = np.asarray(onnx_probabilities, np.float64)
    if a.shape != b.shape:
        return {"images": len(a), "passed": False, "max_abs_diff": None, "argmax_agreement": 0.0,
                "argmax_differs": len(a), "tolerance": tolerance,
                "shape_mismatch": [list(a.shape), list(b.shape)]}
    max_diff = float(np.abs(a - b).max()) if a.size else 0.0
    differs = int((a.argmax(axis=1) != b.argmax(axis=1)).sum()) if len(a) else 0
    return {
        "images": len(a),
        "max_abs_diff": max_diff,
        "argmax_agreement": 1.0 - differs / len(a) if len(a) else 1.0,
        "argmax_differs": differs,
        "tolerance": tolerance,
        # An untrained network answers ~1/classes everywhere, and then parity proves nothing.
        "probability_std_across_images": float(a.std(axis=0).max()) if len(a) > 1 else 0.0,
        "passed": bool(np.isfinite(max_diff) and max_diff <= tolerance and differs == 0),
    }


def export_onnx(model, folder: str | Path, image_size: int) -> dict:
    """Write `folder/model.onnx` and return the card's `onnx` section; never raises for a failed conversion.

    Conversion failure leaves no file and `usable: false` with the reason; a parity failure
    keeps the file (for diagnosis) but marks it unusable. Both log a warning.
    """
    folder = Path(folder)
    section = {
        "file": ONNX_FILE, "usable": False, "converter": f"tf2onnx {package_version('tf2onnx')}", "opset": OPSET,
        "onnx": package_version("onnx"), "onnxruntime": package_version("onnxruntime"), "input_name": INPUT_NAME,
    }
    try:
        onnx_bytes = convert(model, image_size)
    except Exception as err:  # noqa: BLE001 - a converter bug must not cost the Keras export
        reason = f"conversion failed ({type(err).__name__}: {' '.join(str(err).split())[:300]})"
        log.warning("ONNX export of %s: %s; inference will use Keras", folder.name, reason)
        return {**section, "reason": reason, "warning": f"model.onnx not written: {reason}"}
    atomic_write_bytes(folder / ONNX_FILE, onnx_bytes)
    section["sha256"] = sha256_hex(onnx_bytes)
    section["bytes"] = len(onnx_bytes)
    try:
        inputs = parity_inputs(image_size)
        expected = [np.asarray(out) for out in inference_model(model).predict_on_batch(inputs)]
        session = onnx_session(onnx_bytes, gpu=False)
        got = dict(zip([o.name for o in session.get_outputs()], session.run(None, {INPUT_NAME: inputs})))
        parity = compare(expected[0], got.get(OUTPUTS[0], np.zeros(0)))
        parity.update({f"{name}_relative_diff": relative_difference(want, got.get(name, np.zeros(0)))
                       for name, want in zip(OUTPUTS[1:], expected[1:])})
        parity["passed"] = bool(parity["passed"] and max(parity[f"{n}_relative_diff"] for n in OUTPUTS[1:])
                                <= OUTPUT_TOLERANCE)
    except Exception as err:  # noqa: BLE001 - any failure here only means: not usable
        reason = f"ONNX Runtime could not run the converted model ({type(err).__name__}: {' '.join(str(err).split())[:300]})"
        log.warning("ONNX export of %s: %s; inference will use Keras", folder.name, reason)
        return {**section, "reason": reason, "warning": f"model.onnx is NOT usable: {reason}"}
    parity["inputs"] = f"{len(inputs)} synthetic phantoms through images.preprocess at {image_size} px"
    section["parity"] = parity
    if not parity["passed"]:
        reason = (f"parity check failed: max |dprob| {parity['max_abs_diff']} (tolerance {PARITY_TOLERANCE}), "
                  f"{parity['argmax_differs']} of {parity['images']} argmax differ, relative differences of "
                  + ", ".join(f"{n} {parity[f'{n}_relative_diff']:.2g}" for n in OUTPUTS[1:])
                  + f" (tolerance {OUTPUT_TOLERANCE})")
        log.warning("ONNX export of %s: model.onnx %s; it is NOT usable and inference will use Keras",
                    folder.name, reason)
        return {**section, "reason": reason, "warning": f"model.onnx is NOT usable: {reason}"}
    log.info("ONNX export of %s: parity max |dprob| %.2g on %d phantoms, argmax identical",
             folder.name, parity["max_abs_diff"], parity["images"])
    return {**section, "usable": True}
