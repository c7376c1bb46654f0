"""Indexing throughput on synthetic phantoms: the Ray Data job against a one-process loop.

Both index the same 2,000 files (299 px, the database's size) in one run, so the ratio
holds even on a noisy machine. Figures go to reports/bench/index.json.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common import print_table, save

from xray_ray.images import index as indexing
from xray_ray.images import synth
from xray_ray.ray_runtime import ray_session


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--files", type=int, default=2000, help="total files (split evenly over the 4 classes)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "phantoms"
        started = time.perf_counter()
        synth.write_dataset(root, per_class=args.files // 4, size=299, seed=0)
        synth_s = time.perf_counter() - started
        indexing.build_index(root)  # warm-up: Ray workers and imports
        started = time.perf_counter()
        frame, _ = indexing.build_index(root)
        ray_s = time.perf_counter() - started
        paths = [p for p, _ in indexing.discover(root).files]
        started = time.perf_counter()
        for path in paths:
            indexing.describe_file(path)
        loop_s = time.perf_counter() - started
    n = len(frame)
    rows = [
        {"method": "ray data index (xray-ray index)", "files": n, "seconds": ray_s, "files_per_s": n / ray_s},
        {"method": "single-process loop", "files": n, "seconds": loop_s, "files_per_s": n / loop_s},
    ]
    print_table(rows)
    print(f"speed-up {loop_s / ray_s:.2f}x; synthesizing took {synth_s:.1f} s ({synth.SYNTHETIC_NOTE})")
    print("saved", save("index", {"rows": rows, "speedup": loop_s / ray_s, "synth_seconds": synth_s}))


if __name__ == "__main__":
    with ray_session():
        main()
