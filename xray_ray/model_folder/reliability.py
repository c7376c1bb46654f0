"""Fit an exported model's calibration and out-of-distribution detector, and record both in its card.

Runs once at export (training.run.export_and_evaluate), on the exported folder itself, so
what is fitted is what ships: the raw probabilities and pooled features come from the
folder's own engine (ONNX Runtime when usable). The calibration is fitted on the
validation split and measured on valid and test; the detector's Gaussians on the
training split, its scale on held-out images, its threshold set for `OOD_FALSE_FLAG_RATE`
of in-distribution images. The detector's arrays go to `ood.npz` (its digest in the
card's `files`). Last, the folder as now calibrated answers its golden set (`golden`), which
every later load must reproduce.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from xray_ray.files import atomic_path, sha256_file
from xray_ray.model_folder.calibration import Calibration, calibration_metrics, choose_and_fit
from xray_ray.model_folder import golden
from xray_ray.model_folder.card import GOLDEN_FILE, OOD_FILE, ModelCard
from xray_ray.model_folder.classifier import Classifier
from xray_ray.model_folder.ood import OUT_OF_FOLD_FOLDS, OodDetector, input_signature, threshold_for
from xray_ray.reports.metrics import Evaluation, evaluate

OOD_FALSE_FLAG_RATE = 0.025
"""The share of in-distribution images the out-of-distribution threshold is set to flag."""
OOD_METHOD = ("max of two Gaussian views, each a squared Mahalanobis distance (Ledoit-Wolf shrunk covariance) whose log "
              "is standardised by held-out in-distribution images: pooled backbone features (class means, tied "
              "covariance; nearest class; scaled on valid) and a signature of the input (4x4 thumbnail, 12 image and 7 "
              f"texture statistics, standardised; scaled on valid and {OUT_OF_FOLD_FOLDS}-fold out-of-fold train)")


@dataclass
class SplitOutputs:
    """The exported model's raw answers on one labelled split (usable files only)."""

    raw: np.ndarray  # (N, K) probabilities before calibration
    features: np.ndarray  # (N, D) pooled backbone features
    signatures: np.ndarray  # (N, SIGNATURE_SIZE) input signatures
    labels: np.ndarray  # (N,) class indices


def collect(classifier: Classifier, frame: pd.DataFrame, batch_size: int = 32) -> SplitOutputs:
    """Run the exported graph once over the files of `frame` (path, label)."""
    paths = list(frame["path"])
    errors = [""] * len(paths)
    raw, features, signatures, used = [], [], [], []
    for good, inputs in classifier.prepared_batches(paths, errors, batch_size):
        outputs = classifier.forward(inputs, ("probabilities", "features"))
        raw.append(np.asarray(outputs["probabilities"], np.float64))
        features.append(np.asarray(outputs["features"], np.float64))
        signatures.append(input_signature(inputs))
        used.extend(good)
    if not used:
        raise ValueError("no usable image in the split: nothing to fit calibration or the OOD detector on")
    labels = np.array([classifier.classes.index(label) for label in frame["label"].iloc[used]])
    return SplitOutputs(np.concatenate(raw), np.concatenate(features), np.concatenate(signatures), labels)


def before_after(calibration, split: SplitOutputs) -> dict:
    return {"images": len(split.labels), "before": calibration_metrics(split.raw, split.labels),
            "after": calibration_metrics(calibration.apply(split.raw), split.labels)}


def fit_reliability(folder: str | Path, train: pd.DataFrame, valid: pd.DataFrame, test: pd.DataFrame,
                    false_flag_rate: float = OOD_FALSE_FLAG_RATE) -> dict[str, SplitOutputs]:
    """Fit both on the exported `folder`, write `ood.npz` and the card's `calibration` and `ood` sections.

    Returns the raw outputs per split (for the report's reliability diagram).
    """
    folder = Path(folder)
    classifier = Classifier(folder, raw=True)
    parts = {"train": collect(classifier, train), "valid": collect(classifier, valid), "test": collect(classifier, test)}
    valid_part, test_part = parts["valid"], parts["test"]
    calibration, measured = choose_and_fit(valid_part.raw, valid_part.labels)
    section = {**calibration.as_dict(), "fitted_on": "valid", "chosen_by": "5-fold cross-validated NLL on valid",
               "cross_validation": measured, "valid": before_after(calibration, valid_part),
               "test": before_after(calibration, test_part)}
    train_part = parts["train"]
    detector, details = OodDetector.fit(train_part.features, train_part.labels, train_part.signatures,
                                        valid_part.features, valid_part.signatures)
    threshold = threshold_for(false_flag_rate)
    valid_scores = detector.score_views(valid_part.features, valid_part.signatures)
    ood = {"method": OOD_METHOD, "fitted_on": "train", "train_images": len(train_part.labels),
           "false_flag_target": false_flag_rate, "threshold": threshold,
           "threshold_from": "the target rate, with each view's z standard normal on held-out images",
           "valid_flag_rate": float((valid_scores > threshold).mean()), **details}
    ood["test_flag_rate"] = float((detector.score_views(test_part.features, test_part.signatures) > threshold).mean())
    with atomic_path(folder / OOD_FILE) as tmp:
        detector.save(tmp)
    card = ModelCard.read(folder)
    files = {**card.get("files", {}), OOD_FILE: {"sha256": sha256_file(folder / OOD_FILE)}}
    card.update(calibration=section, ood=ood, files=files)
    return parts


def fit_and_measure(folder: str | Path, train: pd.DataFrame, valid: pd.DataFrame,
                    test: pd.DataFrame) -> tuple[ModelCard, dict[str, SplitOutputs], dict[str, Evaluation]]:
    """`fit_reliability`, then valid and test measured through the fitted calibration and recorded as the card's
    `metrics`: what an export does, and what `xray-ray refit` does again for a folder exported before."""
    fitted = fit_reliability(folder, train, valid, test)
    card = ModelCard.read(folder)
    calibration = Calibration.from_dict(card["calibration"])
    evaluations = {part: evaluate([card.classes[i] for i in fitted[part].labels], calibration.apply(fitted[part].raw))
                   for part in ("valid", "test")}
    card.update(metrics={part: e.as_dict() for part, e in evaluations.items()})
    return record_golden_set(card, test), fitted, evaluations


def record_golden_set(card: ModelCard, test: pd.DataFrame) -> ModelCard:
    """Record the folder's golden set from its test split, answered by the folder as now calibrated, in
    `golden.npz` and the card (whose `files` gets its digest)."""
    section = golden.record(Classifier(card.folder, check_golden=False), test)
    files = {**card.get("files", {}), GOLDEN_FILE: {"sha256": section["sha256"]}}
    return card.update(golden=section, files=files)
