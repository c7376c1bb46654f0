"""What every benchmark shares: machine facts, saving figures as JSON, printing a table."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks share the test suite's helpers (tests/helpers.py)

from xray_ray.files import atomic_write_text  # noqa: E402

BENCH_DIR = ROOT / "reports" / "bench"


def machine() -> dict:
    """The facts a reader needs to compare figures across machines."""
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}


def save(name: str, figures: dict) -> Path:
    """Write `reports/bench/<name>.json` with the figures, the machine and the time."""
    path = BENCH_DIR / f"{name}.json"
    record = {"benchmark": name, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine(), **figures}
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")
    return path


def print_table(rows: list[dict]) -> None:
    """A plain aligned table of dict rows with the same keys."""
    keys = list(rows[0])
    widths = {k: max(len(k), *(len(_fmt(r[k])) for r in rows)) for k in keys}
    print("  ".join(k.ljust(widths[k]) for k in keys))
    for row in rows:
        print("  ".join(_fmt(row[k]).ljust(widths[k]) for k in keys))


def _fmt(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
