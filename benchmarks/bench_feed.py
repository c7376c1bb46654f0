"""Feed rate: how fast the scoring pipeline can feed an accelerator, measured with a null model.

Issue 30 item 3. On a GPU node the model stops being the bottleneck; reading, hashing, decoding
and moving images are what is left. Here the model is a null ONNX graph: the same input as
EfficientNetB1's (N, 240, 240, 3), a mean over each image (so every input is really read) times
zero, plus constant probabilities. Side by side, in one run, on the same N synthetic 299 px
PNGs:

1. the pipeline: `scoring.run.scoring_dataset` (the nightly job's Ray Data read tasks and actor
   pool, sized by `scoring.run.plan` as a run is) with a scorer that runs the null graph, on the
   job's lean local Ray; timed from the first read to the last row, and from the first row on;
2. a `multiprocessing` pool of as many processes as the machine has CPUs, each running the
   pipeline's own read step (`scoring.pipeline.read_and_prepare`: read, sha256, decode,
   preprocess, pack) on 16 files at a time, the parent running the null graph on what comes back.

`ratio_pipeline_to_pool` (goal: at least 0.8) is 1 over 2, start-up included; repeats give
ranges. Figures go to reports/bench/feed.json.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from common import print_table, save

from xray_ray.config import CLASS_NAMES
from xray_ray.config_services import ScoreConfig
from xray_ray.images import synth
from xray_ray.scoring.ledger import KnownKeys
from xray_ray.scoring.pipeline import Scorer, read_and_prepare, unpack

CONSTANT = np.full(len(CLASS_NAMES), 1 / len(CLASS_NAMES), np.float32)


def null_model(path: Path, size: int) -> Path:
    """An ONNX graph from (N, size, size, 3) float32 to (N, 4): CONSTANT + 0 x each image's mean."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("ReduceMean", ["input", "axes"], ["mean"], keepdims=1),
        helper.make_node("Reshape", ["mean", "column"], ["flat"]),
        helper.make_node("Mul", ["flat", "zero"], ["nothing"]),
        helper.make_node("Add", ["nothing", "constant"], ["probabilities"]),
    ]
    initializers = [
        helper.make_tensor("axes", TensorProto.INT64, [3], [1, 2, 3]),
        helper.make_tensor("column", TensorProto.INT64, [2], [-1, 1]),
        helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
        helper.make_tensor("constant", TensorProto.FLOAT, [1, len(CLASS_NAMES)], CONSTANT.tolist()),
    ]
    graph = helper.make_graph(nodes, "null", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                           ["n", size, size, 3])],
                              [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT,
                                                             ["n", len(CLASS_NAMES)])], initializers)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path


class NullScorer(Scorer):
    """The pipeline's scorer with the null graph instead of a model: rows as a run writes them."""

    def __init__(self, model_path: str, threads: int = 1):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(model_path, options, providers=["CPUExecutionProvider"])

    def predict(self, inputs):
        probabilities = self.session.run(None, {"input": inputs})[0]
        n = len(inputs)
        return {"probabilities": probabilities, "ood_score": np.zeros(n), "out_of_distribution": np.zeros(n, bool),
                "model_version": "null", "engine": "onnxruntime"}

    def describe(self):
        return "null", "onnxruntime"


def pipeline_rate(archive: Path, model: Path, size: int, batch: int) -> dict:
    """Images/s of the nightly job's pipeline over `archive` with the null scorer (inside a Ray session)."""
    from xray_ray.scoring.file_list import write_file_list
    from xray_ray.scoring.run import plan, scoring_dataset

    with tempfile.TemporaryDirectory() as tmp:
        options = ScoreConfig(archives=[str(archive)], batch_size=batch)
        files = Path(tmp) / "files"
        started = time.perf_counter()
        write_file_list([archive], files, exclude=Path(tmp), chunk_rows=options.files_per_task)
        pool = plan(options)
        ds = scoring_dataset(files, size, KnownKeys([]), (NullScorer, {"model_path": str(model)}), pool, options)
        rows, first = 0, None
        for frame in ds.iter_batches(batch_size=None, batch_format="pandas"):
            first = first or time.perf_counter()
            rows += int((frame["status"] == "ok").sum())
        ended = time.perf_counter()
    return {"images": rows, "seconds": ended - started, "img_s": rows / (ended - started),
            "img_s_after_first_row": rows / max(ended - first, 1e-9), "pool": pool.describe()}


