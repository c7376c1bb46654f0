"""Out-of-distribution flag and calibrated confidence on real chest X-rays.

A compact model is trained through `xray-ray train`'s own code path (training.run.train_and_export,
configs/compact_cpu.yaml at a CPU size) on the real sample's train split, so its card holds
the calibration and OOD detector as shipped. Then:

* false flags: the share of the held-out real chest X-rays (the test split, which played no
  part in any fit) that the flag marks out of distribution (goal <= 5 %);
* true flags: the share of generated non-chest inputs flagged (goal >= 90 %), per kind
  (tests/nonchest.py: textures, documents, noise, gradients, constant images, phantoms at
  other sizes and contrasts, grey "photographs", pydicom's CT/MR slices) and an all-black
  7000 x 7000 image;
* the alternatives measured against the shipped score, each thresholded at the 95th, 97.5th
  and 99th percentile of its validation scores: the shipped score itself, the feature view
  alone (class-conditional Mahalanobis, tied covariance), the input view alone (input
  signature Mahalanobis), max softmax probability, energy (-logsumexp of the logits, computed
  from the features with head.npz), and kNN cosine distance to the training features;
* the input view's false flags beyond one split: the whole real sample re-split at random
  (same proportions) `--resplits` times, the input view fitted and scaled as at export, and
  flagged at the shipped threshold (36 test images give steps of 2.8 %, so one split says little);
* the calibration figures from the card (ECE, Brier, NLL before/after on valid and test).

Figures go to reports/bench/ood.json. Needs the real sample (XRAY_RAY_REAL_DATA or ../shared/data/xray_real).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
from common import ROOT, print_table, save
from scipy.special import logsumexp

from tests.nonchest import nonchest_set
from xray_ray.config import load_config
from xray_ray.images.index import build_index
from xray_ray.model_folder.card import ModelCard
from xray_ray.model_folder.classifier import Classifier
from xray_ray.model_folder.ood import fit_input_view, input_signature, z_scale, z_scores
from xray_ray.model_folder.reliability import SplitOutputs, collect, fit_reliability
from xray_ray.training.data import split_index
from xray_ray.training.run import train_and_export

REAL = Path(os.environ.get("XRAY_RAY_REAL_DATA", ROOT.parent / "shared" / "data" / "xray_real"))
PERCENTILES = (95.0, 97.5, 99.0)


def logits(head: dict, features: np.ndarray) -> np.ndarray:
    """The head's logits from pooled features, in numpy (BatchNorm folded, Dense relu, Dense)."""
    hidden = np.maximum((features * head["bn_scale"] + head["bn_shift"]) @ head["dense_w"] + head["dense_b"], 0)
    return hidden @ head["out_w"] + head["out_b"]


def knn_distance(train: np.ndarray, features: np.ndarray, k: int = 5) -> np.ndarray:
    """Cosine distance to the k-th nearest training feature vector."""
    unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    distances = 1 - unit(features) @ unit(train).T
    return np.sort(distances, axis=1)[:, min(k, train.shape[0]) - 1]


def scores(classifier: Classifier, train: SplitOutputs, part: SplitOutputs) -> dict[str, np.ndarray]:
    """Every candidate score for one set of outputs (higher = more unusual)."""
    views = classifier.detector.view_distances(part.features, part.signatures)
    return {"shipped (max of both views)": classifier.detector.score_views(part.features, part.signatures),
            "feature view (Mahalanobis, tied)": views[:, 0], "input view (signature Mahalanobis)": views[:, 1],
            "max softmax probability": -part.raw.max(axis=1),
            "energy": -logsumexp(logits(classifier.head(), part.features), axis=1),
            "kNN cosine (k=5)": knn_distance(train.features, part.features)}


def input_view_resplits(signatures: np.ndarray, outside: np.ndarray, fractions, threshold: float, repeats: int,
                        seed: int = 0) -> dict:
    """The input view alone, refitted on `repeats` random re-splits of the real sample: flag rates at `threshold`."""
    rng = np.random.default_rng(seed)
    n_train, n_valid = (round(f * len(signatures)) for f in fractions[:2])
    false_flags, outside_flags = [], []
    for _ in range(repeats):
        order = rng.permutation(len(signatures))
        train, valid, test = np.split(signatures[order], [n_train, n_train + n_valid])
        gaussians, _, held_out = fit_input_view(train, valid)
        scale = z_scale(held_out)
        false_flags.append(float((z_scores(gaussians.distance(test), *scale) > threshold).mean()))
        outside_flags.append(float((z_scores(gaussians.distance(outside), *scale) > threshold).mean()))
    return {"repeats": repeats, "test_images": len(signatures) - n_train - n_valid, "threshold": threshold,
            "real_test_flagged_mean": float(np.mean(false_flags)),
            "real_test_flagged_p10_p90": [float(v) for v in np.percentile(false_flags, [10, 90])],
            "nonchest_flagged_mean": float(np.mean(outside_flags)), "nonchest_flagged_min": float(np.min(outside_flags))}


