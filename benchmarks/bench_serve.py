"""The Serve endpoint under concurrent clients, dynamic batching on vs off, per engine, in one run.

One exported model (EfficientNetB1 at 240 px by default, as bench_inference builds it), one
local Ray, one Serve HTTP proxy on 127.0.0.1. For each setting the app is redeployed with
the same replica resources and only `max_batch_size` changed (1 = batching off); the same
PNG phantoms are POSTed to /predict by N client threads. Reported per run: requests/s,
p50/p95/p99 latency, the mean batch size the replica ran (from /stats) and the replica's
resident memory (from /model). Each repeat first measures the ceiling: one max-batch forward
pass in this process on the first engine with the replica's threads (`model_only_img_s`);
`ratio_serve_to_model` is requests/s at the most clients with batching over that ceiling,
`ratio_batching_on_off` batching on over off, each given as the range over repeats.
The clients share the machine with the replica, as they would on a 2-core box; the table
says so. Figures go to reports/bench/serve.json.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from common import print_table, save
from PIL import Image

from tests.helpers import train_and_export
from xray_ray.config import CLASS_NAMES
from xray_ray.images import synth
from xray_ray.model_folder.card import ModelCard
from xray_ray.processes import free_port
from xray_ray.ray_runtime import ray_session


def phantom_pngs(count: int) -> list[bytes]:
    """`count` different 299 px phantoms, PNG-encoded as a client would upload them."""
    images = []
    for i in range(count):
        gray = synth.phantom(CLASS_NAMES[i % 4], 299, np.random.default_rng([5, i]))
        buffer = io.BytesIO()
        Image.fromarray(gray).save(buffer, "PNG")
        images.append(buffer.getvalue())
    return images


def load(url: str, images: list[bytes], clients: int, requests: int) -> dict:
    """`requests` POSTs from `clients` threads; throughput and latency percentiles."""
    def one(i: int) -> float:
        began = time.perf_counter()
        response = client.post(f"{url}/predict", content=images[i % len(images)],
                               headers={"Content-Type": "image/png"})
        response.raise_for_status()
        return (time.perf_counter() - began) * 1000

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    with httpx.Client(timeout=300, limits=limits) as client, ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, range(clients)))  # warm-up: connections open, replica's first batches done
        before = client.get(f"{url}/stats").json()
        started = time.perf_counter()
        latencies = list(pool.map(one, range(requests)))
        seconds = time.perf_counter() - started
        after = client.get(f"{url}/stats").json()
    batches = after["batches"] - before["batches"]
    return {"req_per_s": requests / seconds,
            "p50_ms": float(np.percentile(latencies, 50)), "p95_ms": float(np.percentile(latencies, 95)),
            "p99_ms": float(np.percentile(latencies, 99)),
            "mean_batch": (after["images"] - before["images"]) / batches if batches else 0.0}


def max_batch_forward_ms(model_dir: Path, batch: int, threads: int, engine: str, repeats: int = 5) -> float:
    """Median time of one forward pass at the max batch size, same engine and threads as the replica."""
    from xray_ray.model_folder.classifier import Classifier

    classifier = Classifier(model_dir, engine=engine, threads=threads)
    x = np.random.default_rng(0).uniform(0, 255, (batch, classifier.image_size, classifier.image_size, 3))
    classifier.predict_arrays(x)
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        classifier.predict_arrays(x)
        times.append((time.perf_counter() - began) * 1000)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, help="exported model folder to serve (built when missing)")
    parser.add_argument("--size", type=int, default=240, help="input size of the model built when --model is absent")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--requests", type=int, default=192, help="timed requests per run")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--wait-ms", type=float, default=20.0, help="batch wait timeout")
    parser.add_argument("--replica-cpus", type=float, default=2.0)
    parser.add_argument("--engines", nargs="+", default=["onnxruntime", "keras"])
    parser.add_argument("--repeats", type=int, default=2, help="each figure measured this many times: ranges")
    parser.add_argument("--save-as", default="serve", help="figures go to reports/bench/<this>.json")
    args = parser.parse_args()

    from ray import serve

    from xray_ray.config_services import ServeConfig
    from xray_ray.serving import app as serving

    with tempfile.TemporaryDirectory() as tmp, ray_session(num_cpus=max(2, int(args.replica_cpus)),
                                                           log_to_driver=False):
        folder = args.model or Path(tmp) / "effb1"
        card = ModelCard.read(folder).data if folder.exists() else train_and_export(folder, args.size).card
        images = phantom_pngs(64)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        rows, ceilings = [], []
        try:
            for repeat in range(1, args.repeats + 1):
                # the ceiling, measured beside the runs it is compared with: one max-batch forward pass on
                # the replica's engine and threads, preloaded tensors, no HTTP
                reference_ms = max_batch_forward_ms(folder, args.max_batch, int(args.replica_cpus), args.engines[0])
                ceilings.append({"repeat": repeat, "max_batch_forward_ms": reference_ms,
                                 "model_only_img_s": args.max_batch * 1000 / reference_ms})
                for engine, max_batch in ((e, b) for e in args.engines for b in (args.max_batch, 1)):
                    settings = ServeConfig(model=str(folder), engine=engine, max_batch_size=max_batch,
                                           batch_wait_timeout_s=args.wait_ms / 1000, port=port,
                                           max_ongoing_requests=2 * args.max_batch, num_cpus=args.replica_cpus)
                    serving.start(settings)
                    for clients in args.clients:
                        result = load(url, images, clients, args.requests)
                        runtime = httpx.get(f"{url}/model", timeout=60).json()["runtime"]
                        rows.append({"repeat": repeat, "engine": engine, "batching": "on" if max_batch > 1 else "off",
                                     "max_batch": max_batch, "clients": clients, **result,
                                     "replica_rss_mb": runtime["rss_mb"],
                                     "imports_tf": runtime["tensorflow_imported"]})
                        print_table(rows[-1:])
        finally:
            serve.shutdown()
    engine, most = args.engines[0], max(args.clients)
    per_repeat = []
    for ceiling in ceilings:
        mine = [r for r in rows if r["repeat"] == ceiling["repeat"] and r["engine"] == engine and r["clients"] == most]
        on, off = (next(r for r in mine if r["batching"] == state) for state in ("on", "off"))
        per_repeat.append({"repeat": ceiling["repeat"], "serve_on_req_s": on["req_per_s"],
                           "serve_off_req_s": off["req_per_s"], **ceiling,
                           "ratio_serve_to_model": on["req_per_s"] / ceiling["model_only_img_s"],
                           "ratio_batching_on_off": on["req_per_s"] / off["req_per_s"],
                           "p99_over_max_batch_forward": on["p99_ms"] / ceiling["max_batch_forward_ms"]})
    ranges = {key: [round(min(r[key] for r in per_repeat), 3), round(max(r[key] for r in per_repeat), 3)]
              for key in ("ratio_serve_to_model", "ratio_batching_on_off", "p99_over_max_batch_forward")}
    model = f"{card['backbone']} {card['input']['size']} px, {engine}"
    print_table(rows)
    print_table(per_repeat)
    print(f"{model}, {most} clients, ranges over {args.repeats} repeats: serve/model {ranges['ratio_serve_to_model']} "
          f"(goal >= 0.6), batching on/off {ranges['ratio_batching_on_off']}, p99 / one max-batch "
          f"({args.max_batch}) forward {ranges['p99_over_max_batch_forward']} (goal <= 3). "
          f"Clients ran on the same {args.replica_cpus:g}-CPU machine as the replica.")
    print("saved", save(args.save_as, {
        "model": {"backbone": card["backbone"], "image_size": card["input"]["size"], "version": card["version"]},
        "replica_cpus": args.replica_cpus, "max_batch": args.max_batch, "wait_ms": args.wait_ms,
        "requests_per_run": args.requests, "data": synth.SYNTHETIC_NOTE, "rows": rows, "per_repeat": per_repeat,
        **ranges,
    }))


if __name__ == "__main__":
    main()