def _prepare(args: tuple[list[str], int]) -> np.ndarray:
    paths, size = args
    prepared = read_and_prepare({"path": np.array(paths, dtype=object), "error": np.array([""] * len(paths), object),
                                 "code": np.array([""] * len(paths), object)}, size, KnownKeys([]))
    return prepared["pixels"]


def pool_rate(paths: list[Path], model: Path, size: int, batch: int, processes: int) -> dict:
    """Images/s of a multiprocessing pool running the pipeline's read step, the parent running the null graph."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    chunks = [([str(p) for p in paths[i:i + 16]], size) for i in range(0, len(paths), 16)]
    started = time.perf_counter()
    rows, waiting = 0, []
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        for pixels in pool.imap(_prepare, chunks):
            waiting.append(pixels)
            if sum(len(p) for p in waiting) >= batch:
                rows += len(session.run(None, {"input": unpack(np.concatenate(waiting))})[0])
                waiting = []
        if waiting:
            rows += len(session.run(None, {"input": unpack(np.concatenate(waiting))})[0])
    seconds = time.perf_counter() - started
    return {"images": rows, "seconds": seconds, "img_s": rows / seconds, "processes": processes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=2000, help="synthetic 299 px PNGs")
    parser.add_argument("--size", type=int, default=240, help="model input size (EfficientNetB1's)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="each side measured this many times: ranges")
    parser.add_argument("--save-as", default="feed", help="figures go to reports/bench/<this>.json")
    args = parser.parse_args()

    from xray_ray.ray_runtime import ray_session

    processes = os.cpu_count() or 1
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        synth.write_dataset(tmp / "archive", per_class=args.images // 4, size=299, seed=3)
        paths = sorted((tmp / "archive").glob("*/images/*.png"))
        model = null_model(tmp / "null.onnx", args.size)
        with ray_session(num_cpus=processes, log_to_driver=False, temp_dir=tempfile.mkdtemp(prefix="ray_feed_"),
                         profile="lean"):
            for repeat in range(1, args.repeats + 1):
                ray_side = pipeline_rate(tmp / "archive", model, args.size, args.batch)
                plain = pool_rate(paths, model, args.size, args.batch, processes)
                assert ray_side["images"] == plain["images"] == len(paths), (ray_side, plain)
                rows.append({"repeat": repeat, "images": len(paths), "pipeline_img_s": round(ray_side["img_s"], 1),
                             "pipeline_img_s_after_first_row": round(ray_side["img_s_after_first_row"], 1),
                             "pool_img_s": round(plain["img_s"], 1),
                             "ratio_pipeline_to_pool": round(ray_side["img_s"] / plain["img_s"], 3),
                             "ratio_after_first_row": round(ray_side["img_s_after_first_row"] / plain["img_s"], 3)})
                print_table(rows[-1:])
            pool = ray_side["pool"]
    print_table(rows)
    ratios = {key: [min(r[key] for r in rows), max(r[key] for r in rows)]
              for key in ("ratio_pipeline_to_pool", "ratio_after_first_row")}
    print("ratios (min-max):", ratios)
    print(f"pipeline: {pool}; pool: {processes} processes; {args.size} px inputs; {synth.SYNTHETIC_NOTE}")
    print("saved", save(args.save_as, {"images": len(paths), "size": args.size, "batch": args.batch,
                                       "processes": processes, "pipeline_pool": pool, "data": synth.SYNTHETIC_NOTE,
                                       "rows": rows, **ratios}))


if __name__ == "__main__":
    main()
