"""Archive scoring throughput and memory: model alone vs a seed-style loop vs the Ray Data job.

Same exported model, same N synthetic phantom PNGs (299 px, like the database), one run,
for each engine (ONNX Runtime, and Keras with --keras):

1. model only: the images decoded and preprocessed beforehand, then `Classifier.predict_arrays`
   in batches of 32 (the engine's ceiling on this machine);
2. seed-style loop: one process that, batch after batch, opens each file with PIL,
   converts and resizes it, then predicts: decoding and inference never overlap. On the
   Keras engine this is the origin's way of scoring, the baseline the job must beat;
3. the scoring job end to end (`xray_ray.scoring.run.score`, actors backend, on a local Ray started
   beforehand as `ray job submit` finds one), from the call to the written report. The
   scoring actors' peak resident memory is read from their /proc entries while it runs.

The job runs with the pool sized from the cluster and, side by side, with the pre-sizing
default (1 actor x 1 CPU), each repeated (--repeats). `ratio_job_to_model` is the job with
its start-up (first scored row) excluded over the model-only ceiling; `ratio_job_to_seed_loop`
is the job, start-up included, over the seed-style loop on the same engine; with --keras,
`ratio_job_to_keras_seed_loop` is what the engine buys a nightly run. Each run's per-stage
busy seconds (summary.json's `timing`) are saved beside them, with where the machine's CPU went
(`cpu_s_*`: CPU seconds of the driver, the scoring actors, the read tasks, Ray Data's helper
actors and Ray's own services, sampled from /proc, next to the machine's busy and available
CPU seconds over the run): what the job spends beyond the model is what keeps it from the ceiling.
Memory: the job scores 2,000 and then 20,000 files (hard links to the same phantoms, each
scored as its own file) in fresh Ray instances, while the proportional set size (PSS, so
shared object-store pages count once) of the driver plus every Ray process it started is
sampled; flat memory means the peak barely moves with archive size. The model is an
EfficientNetB1 at 240 px (from scratch, one epoch on phantoms, as bench_inference builds it).
Figures go to reports/bench/score.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from common import ROOT, print_table, save
from PIL import Image

from tests.helpers import train_and_export
from xray_ray.images import synth
from xray_ray.images.preprocess import decode_and_preprocess
from xray_ray.model_folder.card import ModelCard
from xray_ray.processes import command_line, cpu_seconds, proc_field_mb, process_tree


def _pss_mb(pid: int) -> float:
    """Proportional set size of one process: shared object-store pages count once over the tree."""
    return proc_field_mb(pid, "Pss", "smaps_rollup") or 0.0


def _is_scoring_actor(pid: int) -> bool:
    """Ray titles a Ray Data actor's process `ray::MapWorker(MapBatches(ActorScorer))...`."""
    title = command_line(pid)
    return title.startswith(b"ray::") and b"ActorScorer" in title


RAY_DATA_HELPERS = (b"_StatsActor", b"_AutoscalingCoordinatorActor", b"ActorLocationTracker")
RAY_SERVICES = (b"DashboardAgent", b"RuntimeEnvAgent")
CPU_ROLES = ("driver", "scoring_actor", "read_tasks", "ray_data_helpers", "ray_services")
RAY_OWN = ("driver", "ray_data_helpers", "ray_services")
"""Ray's own share: its services, Ray Data's helper actors, and the driver, whose work beyond writing parts is
Ray Data's streaming executor."""


def machine_cpu_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    hz = os.sysconf("SC_CLK_TCK")
    return (sum(ticks) - ticks[3] - ticks[4]) / hz, sum(ticks) / hz  # idle and iowait are not busy


def cpu_role(pid: int, driver: int) -> str | None:
    """What a process of the job's tree is for; None while a Ray worker is idle (its role is not known yet)."""
    if pid == driver:
        return "driver"
    if _is_scoring_actor(pid):
        return "scoring_actor"
    title = command_line(pid).split(b"\0")[0]
    if any(name in title for name in RAY_DATA_HELPERS):
        return "ray_data_helpers"
    if not title.startswith(b"ray::") or any(name in title for name in RAY_SERVICES):
        return "ray_services"  # raylet, gcs_server, the dashboard and its agents
    return None if title == b"ray::IDLE" else "read_tasks"


