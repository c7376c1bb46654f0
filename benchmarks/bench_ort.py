"""ONNX Runtime settings, measured: which session options make the exported model fastest on this CPU, and
whether an int8 static (QDQ) model is worth shipping.

Every variant runs the same exported graph on the same preprocessed phantoms, batch after batch
(the scoring actor's batch size), through the product's session options
(`engines.session_options`) with one setting changed: the graph optimisation level, the intra-op
threads, the inter-op threads with parallel execution, the memory arena, the memory patterns,
and whether idle intra-op threads spin. All sessions stay open and take turns within each
round, in a rotated order, so load from other processes hits them alike; each round's
throughput ratio to the product's settings is kept and the range across rounds reported.

int8: the graph is quantised statically (QDQ, per-channel weights, MinMax ranges calibrated on
training-style phantoms) with onnxruntime.quantization, timed beside the rest, and its argmax
agreement with fp32 measured on held-out phantoms. The product ships int8 only if it is faster
here and agrees on at least 99.5 % of answers. EfficientNetB1 cannot be trained on this CPU,
so its agreement is measured on a barely trained network whose answers sit near chance, where
small changes flip the argmax; the compact CNN, trained properly on phantoms, gives the
agreement on a network that has learned (speed and agreement for both are saved).

Figures go to reports/bench/ort.json. They are measured on synthetic phantoms.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from common import ROOT, print_table, save

from tests.helpers import phantom_batch, train_and_export
from xray_ray.images.synth import SYNTHETIC_NOTE
from xray_ray.model_folder.card import ONNX_FILE
from xray_ray.model_folder.engines import onnx_session, session_options
from xray_ray.model_folder.onnx_export import INPUT_NAME

AGREEMENT_GOAL = 0.995


def variants(cpus: int) -> dict[str, dict]:
    """Each variant's changes to the product's session options."""
    return {"product": {},
            "graph_basic": {"graph_optimization_level": "ORT_ENABLE_BASIC"},
            "graph_extended": {"graph_optimization_level": "ORT_ENABLE_EXTENDED"},
            "graph_layout": {"graph_optimization_level": "ORT_ENABLE_LAYOUT"},
            **({"intra_1": {"intra_op_num_threads": 1}} if cpus > 1 else {}),
            "parallel_inter_2": {"execution_mode": "ORT_PARALLEL", "inter_op_num_threads": 2},
            "no_arena": {"enable_cpu_mem_arena": False},
            "no_mem_pattern": {"enable_mem_pattern": False},
            "no_spinning": {"config": {"session.intra_op.allow_spinning": "0"}}}


def options_for(changes: dict, threads: int):
    import onnxruntime as ort

    options = session_options(threads)
    for name, value in changes.items():
        if name == "config":
            for key, entry in value.items():
                options.add_session_config_entry(key, entry)
        elif name == "graph_optimization_level":
            options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, value)
        elif name == "execution_mode":
            options.execution_mode = getattr(ort.ExecutionMode, value)
        else:
            setattr(options, name, value)
    return options


class Reader:
    """onnxruntime.quantization's calibration reader over a batch of preprocessed images, one at a time."""

    def __init__(self, images: np.ndarray):
        self.feeds = iter([{INPUT_NAME: image[None]} for image in images])

    def get_next(self):
        return next(self.feeds, None)


