"""Inference engines side by side: Keras `predict_on_batch` against ONNX Runtime, same model, same images.

One exported EfficientNetB1 (from scratch, one epoch on a few phantoms and BatchNorm
refreshed, so its answers vary) at 240 px, and the same preprocessed synthetic phantoms for
both engines. Each engine runs in its own fresh process, as a Serve replica or scoring
actor would: start-up is the wall time from launching that process to its first answer,
RSS is read from /proc there, then batch-32 throughput and batch-1 latency are measured.
The engines alternate (`--repeats` rounds) and the table keeps each one's best round, so a
burst of load from another process on a shared machine does not decide the ratio; every
round is saved. Figures go to reports/bench/inference.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import ROOT, print_table, save

from tests.helpers import train_and_export
from xray_ray.config import CLASS_NAMES
from xray_ray.images import synth
from xray_ray.images.preprocess import preprocess
from xray_ray.model_folder.card import ModelCard


def worker(engine: str, model_dir: str, images: str, out: str, batch: int, latency_runs: int) -> None:
    """Runs in a fresh process: load the engine, answer once, then time throughput and latency."""
    from xray_ray.model_folder.classifier import Classifier
    from xray_ray.processes import process_footprint

    x = np.load(images)
    classifier = Classifier(model_dir, engine=engine)
    classifier.predict_arrays(x[:1])
    ready_at = time.time()
    footprint = process_footprint()
    classifier.predict_arrays(x[:batch])  # warm-up at the measured batch size
    probabilities = []
    started = time.perf_counter()
    for start in range(0, len(x), batch):
        probabilities.append(classifier.predict_arrays(x[start:start + batch]).probabilities)
    seconds = time.perf_counter() - started
    latencies = []
    for i in range(latency_runs):
        single = x[i % len(x)][np.newaxis]
        began = time.perf_counter()
        classifier.predict_arrays(single)
        latencies.append((time.perf_counter() - began) * 1000)
    np.save(out, np.concatenate(probabilities))
    print(json.dumps({
        "engine": classifier.engine, "provider": classifier.provider, "threads": classifier.threads,
        "ready_at": ready_at, "rss_mb": footprint["rss_mb"], "peak_rss_mb": footprint["peak_rss_mb"],
        "peak_rss_after_run_mb": process_footprint()["peak_rss_mb"],
        "images": len(x), "seconds": seconds, "latencies_ms": latencies,
        "tensorflow_imported": footprint["tensorflow_imported"],
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=256, help="phantoms scored by each engine")
    parser.add_argument("--size", type=int, default=240, help="model input size (EfficientNetB1's)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--latency-runs", type=int, default=30, help="batch-1 predictions timed per engine")
    parser.add_argument("--train-images", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2, help="alternating rounds per engine; the best is shown")
    parser.add_argument("--model", type=Path, help="reuse this exported folder (built there when missing)")
    parser.add_argument("--worker", nargs=4, metavar=("ENGINE", "MODEL", "IMAGES", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker, batch=args.batch, latency_runs=args.latency_runs)
        return

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = args.model or tmp / "effb1"
        if folder.exists():
            card, export_s = ModelCard.read(folder).data, None
        else:
            started = time.perf_counter()
            card = train_and_export(folder, args.size, per_class=max(1, args.train_images // 4)).card
            export_s = time.perf_counter() - started
        if card["input"]["size"] != args.size:
            raise SystemExit(f"{folder} takes {card['input']['size']} px inputs, not --size {args.size}")
        onnx = card["onnx"]
        if not onnx["usable"]:
            raise SystemExit(f"model.onnx is not usable, nothing to compare: {onnx.get('reason')}")
        images = np.stack([preprocess(synth.phantom(CLASS_NAMES[i % 4], 299, np.random.default_rng([1, i])),
                                              args.size) for i in range(args.images)])
        np.save(tmp / "images.npy", images)
        results, probabilities = {"keras": [], "onnxruntime": []}, {}
        for _, engine in ((r, e) for r in range(args.repeats) for e in results):
            out = tmp / f"{engine}.npy"
            launched = time.time()
            done = subprocess.run(
                [sys.executable, __file__, "--batch", str(args.batch), "--latency-runs", str(args.latency_runs),
                 "--worker", engine, str(folder), str(tmp / "images.npy"), str(out)],
                cwd=ROOT, capture_output=True, text=True, check=False)
            if done.returncode:
                raise SystemExit(f"{engine} worker failed:\n{done.stderr[-3000:]}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            result["startup_s"] = result.pop("ready_at") - launched
            result["img_per_s_b32"] = result["images"] / result["seconds"]
            result["b1_p50_ms"] = float(np.percentile(result["latencies_ms"], 50))
            result["b1_p90_ms"] = float(np.percentile(result["latencies_ms"], 90))
            results[engine].append(result)
            probabilities[engine] = np.load(out)

    rows = []
    for engine, runs in results.items():
        r = runs[0]
        rows.append({
            "engine": engine, "provider": r["provider"] or "tensorflow", "threads": r["threads"] or "tf default",
            "img_per_s_b32": max(run["img_per_s_b32"] for run in runs),
            "b1_p50_ms": min(run["b1_p50_ms"] for run in runs),
            "b1_p90_ms": min(run["b1_p90_ms"] for run in runs),
            "startup_s": min(run["startup_s"] for run in runs),
            "rss_mb": min(run["rss_mb"] for run in runs),
            "peak_rss_mb": min(run["peak_rss_after_run_mb"] for run in runs),
            "imports_tf": any(run["tensorflow_imported"] for run in runs),
        })
    keras_p, onnx_p = probabilities["keras"], probabilities["onnxruntime"]
    parity = {"max_abs_diff": float(np.abs(keras_p - onnx_p).max()),
              "argmax_agreement": float((keras_p.argmax(1) == onnx_p.argmax(1)).mean()),
              "probability_std_across_images": float(keras_p.std(axis=0).max())}
    speedup = rows[1]["img_per_s_b32"] / rows[0]["img_per_s_b32"]
    print_table(rows)
    print(f"onnxruntime/keras throughput {speedup:.2f}x, batch-1 p50 {rows[0]['b1_p50_ms'] / rows[1]['b1_p50_ms']:.2f}x; "
          f"parity on these {args.images} images: max |dprob| {parity['max_abs_diff']:.2g}, "
          f"argmax agreement {parity['argmax_agreement']:.3f}")
    built = f"reused {folder}" if export_s is None else f"export with ONNX conversion + parity check took {export_s:.1f} s"
    print(f"best of {args.repeats} alternating rounds per engine; {built} "
          f"(card parity max |dprob| {onnx['parity']['max_abs_diff']:.2g}); {synth.SYNTHETIC_NOTE}")
    print("saved", save("inference", {
        "model": {"backbone": "efficientnetb1", "weights": "none, 1 epoch on phantoms, BN refreshed",
                  "image_size": args.size, "onnx": onnx},
        "images": args.images, "batch": args.batch, "latency_runs": args.latency_runs, "repeats": args.repeats,
        "data": synth.SYNTHETIC_NOTE,
        "rows": rows, "speedup_throughput": speedup, "parity": parity,
        "export_seconds": export_s,
        "workers": results,
    }))


if __name__ == "__main__":
    main()