def job_worker(archive: str, model: str, out: str, actors: int, cpus_per_actor: float, read_cpus: float,
               batch: int, engine: str, profile: str) -> None:
    """Runs in a fresh process: start a local Ray (`profile`: ray_runtime's lean or full), then time one scoring
    run of `archive`."""
    from xray_ray.config_services import ScoreConfig
    from xray_ray.ray_runtime import ray_session
    from xray_ray.scoring.run import score

    with ray_session(num_cpus=os.cpu_count(), log_to_driver=False, temp_dir=tempfile.mkdtemp(prefix="ray_bench_"),
                     profile=profile):
        started = time.perf_counter()
        summary = score(ScoreConfig(archives=[archive], model=model, out=out, run="bench", actors=actors,
                                    engine=engine, cpus_per_actor=cpus_per_actor, read_cpus=read_cpus,
                                    batch_size=batch))
        seconds = time.perf_counter() - started
    print(json.dumps({"seconds": seconds, "files": summary["files"], "scored": summary["scored"],
                      "engines": summary["engines"], "steady_img_s": steady_rate(Path(out) / "bench"),
                      "timing": summary["timing"]}))


def steady_rate(run: Path) -> float | None:
    """Images/s between the first and the last committed part: throughput once the actors are up."""
    import pandas as pd

    parts = sorted((run / "predictions").glob("part-*.parquet"), key=lambda p: p.stat().st_mtime)
    if len(parts) < 3:
        return None
    rows = sum(len(pd.read_parquet(p, columns=["path"])) for p in parts[1:])
    return rows / (parts[-1].stat().st_mtime - parts[0].stat().st_mtime)


def run_job(args, archive: Path, model: Path, engine: str, actors: int, cpus_per_actor: float,
            profile: str = "lean") -> dict:
    """Score `archive` in a fresh process (its own local Ray of `profile`) while sampling the PSS and CPU of its
    process tree; returns figures."""
    with tempfile.TemporaryDirectory() as out:
        process = subprocess.Popen(
            [sys.executable, __file__, "--job-worker", str(archive), str(model), out, str(actors),
             str(cpus_per_actor), str(args.read_cpus), str(args.batch), engine, profile],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "RAY_ADDRESS": "", "RAY_USAGE_STATS_ENABLED": "0",
                 "RAY_DATA_DISABLE_PROGRESS_BARS": "1"})
        peak = {"tree_pss_mb": 0.0, "driver_pss_mb": 0.0, "actor_rss_mb": 0.0}
        used: dict[int, float] = {}
        roles: dict[int, str] = {}
        machine_before = machine_cpu_seconds()

        def sample():
            while process.poll() is None:
                tree = process_tree(process.pid)
                for pid in tree:
                    seconds, role = cpu_seconds(pid), cpu_role(pid, process.pid)
                    if seconds is not None:
                        used[pid] = seconds
                    if role is not None and roles.get(pid) != "scoring_actor":  # a worker keeps its actor role
                        roles[pid] = role
                peak["driver_pss_mb"] = max(peak["driver_pss_mb"], _pss_mb(process.pid))
                peak["tree_pss_mb"] = max(peak["tree_pss_mb"], sum(_pss_mb(p) for p in tree))
                peak["actor_rss_mb"] = max([peak["actor_rss_mb"], *((proc_field_mb(p, "VmHWM") or 0.0) for p in tree
                                                                    if _is_scoring_actor(p))])
                time.sleep(0.5)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        stdout, stderr = process.communicate()
        sampler.join()
        if process.returncode:
            raise SystemExit(f"scoring job failed:\n{stderr[-3000:]}")
        busy, total = (after - before for after, before in zip(machine_cpu_seconds(), machine_before))
        cpu = {"machine_busy": busy, "machine_available": total, **dict.fromkeys(CPU_ROLES, 0.0)}
        for pid, seconds in used.items():
            cpu[roles.get(pid, "read_tasks")] += seconds  # a worker only ever seen idle ran read tasks between samples
        return {**json.loads(stdout.strip().splitlines()[-1]), **peak,
                "cpu_s": {key: round(value, 1) for key, value in cpu.items()}}


