"""The golden set: a few of a model's own test inputs with the answers it gave at export, kept in its folder.

A model folder can pass every digest check and still answer differently where it is loaded:
another ONNX Runtime, another CPU, a card whose calibration was edited, a detector fitted to
another network. So export (and `refit`, whenever it changes the calibration) records
`GOLDEN_PER_CLASS` preprocessed test images per class in `golden.npz`, and in the card their
digests with the calibrated probabilities and out-of-distribution scores the folder's own engine
gave them. Every `Classifier` answers them again when it loads, and refuses the folder
(`GoldenSetError`, with the image and the difference) unless it reproduces them within the
engines' parity tolerance; Serve, scoring and the registry's promotion gate all load through it.
"""

from __future__ import annotations

import hashlib
import numpy as np
import pandas as pd

from xray_ray.files import atomic_path, sha256_file
from xray_ray.model_folder.card import GOLDEN_FILE

GOLDEN_PER_CLASS = 2
"""Test images per class in a golden set: enough to cover every class, cheap to answer at every load."""
PROBABILITY_TOLERANCE = 2e-3
"""Largest |difference| of a calibrated probability: twice the export's ONNX-Keras parity tolerance (1e-3),
measured differences between engines and CPUs reach 2.2e-4."""
OOD_TOLERANCE = 0.05
"""Largest |difference| of an out-of-distribution score (a standardised log-distance, threshold about 2)."""


class GoldenSetError(ValueError):
    """A model folder that does not reproduce its golden set where it is loaded (the message says how)."""


def choose_inputs(frame: pd.DataFrame, classes: list[str], per_class: int = GOLDEN_PER_CLASS) -> pd.DataFrame:
    """The first `per_class` rows of each class of `frame` (path, label), by path, so a refit picks the same."""
    ordered = frame.sort_values("path")
    return pd.concat([ordered[ordered["label"] == name].head(per_class) for name in classes])


def input_digest(image: np.ndarray) -> str:
    """sha256 of one preprocessed input as float32 bytes: names the exact array the card's answer is for."""
    return hashlib.sha256(np.ascontiguousarray(image, np.float32).tobytes()).hexdigest()


def record(classifier, frame: pd.DataFrame) -> dict:
    """Write `golden.npz` in `classifier`'s folder from `frame`'s test images and return the card's `golden`
    section: per image its number, true label, input digest and the calibrated answer `classifier` gave (no
    file name: a card may travel where the archive's names must not)."""
    chosen = choose_inputs(frame, classifier.classes)
    errors = [""] * len(chosen)
    paths = list(chosen["path"])
    used, inputs = [], []
    for good, batch in classifier.prepared_batches(paths, errors):
        used.extend(good)
        inputs.append(batch)
    if not used:
        raise ValueError("no usable test image for the golden set")
    inputs = np.concatenate(inputs).astype(np.float32)
    predictions = classifier.predict_arrays(inputs)
    with atomic_path(classifier.model_dir / GOLDEN_FILE) as tmp:
        with open(tmp, "wb") as sink:
            np.savez_compressed(sink, inputs=inputs)
    images = [{"image": n, "label": str(chosen["label"].iloc[i]), "input_sha256": input_digest(image),
               "probabilities": [float(p) for p in row],
               "ood_score": None if not np.isfinite(score) else float(score)}
              for n, (i, image, row, score) in enumerate(zip(used, inputs, predictions.probabilities,
                                                             predictions.ood_score))]
    return {"file": GOLDEN_FILE, "sha256": sha256_file(classifier.model_dir / GOLDEN_FILE),
            "engine": predictions.engine, "probability_tolerance": PROBABILITY_TOLERANCE,
            "ood_tolerance": OOD_TOLERANCE, "images": images}


def missing_reason(card) -> str:
    """Why `card`'s folder cannot be checked against a golden set ('' when it has one)."""
    if card.get("golden"):
        return ""
    return (f"{card.folder} has no golden set (exported before golden sets, or never calibrated): refit it "
            "(xray-ray refit) or export it again")


def check(classifier) -> bool:
    """Answer the folder's golden set with `classifier`: True when every image's calibrated probabilities,
    predicted class and out-of-distribution score match the card's, GoldenSetError when one does not, False
    when the folder has no golden set (the registry's gate refuses such a folder; a loader only warns)."""
    section = classifier.card.get("golden")
    if not section:
        return False
    try:
        path = classifier.card.verified_file(GOLDEN_FILE)
        with np.load(path, allow_pickle=False) as stored:
            inputs = np.asarray(stored["inputs"], np.float32)
    except (OSError, KeyError, ValueError) as err:
        raise GoldenSetError(f"the golden set of {classifier.model_dir} cannot be read: {err}") from None
    expected = section["images"]
    if len(inputs) != len(expected):
        raise GoldenSetError(f"{GOLDEN_FILE} holds {len(inputs)} inputs, the card {len(expected)}")
    answered = classifier.predict_arrays(inputs)
    for image, want, got, score in zip(inputs, expected, answered.probabilities, answered.ood_score):
        _check_one(image, want, got, score, answered.engine)
    return True


def _check_one(image: np.ndarray, want: dict, got: np.ndarray, score: float, engine: str) -> None:
    name = want["image"]
    if input_digest(image) != want["input_sha256"]:
        raise GoldenSetError(f"golden input {name} does not match the digest the card records")
    expected = np.asarray(want["probabilities"])
    difference = float(np.abs(expected - got).max())
    if difference > PROBABILITY_TOLERANCE:
        raise GoldenSetError(f"golden image {name}: {engine} answers probabilities up to {difference:.2g} away from "
                             f"the card's (tolerance {PROBABILITY_TOLERANCE:g})")
    top_two = np.sort(expected)[-2:]
    if top_two[1] - top_two[0] > 2 * PROBABILITY_TOLERANCE and got.argmax() != expected.argmax():
        raise GoldenSetError(f"golden image {name}: {engine} predicts another class than the card records")
    if want["ood_score"] is not None and not abs(float(score) - want["ood_score"]) <= OOD_TOLERANCE:
        raise GoldenSetError(f"golden image {name}: out-of-distribution score {float(score):.3f}, the card records "
                             f"{want['ood_score']:.3f} (tolerance {OOD_TOLERANCE:g})")
