"""Training on the CPU: does each backbone learn from scratch, and what does an epoch cost?

1. Learning: each backbone trains from scratch on phantoms at 64 px through the project's
   own `fit` (LRA) with its shipped from-scratch config. Reported: the training accuracy Keras
   saw at the kept (best) epoch; on the training images, accuracy with batch statistics
   (dropout off: what the weights compute) and in inference mode before and after the
   BatchNorm refresh; held-out accuracy after the refresh.
2. Cost: training throughput (images/s) of each backbone at 64 px and at the origin's
   240 px, measured on the same images in one run.
3. Epoch time: the demo's training epoch (compact, 64 px, 420 training phantoms, batches of
   16, compact_cpu.yaml) through the project's own `fit`, each epoch's wall time, and one pass
   over the training pipeline alone (the per-epoch reshuffle and batching, no model).
   `--only-epoch-time` runs just this part.

Figures go to reports/bench/train.json (parts 1 and 2) and reports/bench/train_epoch.json
(part 3). Numbers are on synthetic phantoms.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from common import ROOT, print_table, save

from xray_ray.config import flat_config, load_config
from xray_ray.images import synth
from xray_ray.images.index import build_index
from xray_ray.ray_runtime import ray_session
from xray_ray.training import data
from xray_ray.training.network import (
    build_model,
    predict_with_batch_statistics,
    refresh_batchnorm,
)
from xray_ray.training.run import fit, prepare_training_data

# The from-scratch settings that learn on a CPU, one shipped config per backbone.
LEARNING = {"compact": ROOT / "configs" / "compact_cpu.yaml",
            "efficientnetb1": ROOT / "configs" / "efficientnetb1_scratch_cpu.yaml"}


def _arrays(ds):
    rows = ds.to_pandas()
    x = np.stack([np.asarray(image, np.float32) for image in rows["image"]])
    return x, np.stack([np.asarray(y) for y in rows["y"]]).argmax(1)


def _accuracy(probabilities: np.ndarray, y: np.ndarray) -> float:
    return float((probabilities.argmax(1) == y).mean())


def learning_run(frame, backbone: str, epochs: int | None) -> dict:
    # No refresh during or after fit: the figures compare inference before and after one.
    config = load_config(LEARNING[backbone], ["train.bn_refresh_batches=0", "train.validation_bn_refresh_batches=0",
                                              *([f"lra.epochs={epochs}"] if epochs else [])])
    training = prepare_training_data(frame, config)
    result = fit(training, config)
    model = result.model
    x, y = _arrays(training.train)
    import ray  # after xray_ray, which keeps a local Ray on loopback

    xt, yt = _arrays(data.load_images(ray.data.from_pandas(training.split.test), config.data.image_size))
    stale = _accuracy(model.predict(x, verbose=0), y)
    batch_statistics = _accuracy(predict_with_batch_statistics(model, x, len(x)), y)  # the training set's own
    batch = config.train.bn_refresh_batch_size
    refresh_batchnorm(model, (x[i:i + batch] for i in range(0, len(x), batch)), 50)
    best = result.epochs[result.best_epoch - 1] if result.best_epoch else result.epochs[-1]
    return {
        "backbone": backbone, "epochs": len(result.epochs), "best_epoch": result.best_epoch,
        "fit_train_acc": best["accuracy"], "train_batch_stats_acc": batch_statistics,
        "train_inference_before_refresh": stale, "train_inference_after_refresh": _accuracy(model.predict(x, verbose=0), y),
        "held_out_acc": _accuracy(model.predict(xt, verbose=0), yt), "fit_s": result.seconds,
        "config": LEARNING[backbone].name,
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


def _pipeline_seconds(training, batch_size: int) -> tuple[float, float]:
    """Building the training pipeline (once per run), then one epoch's pass over it alone:
    reshuffle, batches, flips; no model."""
    started = time.perf_counter()
    pipeline = data.to_tf(training.train, batch_size, training=True)
    built = time.perf_counter()
    for _ in pipeline:
        pass
    return built - started, time.perf_counter() - built


def _spread(seconds: list[float]) -> dict:
    return {"median_s": statistics.median(seconds), "min_s": min(seconds), "max_s": max(seconds), "n": len(seconds)}


def epoch_time(frame, epochs: int, passes: int) -> dict:
    """The demo's epoch: `fit` on compact_cpu.yaml for `epochs` epochs (the first, which builds the
    graph, left out), and `passes` passes over the training pipeline alone."""
    config = load_config(LEARNING["compact"], [f"lra.epochs={epochs}", "lra.patience=100", "lra.stop_patience=100"])
    training = prepare_training_data(frame, config)
    build, passed = zip(*(_pipeline_seconds(training, config.data.batch_size) for _ in range(passes)))
    fitted = fit(training, config).epoch_seconds[1:]
    return {"train_images": training.train.count(), "batch_size": config.data.batch_size,
            "image_size": config.data.image_size, "fit_epoch": _spread(fitted), "pipeline_pass": _spread(passed),
            "pipeline_build": _spread(build)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--per-class", type=int, default=150, help="phantoms per class (150: 420 training images)")
    parser.add_argument("--epochs", type=int, help="override each backbone's epochs (LEARNING)")
    parser.add_argument("--timed-epochs", type=int, default=6,
                        help="epochs of the epoch-time part (the first is not timed)")
    parser.add_argument("--pipeline-passes", type=int, default=5, help="passes over the training pipeline alone")
    parser.add_argument("--only-epoch-time", action="store_true", help="run only the epoch-time part")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        synth.write_dataset(Path(tmp), per_class=args.per_class, size=96, seed=5)
        frame, _ = build_index(tmp)
        epoch = epoch_time(frame, args.timed_epochs, args.pipeline_passes)
        print_table([{"part": part, **epoch[part]} for part in ("fit_epoch", "pipeline_pass", "pipeline_build")])
        print(f"{epoch['train_images']} training images, {epoch['image_size']} px, batches of {epoch['batch_size']}")
        print("saved", save("train_epoch", {**epoch, "data": synth.SYNTHETIC_NOTE}))
        if args.only_epoch_time:
            return
        learning = [learning_run(frame, backbone, args.epochs) for backbone in ("compact", "efficientnetb1")]
    costs = [throughput(b, s) for b in ("compact", "efficientnetb1") for s in (64, 240)]
    print_table(learning)
    print_table(costs)
    print(f"({synth.SYNTHETIC_NOTE})")
    configs = {backbone: flat_config(load_config(path)) for backbone, path in LEARNING.items()}
    print("saved", save("train", {"learning": learning, "configs": configs, "throughput": costs,
                                  "data": synth.SYNTHETIC_NOTE}))


if __name__ == "__main__":
    with ray_session():
        main()