def model_only(classifier, inputs: np.ndarray, batch: int) -> float:
    """Images/s of predict_arrays on preloaded, preprocessed inputs."""
    classifier.predict_arrays(inputs[:batch])  # warm-up
    started = time.perf_counter()
    for start in range(0, len(inputs), batch):
        classifier.predict_arrays(inputs[start:start + batch])
    return len(inputs) / (time.perf_counter() - started)


def seed_loop(classifier, paths: list[Path], batch: int) -> float:
    """Images/s of the seed's way: PIL-decode a batch, then predict it, one after the other."""
    size = classifier.image_size
    started = time.perf_counter()
    for start in range(0, len(paths), batch):
        images = [np.asarray(Image.open(p).convert("L").resize((size, size), Image.Resampling.BILINEAR),
                             dtype=np.float32) for p in paths[start:start + batch]]
        classifier.predict_arrays(np.repeat(np.stack(images)[..., np.newaxis], 3, axis=3))
    return len(paths) / (time.perf_counter() - started)


def linked_archive(folder: Path, sources: list[Path], files: int) -> Path:
    """`files` hard links named apart, cycling over `sources`: a big archive without the disk space."""
    folder.mkdir(parents=True)
    for i in range(files):
        sub = folder / f"{i // 1000:03d}"
        sub.mkdir(exist_ok=True)
        os.link(sources[i % len(sources)], sub / f"img{i:06d}.png")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=512, help="phantoms in the throughput comparison")
    parser.add_argument("--size", type=int, default=240, help="model input size (EfficientNetB1's)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--actors", type=int, default=0, help="0: the pool sized from the cluster (the default)")
    parser.add_argument("--cpus-per-actor", type=float, default=0.0, help="0: chosen from the cluster")
    parser.add_argument("--compare-pool", default="1x1",
                        help="ACTORSxCPUS: a second pool measured side by side (the pre-sizing default 1x1; '' skips)")
    parser.add_argument("--ray-profiles", default="lean,full",
                        help="the job's local Ray, side by side: lean (the default of xray-ray score) and full")
    parser.add_argument("--repeats", type=int, default=2, help="each figure measured this many times: ranges")
    parser.add_argument("--read-cpus", type=float, default=0.5)
    parser.add_argument("--memory-files", default="2000,20000",
                        help="archive sizes for the memory comparison ('' skips it)")
    parser.add_argument("--save-as", default="score", help="figures go to reports/bench/<this>.json")
    parser.add_argument("--keras", action="store_true", help="also measure 1 and 3 with the Keras engine")
    parser.add_argument("--model", type=Path, help="reuse this exported folder (built there when missing)")
    parser.add_argument("--job-worker", nargs=9, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job_worker:
        a = args.job_worker
        job_worker(a[0], a[1], a[2], int(a[3]), float(a[4]), float(a[5]), int(a[6]), a[7], a[8])
        return
    from xray_ray.model_folder.classifier import Classifier

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = args.model or tmp / "effb1"
        if not model.exists():
            train_and_export(model, args.size)
        card = ModelCard.read(model).data
        synth.write_dataset(tmp / "archive", per_class=args.images // 4, size=299, seed=3)
        paths = sorted((tmp / "archive").glob("*/images/*.png"))
        inputs = np.stack([decode_and_preprocess(p.read_bytes(), card["input"]["size"]) for p in paths])
        rows, breakdowns = [], []
        profiles = [name for name in args.ray_profiles.split(",") if name]
        pools = [("sized" if profile == profiles[0] else f"sized[{profile}]", args.actors, args.cpus_per_actor,
                  profile) for profile in profiles]
        if args.compare_pool:
            actors, cpus = args.compare_pool.split("x")
            pools.append((f"{actors}x{cpus}", int(actors), float(cpus), profiles[0]))
        for repeat in range(args.repeats):
            for engine in ["onnxruntime", *(["keras"] if args.keras else [])]:
                classifier = Classifier(model, engine=engine)
                one = model_only(classifier, inputs, args.batch)
                two = seed_loop(classifier, paths, args.batch)
                del classifier
                for pool, actors, cpus, profile in pools:
                    job = run_job(args, tmp / "archive", model, engine, actors, cpus, profile)
                    timing = job["timing"]
                    startup = timing["startup_s"].get("first_result_s", 0.0)
                    three = job["scored"] / job["seconds"]
                    steady = job["scored"] / max(job["seconds"] - startup, 1e-9)
                    rows.append({"repeat": repeat + 1, "engine": engine, "pool": pool, "ray_profile": profile,
                                 "images": len(paths),
                                 "model_only_img_s": one, "seed_loop_img_s": two, "job_img_s": three,
                                 "job_excl_startup_img_s": steady, "startup_s": startup,
                                 "ratio_job_to_model": steady / one, "ratio_job_to_seed_loop": three / two,
                                 "actor_peak_rss_mb": job["actor_rss_mb"]})
                    breakdowns.append({"repeat": repeat + 1, "engine": engine, "pool": pool, "wall_s": timing["wall_s"],
                                       **timing["stage_busy_s"], **timing["startup_s"],
                                       **{f"cpu_s_{role}": seconds for role, seconds in job["cpu_s"].items()},
                                       "cpu_s_ray_own": round(sum(job["cpu_s"][role] for role in RAY_OWN), 1)})
        print_table(rows)
        print_table(breakdowns)
        ray_own = {}
        for pool, *_ in pools:
            found = [b["cpu_s_ray_own"] for b in breakdowns if b["pool"] == pool and b["engine"] == "onnxruntime"]
            ray_own[pool] = [min(found), max(found)]
        print("Ray's own CPU-seconds (services + Ray Data helpers + driver), min-max:", json.dumps(ray_own))
        ratios = {}
        for key in ("ratio_job_to_model", "ratio_job_to_seed_loop"):
            for pool, *_ in pools:
                found = [r[key] for r in rows if r["pool"] == pool and r["engine"] == "onnxruntime"]
                ratios[key if pool == "sized" else f"{key}[{pool}]"] = [round(min(found), 3), round(max(found), 3)]
        if args.keras:
            keras_loop = [r["seed_loop_img_s"] for r in rows if r["engine"] == "keras"]
            onnx_jobs = [r["job_img_s"] for r in rows if r["engine"] == "onnxruntime" and r["pool"] == "sized"]
            ratios["ratio_job_to_keras_seed_loop"] = [round(min(onnx_jobs) / max(keras_loop), 3),
                                                      round(max(onnx_jobs) / min(keras_loop), 3)]
        print("ratios (min-max over repeats):", json.dumps(ratios))
        memory = []
        for files in (int(n) for n in args.memory_files.split(",") if n):
            job = run_job(args, linked_archive(tmp / f"linked{files}", paths, files), model, "onnxruntime",
                          args.actors, args.cpus_per_actor)
            memory.append({"files": files, "job_img_s": job["scored"] / job["seconds"], "job_s": job["seconds"],
                           "job_steady_img_s": job["steady_img_s"] or "-",
                           "peak_driver_pss_mb": job["driver_pss_mb"], "peak_total_pss_mb": job["tree_pss_mb"]})
        if memory:
            print_table(memory)
        growth = memory[-1]["peak_total_pss_mb"] / memory[0]["peak_total_pss_mb"] - 1 if len(memory) > 1 else None
        if growth is not None:
            print(f"peak memory {memory[-1]['files']} vs {memory[0]['files']} files: {growth:+.1%}")
        print(f"model {card['version']} ({card.get('backbone', 'efficientnetb1')}, {card['input']['size']} px); "
              f"{args.actors} actor(s) x {args.cpus_per_actor} CPU, read tasks {args.read_cpus} CPU; "
              f"{synth.SYNTHETIC_NOTE}")
        print("saved", save(args.save_as, {
            "model": {"version": card["version"], "image_size": card["input"]["size"],
                      "weights": "none, 1 epoch on phantoms, BN refreshed"},
            "settings": {"batch": args.batch, "actors": args.actors, "cpus_per_actor": args.cpus_per_actor,
                         "read_cpus": args.read_cpus},
            "data": synth.SYNTHETIC_NOTE, "throughput": rows, "stage_breakdown": breakdowns, **ratios,
            "ray_own_cpu_s": ray_own,
            "memory": memory, "memory_growth": growth}))


if __name__ == "__main__":
    main()