def outputs_of(classifier: Classifier, images: list[np.ndarray]) -> SplitOutputs:
    inputs = np.stack([classifier.prepare(image) for image in images])
    out = classifier.forward(inputs, ("probabilities", "features"))
    return SplitOutputs(np.asarray(out["probabilities"], np.float64), np.asarray(out["features"], np.float64),
                        input_signature(inputs), np.zeros(len(images), int))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128, help="input size of the compact model (px)")
    parser.add_argument("--per-kind", type=int, default=30, help="generated non-chest images per kind")
    parser.add_argument("--nonchest-seed", type=int, default=7, help="seed of the generated non-chest set")
    parser.add_argument("--resplits", type=int, default=30, help="random re-splits for the input view's false flags")
    parser.add_argument("--keep", type=Path, help="train into this folder and keep it; when it already holds a model, "
                        "reuse it and refit only the calibration and the detector")
    args = parser.parse_args()
    if not (REAL / "index.csv").is_file():
        raise SystemExit(f"the real sample is not at {REAL} (set XRAY_RAY_REAL_DATA)")
    frame, _ = build_index(REAL)
    config = load_config(ROOT / "configs" / "compact_cpu.yaml", [f"data.image_size={args.size}"])
    split = split_index(frame, config.data.split, config.data.seed)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp) / "real_compact"
        if (folder / "model_card.json").is_file():
            fit_reliability(folder, *(split.part(name) for name in ("train", "valid", "test")))
        else:
            train_and_export(frame, config, folder, Path(tmp) / "report")
        card = ModelCard.read(folder).data
        classifier = Classifier(folder)
        parts = {name: collect(classifier, split.part(name)) for name in ("train", "valid", "test")}
        kinds, images = zip(*nonchest_set(args.per_kind, seed=args.nonchest_seed))
        outside = outputs_of(classifier, list(images))
        black = classifier.predict([np.zeros((7000, 7000), np.uint8)])
        valid, test, far = (scores(classifier, parts["train"], part) for part in (parts["valid"], parts["test"], outside))
    kinds = np.array(kinds)
    methods = []
    for name in valid:
        for percentile in PERCENTILES:
            cut = np.percentile(valid[name], percentile)
            flagged = far[name] > cut
            methods.append({"method": name, "percentile": percentile,
                            "real_test_flagged": float((test[name] > cut).mean()),
                            "nonchest_flagged": float(flagged.mean()),
                            **{f"{kind}": float(flagged[kinds == kind].mean()) for kind in dict.fromkeys(kinds)}})
    threshold = card["ood"]["threshold"]
    shipped_flags = far["shipped (max of both views)"] > threshold
    shipped = {"real_test_flagged": float((test["shipped (max of both views)"] > threshold).mean()),
               "nonchest_flagged": float(shipped_flags.mean()),
               **{kind: float(shipped_flags[kinds == kind].mean()) for kind in dict.fromkeys(kinds)}}
    real_signatures = np.concatenate([part.signatures for part in parts.values()])
    resplits = input_view_resplits(real_signatures, outside.signatures, config.data.split, threshold, args.resplits)
    print_table([{k: m[k] for k in ("method", "percentile", "real_test_flagged", "nonchest_flagged")} for m in methods])
    figures = {
        "data": f"real sample {REAL.name}: {len(frame)} images; split {config.data.split}, seed {config.data.seed}",
        "model": {"backbone": "compact", "image_size": args.size, "test_accuracy": card["metrics"]["test"]["accuracy"],
                  "epochs_run": card["training"]["epochs_run"]},
        "split_images": {name: len(part.labels) for name, part in parts.items()},
        "nonchest_seed": args.nonchest_seed,
        "nonchest_images": {kind: int((kinds == kind).sum()) for kind in dict.fromkeys(kinds)},
        "shipped": {"false_flag_target": card["ood"]["false_flag_target"], "threshold": threshold,
                    "real_valid_false_flag_rate": card["ood"]["valid_flag_rate"],
                    "real_test_false_flag_rate": shipped["real_test_flagged"],
                    "nonchest_flag_rate": shipped["nonchest_flagged"],
                    "per_kind": {kind: shipped[kind] for kind in dict.fromkeys(kinds)},
                    "all_black_7000px": {"ood_score": float(black.ood_score[0]),
                                         "flagged": bool(black.out_of_distribution[0]), "label": black.labels[0],
                                         "confidence": float(black.confidence[0]),
                                         "raw_confidence": float(black.raw_probabilities[0].max())}},
        "methods": methods,
        "input_view_resplits": resplits,
        "calibration": card["calibration"],
        "ood_card": card["ood"],
        "goals": {"real_test_false_flag_rate_max": 0.05, "nonchest_flag_rate_min": 0.90},
    }
    print(save("ood", figures))
    print({k: v for k, v in figures["shipped"].items() if k != "per_kind"}, figures["shipped"]["per_kind"])
    print("input view alone, re-splits:", resplits)


if __name__ == "__main__":
    main()
