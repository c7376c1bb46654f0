"""Training on the CPU: does each backbone learn from scratch, and what does an epoch cost?

1. Learning: each backbone trains from scratch on phantoms at 64 px through the project's
   own `fit` (LRA, BatchNorm refresh). Reported: the training accuracy Keras saw at the
   kept (best) epoch, inference-mode accuracy on the training images before and after the
   BatchNorm refresh, and held-out accuracy.
2. Cost: training throughput (images/s) of each backbone at 64 px and at the origin's
   240 px, measured on the same images in one run.

Figures go to reports/bench/train.json. Numbers are on synthetic phantoms.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
from common import print_table, save

from xray_ray import data, synth
from xray_ray.config import load_config
from xray_ray.index import build_index
from xray_ray.model import build_model, refresh_batchnorm
from xray_ray.ray_runtime import ensure_ray
from xray_ray.train import fit, prepare_training_data

# From-scratch settings that learn on a CPU budget (the origin's lr 0.001 and head
# penalties keep EfficientNetB1 at chance): a higher rate, a tenth of the head penalties.
LEARNING = {
    "compact": ["model.learning_rate=0.002", "model.l2=0.0001", "model.l1=0.00001", "model.bn_momentum=0.9"],
    "efficientnetb1": ["model.learning_rate=0.003", "model.l2=0.0016", "model.l1=0.0006", "model.bn_momentum=0.9"],
}


def _arrays(ds):
    rows = ds.to_pandas()
    x = np.stack([np.asarray(image, np.float32) for image in rows["image"]])
    return x, np.stack([np.asarray(y) for y in rows["y"]]).argmax(1)


def _accuracy(model, x, y, training: bool) -> float:
    predictions = np.concatenate([np.asarray(model(x[i:i + 64], training=training)) for i in range(0, len(x), 64)])
    return float((predictions.argmax(1) == y).mean())


def learning_run(frame, backbone: str, epochs: int) -> dict:
    config = load_config(None, ["data.image_size=64", "data.split=[0.7, 0.15, 0.15]", f"model.backbone={backbone}",
                                "model.weights=none", f"lra.epochs={epochs}", "lra.patience=2",
                                "train.bn_refresh_batches=0", *LEARNING[backbone]])
    training = prepare_training_data(frame, config)
    result = fit(training, config)
    x, y = _arrays(training.train)
    test = training.split.test
    stale = _accuracy(result.model, x, y, training=False)  # before any training-mode pass moves the statistics
    refresh_batchnorm(result.model, (x[i:i + 32] for i in range(0, len(x), 32)), 50)
    xt, yt = _arrays(data.load_images(ray.data.from_pandas(test), 64))
    best = result.epochs[result.best_epoch - 1] if result.best_epoch else result.epochs[-1]
    return {
        "backbone": backbone, "epochs": len(result.epochs), "fit_train_acc": best["accuracy"],
        "inference_acc_before_refresh": stale, "inference_acc_after_refresh": _accuracy(result.model, x, y, False),
        "held_out_acc": _accuracy(result.model, xt, yt, False), "seconds": result.seconds,
        "settings": " ".join(LEARNING[backbone]),
    }


def throughput(backbone: str, size: int, images: int = 64) -> dict:
    config = load_config(None, [f"model.backbone={backbone}", "model.weights=none"])
    model = build_model(config.model, size)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (images, size, size, 3)).astype(np.float32)
    y = np.eye(4, dtype=np.float32)[rng.integers(0, 4, images)]
    model.fit(x[:32], y[:32], batch_size=32, epochs=1, verbose=0)  # graph building, not measured
    started = time.perf_counter()
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    seconds = time.perf_counter() - started
    return {"backbone": backbone, "size": size, "train_images_per_s": images / seconds,
            "epoch_s_600_images": 600 * seconds / images}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--per-class", type=int, default=150)
    parser.add_argument("--epochs", type=int, default=15)
    args = parser.parse_args()
    ensure_ray()
    with tempfile.TemporaryDirectory() as tmp:
        synth.write_dataset(Path(tmp), per_class=args.per_class, size=96, seed=5)
        frame, _ = build_index(tmp)
        learning = [learning_run(frame, backbone, args.epochs) for backbone in ("compact", "efficientnetb1")]
    costs = [throughput(b, s) for b in ("compact", "efficientnetb1") for s in (64, 240)]
    print_table(learning)
    print_table(costs)
    print(f"({synth.SYNTHETIC_NOTE})")
    print("saved", save("train", {"learning": learning, "throughput": costs, "data": synth.SYNTHETIC_NOTE}))


if __name__ == "__main__":
    main()
