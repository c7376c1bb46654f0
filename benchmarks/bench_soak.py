"""A soak: `xray-ray serve` under steady half-capacity load with poison uploads, for --minutes (default 30).

Issue 28 item 6: what months of service would show in minutes. `xray-ray serve` runs as a user
runs it (its own local Ray, 1 replica, a compact model unless --model). First the capacity is
measured briefly (16 clients in a closed loop, good images only); then the 16 clients are paced
open-loop at half of it, and every 20th upload (5 %) is poison: broken or hostile PNG bytes
(tests/badfiles.py), each of which must get its 4xx and reason code. Recorded: answers by
status, 5xx (goal 0), poison answered anything but its 4xx (goal 0), p99 latency of the good
answers in the first and the last window (5 minutes, or a sixth of a shorter run; goal: last at
most 1.2x the first), and the replica's and the HTTP proxy's resident memory, open files and
threads from /proc after the first window (the warm-up) and at the end (goal: RSS growth at most
10 %). Latency counts from when a request was due, so a paced client that fell behind counts
its wait. The clients share the 2-core machine with Serve, and other jobs may too: the figures
say so. The load loop is tests/serving/load.py's, which tests/serving/test_soak.py runs for
2 minutes. Figures go to reports/bench/soak.json.
"""

from __future__ import annotations

import argparse
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
from bench_replica_death import compact_model
from bench_serve import phantom_pngs
from common import print_table, save

from tests.serving.load import POISON, PROXY_TITLE, ServedCommand, Soak, Uploads, replica_title, soak, titled
from xray_ray.config import SERVE_APP_NAME
from xray_ray.images import synth
from xray_ray.processes import free_port
from xray_ray.ray_runtime import write_token_file

WINDOW_S = 300.0
"""The issue's first and last window; a run shorter than six of them uses a sixth of the run."""


def p99_ms(soaked: Soak, start_s: float, end_s: float) -> float | None:
    """p99 latency (ms) of the good answers due between `start_s` and `end_s` into the paced run."""
    latencies = [a.latency_s for a in soaked.answers if a.poison is None and a.status == 200
                 and start_s <= a.due - soaked.began < end_s]
    return round(float(np.percentile(latencies, 99)) * 1000, 1) if latencies else None


def sample_at(soaked: Soak, seconds: float) -> dict:
    """The first /proc sample taken at or after `seconds` into the run (the last one if none)."""
    return next((sample for at, sample in soaked.samples if at >= seconds), soaked.samples[-1][1])


def growth(before: float | None, after: float | None) -> float | None:
    return round(after / before - 1, 4) if before and after is not None else None


def process_rows(soaked: Soak, window_s: float) -> list[dict]:
    """Per process: RSS, open files and threads after the warm-up (the first window) and at the end."""
    warm, end = sample_at(soaked, window_s), soaked.samples[-1][1]
    rows = []
    for role in warm:
        row = {"process": role}
        for key in ("rss_mb", "open_files", "threads"):
            row[f"{key}_after_warmup"], row[f"{key}_end"] = warm[role][key], end[role][key]
        row["rss_growth"] = growth(warm[role]["rss_mb"], end[role]["rss_mb"])
        rows.append(row)
    return rows


def answer_figures(soaked: Soak) -> dict:
    """Counts by status; 5xx; poison not answered its own 4xx and code; good uploads not answered 200."""
    poison = [a for a in soaked.answers if a.poison is not None]
    good = [a for a in soaked.answers if a.poison is None]
    return {"requests": len(soaked.answers), "good": len(good), "poison": len(poison),
            "by_status": dict(Counter(str(a.status) for a in soaked.answers)),
            "server_errors_5xx": sum(a.server_error for a in soaked.answers),
            "poison_not_their_4xx": sum((a.status, a.error) != POISON[a.poison] for a in poison),
            "good_not_200": sum(a.status != 200 for a in good)}


def figures(soaked: Soak, window_s: float) -> dict:
    first, last = p99_ms(soaked, 0, window_s), p99_ms(soaked, soaked.seconds - window_s, soaked.seconds)
    return {"capacity_rps": round(soaked.capacity_rps, 2), "rate_rps": round(soaked.rate_rps, 2),
            "window_s": window_s, **answer_figures(soaked), "p99_first_window_ms": first,
            "p99_last_window_ms": last, "p99_last_over_first": round(last / first, 3) if first and last else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--minutes", type=float, default=30.0, help="length of the paced run")
    parser.add_argument("--model", type=Path, help="exported model folder (default: a compact CNN trained here)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--load-share", type=float, default=0.5, help="paced rate as a share of the measured capacity")
    parser.add_argument("--poison-every", type=int, default=20, help="every Nth upload is poison (20: 5 %%)")
    parser.add_argument("--capacity-s", type=float, default=20.0, help="closed-loop seconds measuring the capacity")
    parser.add_argument("--num-cpus", type=float, default=1.0, help="CPUs of the one replica")
    parser.add_argument("--save-as", default="soak", help="figures go to reports/bench/<this>.json")
    args = parser.parse_args()

    seconds = args.minutes * 60
    window_s = min(WINDOW_S, seconds / 6)
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        model = args.model or compact_model(scratch / "compact")
        served = ServedCommand(model, free_port(), scratch / "serve", ["--num-cpus", str(args.num_cpus)],
                               write_token_file(scratch))
        try:
            served.wait_healthy()

            def processes() -> dict[str, int]:
                pids = served.pids()
                return {"replica": titled(pids, replica_title(SERVE_APP_NAME))[0],
                        "proxy": titled(pids, PROXY_TITLE)[0]}

            soaked = soak(served.url, Uploads(phantom_pngs(16), args.poison_every), args.clients, seconds,
                          args.load_share, processes, capacity_s=args.capacity_s)
        finally:
            served.stop()
    summary, processes_table = figures(soaked, window_s), process_rows(soaked, window_s)
    print_table([{k: v for k, v in summary.items() if k != "by_status"}])
    print("answers by status:", summary["by_status"])
    print_table(processes_table)
    print(f"{args.minutes:g} min paced at {args.load_share:g} of the capacity, {args.clients} clients on the same "
          "2-core machine as Serve; other jobs may share it: timings are noisy. Goals: 0 5xx, last-window p99 "
          "<= 1.2x the first, RSS growth after warm-up <= 10 %.")
    print("saved", save(args.save_as, {"minutes": args.minutes, "clients": args.clients, "load_share": args.load_share,
                                       "poison_share": 1 / args.poison_every, "replica_cpus": args.num_cpus,
                                       "data": synth.SYNTHETIC_NOTE, **summary, "processes": processes_table,
                                       "samples": [{"at_s": round(at, 1), **sample} for at, sample in soaked.samples]}))


if __name__ == "__main__":
    main()
