"""Validation that describes the exported model: BatchNorm statistics refreshed before each validation pass.

The demo's tuning config (configs/tune_demo.yaml: compact CNN from scratch, 64 px) trains on
phantoms twice with the same seed: once validating on Keras's moving BatchNorm averages
(`train.validation_bn_refresh_batches=0`, the old behaviour) and once with the statistics
re-estimated on training batches right before each validation pass (the shipped default).
For each run: train and validation accuracy per epoch, and the validation accuracy of the
model as exported (best weights, statistics refreshed after training), which the per-epoch
validation figure should match.

Figures: reports/bench/validation.json and reports/bench/validation_curves.png (synthetic phantoms).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from common import BENCH_DIR, ROOT, print_table, save

from xray_ray.config import load_config
from xray_ray.images import synth
from xray_ray.images.index import build_index
from xray_ray.ray_runtime import ray_session
from xray_ray.reports.figures import plot_curves
from xray_ray.training.run import fit, prepare_training_data, refresh_statistics

CONFIG = ROOT / "configs" / "tune_demo.yaml"


def _valid_accuracy(model, training) -> float:
    rows = training.valid.to_pandas()
    x = np.stack([np.asarray(image, np.float32) for image in rows["image"]])
    y = np.stack([np.asarray(v) for v in rows["y"]]).argmax(1)
    return float((model.predict(x, verbose=0).argmax(1) == y).mean())


def run(training, refresh_batches: int, epochs: int, backbone: str) -> dict:
    config = load_config(CONFIG, [f"train.validation_bn_refresh_batches={refresh_batches}", f"lra.epochs={epochs}",
                                  f"model.backbone={backbone}"])
    result = fit(training, config)
    refresh_statistics(result.model, training, config)  # as the export does
    best = result.epochs[result.best_epoch - 1] if result.best_epoch else result.epochs[-1]
    return {"validation_bn_refresh_batches": refresh_batches, "best_epoch": result.best_epoch,
            "train_accuracy": [e["accuracy"] for e in result.epochs],
            "val_accuracy": [e["val_accuracy"] for e in result.epochs],
            "best_epoch_val_accuracy": best["val_accuracy"], "exported_val_accuracy": _valid_accuracy(result.model, training),
            "fit_s": round(result.seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--per-class", type=int, default=150)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--backbone", default="compact")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        synth.write_dataset(Path(tmp), per_class=args.per_class, size=299, seed=0)  # as the demo draws them
        frame, _ = build_index(tmp)
        training = prepare_training_data(frame, load_config(CONFIG))
        runs = [run(training, batches, args.epochs, args.backbone) for batches in (0, 4)]
    print_table([{k: v for k, v in r.items() if not isinstance(v, list)} for r in runs])
    curves = {}
    for r, name in zip(runs, ("before: moving averages", "after: refreshed before validation")):
        curves[f"{name} - train"] = r["train_accuracy"]
        curves[f"{name} - validation"] = r["val_accuracy"]
    plot_curves(BENCH_DIR / "validation_curves.png", curves,
                f"{args.backbone} on phantoms (tune_demo.yaml): accuracy per epoch", "Epoch", "accuracy")
    print(f"({synth.SYNTHETIC_NOTE})")
    print("saved", save("validation", {"runs": runs, "backbone": args.backbone, "per_class": args.per_class,
                                       "config": CONFIG.name, "data": synth.SYNTHETIC_NOTE}))


if __name__ == "__main__":
    with ray_session():
        main()