def quantise(folder: Path, calibration: np.ndarray, out: Path) -> Path:
    """The int8 QDQ copy of `folder`'s graph, calibrated on `calibration` (shape inference and fusions first)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = out.with_suffix(".pre.onnx")
    # The graph's shapes are static, so ONNX's own shape inference suffices (the symbolic one needs sympy).
    quant_pre_process(str(folder / ONNX_FILE), str(prepared), skip_symbolic_shape=True)
    quantize_static(prepared, out, Reader(calibration), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out


def run_all(session, x: np.ndarray, batch: int) -> np.ndarray:
    return np.concatenate([session.run(["probabilities"], {INPUT_NAME: x[i:i + batch]})[0]
                           for i in range(0, len(x), batch)])


def measure(folder: Path, size: int, args, label: str) -> dict:
    """Every variant's images/s and ratio to the product's settings, round by round, plus int8's agreement."""
    x, _ = phantom_batch(args.images // 4, seed=91, size=size)
    calibration, _ = phantom_batch(args.calibration_images // 4, seed=92, size=size)
    held_out, _ = phantom_batch(args.agreement_images // 4, seed=93, size=size)
    with tempfile.TemporaryDirectory() as scratch:
        started = time.perf_counter()
        int8 = quantise(folder, calibration, Path(scratch) / "int8.onnx")
        quantise_s = time.perf_counter() - started
        changed = variants(args.threads)
        sessions = {name: onnx_session(folder / ONNX_FILE, gpu=False, options=options_for(changes, args.threads))
                    for name, changes in changed.items()}
        sessions["int8_qdq"] = onnx_session(int8, gpu=False, options=options_for({}, args.threads))
        fp32_answers = run_all(sessions["product"], held_out, args.batch).argmax(axis=1)
        agreement = float((run_all(sessions["int8_qdq"], held_out, args.batch).argmax(axis=1) == fp32_answers).mean())
        names = list(sessions)
        for session in sessions.values():  # warm-up: first runs allocate and pick kernels
            run_all(session, x[:args.batch], args.batch)
        rounds = []
        for r in range(args.repeats):
            throughput = {}
            for name in names[r % len(names):] + names[:r % len(names)]:
                started = time.perf_counter()
                run_all(sessions[name], x, args.batch)
                throughput[name] = len(x) / (time.perf_counter() - started)
            rounds.append(throughput)
            print(f"{label} round {r + 1}: " + ", ".join(f"{k} {v:.1f}" for k, v in throughput.items()), flush=True)
    table = []
    for name in names:
        ratios = [t[name] / t["product"] for t in rounds]
        table.append({"model": label, "variant": name, "images_per_s_median": statistics.median(t[name] for t in rounds),
                      "ratio_to_product_median": statistics.median(ratios), "ratio_min": min(ratios),
                      "ratio_max": max(ratios)})
    int8_row = next(row for row in table if row["variant"] == "int8_qdq")
    return {"model": label, "image_size": size, "threads": args.threads, "batch": args.batch, "images": len(x),
            "variants": {name: changed.get(name, "int8 QDQ static, product options") for name in names},
            "table": table, "rounds": rounds, "quantise_s": quantise_s,
            "int8": {"argmax_agreement": agreement, "held_out_images": len(held_out),
                     "faster": int8_row["ratio_min"] > 1.0, "agreement_goal": AGREEMENT_GOAL,
                     "ship": int8_row["ratio_min"] > 1.0 and agreement >= AGREEMENT_GOAL}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="an exported EfficientNetB1 folder (default: built here)")
    parser.add_argument("--size", type=int, default=240, help="EfficientNetB1's input size")
    parser.add_argument("--images", type=int, default=96, help="timed images per variant per round")
    parser.add_argument("--calibration-images", type=int, default=64)
    parser.add_argument("--agreement-images", type=int, default=400)
    parser.add_argument("--batch", type=int, default=16, help="the scoring actor's default batch")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads of the product's settings")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        effb1 = args.model or Path(scratch) / "effb1"
        if not effb1.exists():
            train_and_export(effb1, args.size)
        compact = Path(scratch) / "compact"
        train_and_export(compact, 64, "compact", epochs=12, per_class=150, seed=11,
                         config_file=ROOT / "configs" / "compact_cpu.yaml")
        results = [measure(effb1, args.size, args, "efficientnetb1"), measure(compact, 64, args, "compact")]
    print_table([row for result in results for row in result["table"]])
    for result in results:
        print(f"{result['model']}: int8 argmax agreement {result['int8']['argmax_agreement']:.1%} on "
              f"{result['int8']['held_out_images']} held-out phantoms; ship: {result['int8']['ship']}")
    path = save("ort", {"data": SYNTHETIC_NOTE, "results": results})
    print(f"saved {path}")


if __name__ == "__main__":
    main()
