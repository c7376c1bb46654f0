"""A Serve replica SIGKILLed under 8-client load: the requests lost and the time until the full count is back.

Issue 28 item 2. `xray-ray serve` runs as a user runs it (its own local Ray, a compact model
unless --model), once per replica count; a driver here joins its Ray to read what Serve's
controller reports. For each kill: 8 clients POST phantoms to /predict in a closed loop; once
each has been answered twice, one replica process gets a SIGKILL; the load goes on until a few
seconds after the full count is RUNNING again. Reported per kill: the requests in flight at
the kill (on every replica), those that failed and how (HTTP status or connection error),
failures among requests sent after the kill, the slowest answer, the seconds until Serve had
started a replacement (its health check noticing the death) and until the full count was
RUNNING again, and whether every request sent after that was answered 200. Repeats give
ranges. The clients share the 2-core machine with the replicas, and other jobs may too: the
table says so. Figures go to reports/bench/replica_death.json.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections import Counter
from pathlib import Path

from bench_serve import phantom_pngs
from common import ROOT, print_table, save

from tests.helpers import train_and_export
from tests.serving.load import (
    PROXY_TITLE,
    Death,
    ServedCommand,
    Uploads,
    replica_death,
    replica_title,
    running_replicas,
    titled,
    wait_until,
)
from xray_ray.config import SERVE_APP_NAME
from xray_ray.images import synth
from xray_ray.processes import free_port
from xray_ray.ray_runtime import ray_session, write_token_file


def compact_model(folder: Path) -> Path:
    """The compact CNN the demo and the tests serve (configs/compact_cpu.yaml, 64 px), briefly trained on phantoms."""
    train_and_export(folder, 64, "compact", epochs=2, per_class=16, config_file=ROOT / "configs" / "compact_cpu.yaml")
    return folder


def figures(death: Death, replicas: int, repeat: int) -> dict:
    """One kill's row: what was in flight, what failed and how, the recovery times, what followed."""
    failed = death.failed()
    after = death.after_recovery()
    return {"replicas": replicas, "repeat": repeat, "answers": len(death.answers),
            "in_flight_at_kill": len(death.in_flight()), "failed": len(failed),
            "failed_how": dict(Counter(str(a.status) for a in failed)),
            "failed_sent_after_kill": sum(1 for a in failed if a.started > death.killed_at),
            "slowest_s": round(max(a.latency_s for a in death.answers), 2),
            "replaced_s": round(death.replaced_s, 2), "recovered_s": round(death.recovered_s, 2),
            "after_recovery": len(after), "after_recovery_all_200": all(a.status == 200 for a in after)}


def kills(served: ServedCommand, images: list[bytes], replicas: int, args) -> list[dict]:
    """`args.repeats` kills against one served app of `replicas` replicas, its Ray joined for Serve's status."""
    os.environ.update(served.join_env())  # before Ray is imported: it reads the auth mode then
    with ray_session(served.gcs_address(), log_to_driver=False):
        from ray.serve import context

        # Serve caches the controller it found by job id, which this driver's job in the next Ray repeats: forget
        # the last Ray's (a private call; Ray is pinned)
        context._disconnect()

        def running() -> int:
            return running_replicas(SERVE_APP_NAME)

        def replica_pids() -> list[int]:
            return titled(served.pids(), replica_title(SERVE_APP_NAME))

        wait_until(lambda: running() == replicas and len(replica_pids()) == replicas, 300, "every replica running")
        print(f"{replicas} replica(s) running; proxy pid {titled(served.pids(), PROXY_TITLE)}")
        rows = []
        for repeat in range(1, args.repeats + 1):
            death = replica_death(served.url, Uploads(images), args.clients, replica_pids, running, replicas,
                                  after_s=args.after_s)
            rows.append(figures(death, replicas, repeat))
            print_table(rows[-1:])
    return rows


def ranges(rows: list[dict], key: str) -> dict:
    """min-max of `key` over the kills, per replica count."""
    return {str(n): [min(r[key] for r in rows if r["replicas"] == n), max(r[key] for r in rows if r["replicas"] == n)]
            for n in sorted({r["replicas"] for r in rows})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, help="exported model folder (default: a compact CNN trained here)")
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3, help="kills per replica count: ranges")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--num-cpus", type=float, default=0.5, help="CPUs per replica")
    parser.add_argument("--after-s", type=float, default=5.0, help="load kept on after the full count is back")
    parser.add_argument("--save-as", default="replica_death", help="figures go to reports/bench/<this>.json")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        model = args.model or compact_model(scratch / "compact")
        images, token_file = phantom_pngs(16), write_token_file(scratch)
        for replicas in args.replicas:
            served = ServedCommand(model, free_port(), scratch / f"serve-{replicas}",
                                   ["--replicas", str(replicas), "--num-cpus", str(args.num_cpus)], token_file)
            try:
                served.wait_healthy()
                rows += kills(served, images, replicas, args)
            finally:
                served.stop()
    print_table(rows)
    summary = {key: ranges(rows, key) for key in ("in_flight_at_kill", "failed", "failed_sent_after_kill",
                                                  "replaced_s", "recovered_s", "slowest_s")}
    for key, by_count in summary.items():
        print(f"{key}: " + ", ".join(f"{n} replica(s) {low}-{high}" for n, (low, high) in by_count.items()))
    print(f"{args.clients} clients on the same 2-core machine as the replicas ({args.num_cpus:g} CPU each); "
          "other jobs may share it: timings are noisy.")
    print("saved", save(args.save_as, {"clients": args.clients, "replica_cpus": args.num_cpus,
                                       "kills_per_count": args.repeats, "data": synth.SYNTHETIC_NOTE,
                                       "rows": rows, **summary}))


if __name__ == "__main__":
    main()
