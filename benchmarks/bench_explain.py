"""Grad-CAM on ONNX Runtime: does it point at the finding, and what does an explanation cost next to a prediction?

Quality, with known truth: the pointing game on Lung_Opacity phantoms (`synth.phantom_with_region`
knows where each consolidation is). Of the phantoms the model classifies correctly, the share
whose heat-map peak lies inside the consolidation (strict) and within the game's standard
tolerance of it (15 px at 224 px, scaled), each beside chance (the share of the image that
region covers, where a random point would land); also the share of peaks on the map's bottom
row, which holds the diaphragm and abdomen and never the finding.

Cost: per image, on the same ONNX Runtime session, `predict_arrays` (probabilities only) against
`gradcam.explain` (one forward pass returning the conv maps too, the head's gradient in
numpy, upsampling), and the same plus the 256 px overlay PNG that /explain returns. The two
alternate image by image within each round, so load from other processes hits both alike;
each round's ratio of medians is kept and the range across rounds reported. Batch 1 is what
/explain runs; batch 16 is what the scoring report runs.

The models: compact CNNs trained here on phantoms with configs/compact_cpu.yaml, one per `--seeds`
entry, because the pointing game moves far more between trainings than between explanation
methods (or one folder given with `--model`). How long they train matters most. Measured over
seeds 11-13 on the same 400 Lung_Opacity phantoms: 150 phantoms per class for 12 epochs classified
65-72 % of them right, strict 0.23-0.53, tolerant 0.30-0.72; the default, 300 per class for 30
epochs, classifies 87-94 % right, strict 0.45-0.55, tolerant 0.72-0.84 (chance 1.9 % and about
7 %). Neither reaches the issue's 70 % strict: the peak of a bilinearly upsampled 8x8 map sits
on a cell centre, and the best cell overlaps the consolidation in 70-82 % of the images while its
centre lies inside it in only 45-55 %.
Tried on seed 12 with the same 300-per-class, 30-epoch recipe (strict / tolerant against 0.55 / 0.84 for the
shipped network), none better: a fourth 3x3 conv at 16x16 instead of the last pool (16x16 grid) 0.51 / 0.90,
its peaks on the consolidation's rim and 10 % on the bottom row; the same with a dilated conv 0.01 / 0.32
(the dilation's grid pattern); global max instead of average pooling 0.29 / 0.75; 600 phantoms per class
0.34 / 0.59. On seeds 11-13, multiplying the map by a Grad-CAM of the last block's 16x16 pre-pool
maps gave 0.44-0.59 strict (pre-pool maps alone 0.29-0.50).
The cost is measured on the first model.
Figures go to reports/bench/explain.json. They are measured on synthetic phantoms.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from common import ROOT, print_table, save

from tests.helpers import phantom_batch, pointing_game, train_and_export
from xray_ray.images.overlay import display_square, heat_map_png
from xray_ray.images.synth import SYNTHETIC_NOTE, phantom
from xray_ray.model_folder.classifier import Classifier
from xray_ray.model_folder.gradcam import explain


def _timed(work, part: np.ndarray) -> float:
    started = time.perf_counter()
    work(part)
    return time.perf_counter() - started


def cost_round(classifier: Classifier, x: np.ndarray, batch: int) -> dict:
    """Median seconds per image of predict, explain, and explain + overlay PNG, alternating per batch."""
    square = display_square(phantom("Normal", 299, np.random.default_rng(5)))  # the 256 px base /explain draws on
    times = {"predict": [], "explain": [], "explain_png": []}
    work = {"predict": lambda part: classifier.predict_arrays(part), "explain": lambda part: explain(classifier, part),
            "explain_png": lambda part: [heat_map_png(square, h) for h in explain(classifier, part).heatmaps]}
    for start in range(0, len(x) - batch + 1, batch):
        for key, run in work.items():
            times[key].append(_timed(run, x[start:start + batch]) / batch)
    medians = {key: statistics.median(values) for key, values in times.items()}
    return {**{f"{key}_ms": 1000 * value for key, value in medians.items()},
            "ratio": medians["explain"] / medians["predict"],
            "ratio_with_png": medians["explain_png"] / medians["predict"]}


def train_compact(scratch: Path, seed: int, args) -> Path:
    """A compact CNN trained on `args.per_class` phantoms per class for `args.epochs`, exported under `scratch`."""
    folder = scratch / f"compact-{seed}"
    started = time.perf_counter()
    train_and_export(folder, 64, "compact", epochs=args.epochs, per_class=args.per_class, seed=seed,
                     config_file=ROOT / "configs" / "compact_cpu.yaml")
    print(f"seed {seed}: trained a compact CNN on {4 * args.per_class} phantoms for {args.epochs} epochs "
          f"in {time.perf_counter() - started:.0f} s")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="an exported model folder (default: train compact CNNs here)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[11, 12, 13], help="one compact CNN per training seed")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--per-class", type=int, default=300, help="training phantoms per class")
    parser.add_argument("--pointing-images", type=int, default=400, help="Lung_Opacity phantoms for the pointing game")
    parser.add_argument("--cost-images", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads (a Serve replica's 1 CPU)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        folders = [args.model] if args.model else [train_compact(Path(scratch), seed, args) for seed in args.seeds]
        games = []
        for folder in folders:
            game = pointing_game(Classifier(folder, engine="onnxruntime", threads=args.threads),
                                 count=args.pointing_images, seed=2024)
            print(f"{folder.name}: pointing game on {game['correct']} correctly classified: "
                  f"strict {game['strict']:.1%} (chance {game['strict_chance']:.1%}), "
                  f"within {game['tolerance_px']:.1f} px {game['tolerant']:.1%} (chance {game['tolerant_chance']:.1%}); "
                  f"peaks on the bottom row {game['bottom_edge']:.1%}")
            games.append({**game, "model": folder.name, "strict_over_chance": game["strict"] / game["strict_chance"],
                          "tolerant_over_chance": game["tolerant"] / game["tolerant_chance"]})
        classifier = Classifier(folders[0], engine="onnxruntime", threads=args.threads)
        x, _ = phantom_batch(args.cost_images // 4, seed=77, size=classifier.image_size)
        explain(classifier, x[:16])  # warm-up
        rounds = {batch: [cost_round(classifier, x, batch) for _ in range(args.repeats)] for batch in (1, 16)}

    table = []
    for batch, results in rounds.items():
        ratios, with_png = [r["ratio"] for r in results], [r["ratio_with_png"] for r in results]
        table.append({"batch": batch, "predict_ms": statistics.median(r["predict_ms"] for r in results),
                      "explain_ms": statistics.median(r["explain_ms"] for r in results),
                      "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
                      "ratio_with_png_median": statistics.median(with_png), "ratio_with_png_max": max(with_png)})
    print_table(table)
    path = save("explain", {
        "data": SYNTHETIC_NOTE, "engine": classifier.engine, "threads": classifier.threads,
        "model_version": classifier.version, "pooling": str(classifier.head()["pooling"]),
        "pointing_game": {"region": "the consolidation's pixels at >= half its full density", "goal": 0.7,
                          "training": None if args.model else {"seeds": args.seeds, "epochs": args.epochs,
                                                               "per_class": args.per_class},
                          "strict_range": [min(g["strict"] for g in games), max(g["strict"] for g in games)],
                          "tolerant_range": [min(g["tolerant"] for g in games), max(g["tolerant"] for g in games)],
                          "per_model": games},
        "cost": {"goal_ratio": 2.0, "per_image_per_batch_size": table,
                 "rounds": {str(batch): results for batch, results in rounds.items()}},
    })
    print(f"saved {path}")


if __name__ == "__main__":
    main()
