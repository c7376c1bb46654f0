"""Overload: `xray-ray serve` offered 3x what it can answer, open loop, then ordinary load again.

Issue 28 item 3's goal. `xray-ray serve` runs as a user runs it (its own local Ray, 1 replica, a
compact model unless --model). Its capacity is measured first (16 clients in a closed loop);
then --clients threads are paced open loop at --factor times that rate for --seconds (a request
due while its client still waits goes out when the last one is answered, its latency counted
from when it was due), and then at half the capacity for --after-s. Recorded: what the overload
got back, by status and error code (goal: only 200 and 503 `overloaded`, no 500), the rate
actually offered (the clients share the 2-core machine with Serve: they may not reach the
target, and the table says so), p50/p99 of the answered requests against the configured bound
on an accepted request's wait (`serve.max_queue_wait_s`), and how long after the overload ended
the last refused or failed request was sent (goal: error-free within 10 s). Figures go to
reports/bench/overload.json.
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

from tests.serving.load import Answer, Clients, ServedCommand, Uploads, capacity
from xray_ray.config_services import ServeConfig
from xray_ray.images import synth
from xray_ray.processes import free_port
from xray_ray.ray_runtime import write_token_file


def paced(url: str, images: list[bytes], clients: int, rate: float, seconds: float) -> tuple[list[Answer], float]:
    """`clients` paced at `rate` requests/s for `seconds`; every answer, and when the load began (monotonic)."""
    load = Clients(url, Uploads(images), clients, interval_s=clients / rate, bound_s=seconds + 120)
    load.done.wait(seconds)
    return load.stop(), load.started


def latency_ms(answers: list[Answer], q: float, from_due: bool = True) -> float | None:
    """The q-th percentile of the answered requests' latency: from when each was due (what a user waits, the
    clients' own lag included), or from when it was sent (what the server took)."""
    answered = [a.latency_s if from_due else a.ended - a.started for a in answers if a.status == 200]
    return round(float(np.percentile(answered, q)) * 1000, 1) if answered else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, help="exported model folder (default: a compact CNN trained here)")
    parser.add_argument("--factor", type=float, default=3.0, help="offered load as a multiple of the capacity")
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the overload")
    parser.add_argument("--after-s", type=float, default=20.0, help="half-capacity load after the overload")
    parser.add_argument("--clients", type=int, default=96, help="paced client threads during the overload")
    parser.add_argument("--num-cpus", type=float, default=1.0, help="CPUs of the one replica")
    parser.add_argument("--repeats", type=int, default=2, help="overloads, one after another: ranges")
    parser.add_argument("--save-as", default="overload", help="figures go to reports/bench/<this>.json")
    args = parser.parse_args()

    bound_s = ServeConfig().max_queue_wait_s
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        model = args.model or compact_model(scratch / "compact")
        served = ServedCommand(model, free_port(), scratch / "serve", ["--num-cpus", str(args.num_cpus)],
                               write_token_file(scratch))
        images = phantom_pngs(16)
        try:
            served.wait_healthy()
            for repeat in range(1, args.repeats + 1):
                measured = capacity(served.url, Uploads(images), 16, 15)
                over, began = paced(served.url, images, args.clients, args.factor * measured, args.seconds)
                ended = began + args.seconds
                after, _ = paced(served.url, images, 8, 0.5 * measured, args.after_s)
                troubled = [a for a in after if a.status != 200]
                rows.append({
                    "repeat": repeat, "capacity_rps": round(measured, 1),
                    "target_rps": round(args.factor * measured, 1),
                    "offered_rps": round(len(over) / (max(a.ended for a in over) - began), 1),
                    "requests": len(over), "answered_200": sum(a.status == 200 for a in over),
                    "refused_503_overloaded": sum(a.status == 503 and a.error == "overloaded" for a in over),
                    "server_error_500": sum(a.status == 500 for a in over),
                    "other": dict(Counter(f"{a.status} {a.error}" for a in over
                                          if a.status != 200 and (a.status, a.error) != (503, "overloaded"))),
                    "p50_answered_ms": latency_ms(over, 50), "p99_answered_ms": latency_ms(over, 99),
                    "p99_answered_since_sent_ms": latency_ms(over, 99, from_due=False),
                    "bound_ms": bound_s * 1000,
                    "after_requests": len(after), "after_not_200": len(troubled),
                    "error_free_after_s": round(max((a.started - ended for a in troubled), default=0.0), 2)})
                print_table([{k: v for k, v in rows[-1].items() if k != "other"}])
        finally:
            served.stop()
    print_table([{k: v for k, v in row.items() if k != "other"} for row in rows])
    print("other answers:", [row["other"] for row in rows])
    print(f"{args.clients} paced clients on the same 2-core machine as the one replica ({args.num_cpus:g} CPU); "
          "other jobs may share it: timings are noisy. Goals: only 200 and 503 overloaded, no 500, answered p99 "
          f"within the bound ({bound_s:g} s), error-free within 10 s after.")
    print("saved", save(args.save_as, {"factor": args.factor, "seconds": args.seconds, "clients": args.clients,
                                       "replica_cpus": args.num_cpus, "data": synth.SYNTHETIC_NOTE, "rows": rows}))


if __name__ == "__main__":
    main()
