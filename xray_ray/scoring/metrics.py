"""A scoring run's Prometheus metrics: live through Ray's metrics while it runs, a text file when it ends.

While the run goes, the driver records (Ray exports them on its node's metrics port with
the `ray_` prefix; see `ray_runtime.metrics_url`), each tagged with `run` and `model_version`:

* `ray_xray_scoring_files_total{status}`: files done, `ok` or `error`;
* `ray_xray_scoring_errors_total{code}`: files that could not be scored, by error code;
* `ray_xray_scoring_predictions_total{predicted_class}` and
  `ray_xray_scoring_out_of_distribution_total`: answers, and those flagged;
* `ray_xray_scoring_images_per_second`: rows done per second of the run so far (gauge).

A local Ray ends with the run, so what a scrape did not catch is in `metrics.prom`, written
at the end into the run folder and, as `xray_scoring.prom`, into the output folder for
node-exporter's textfile collector (`--collector.textfile.directory=<out>`). It holds the
whole run's figures (every attempt of it) from its summary, as gauges named
`xray_scoring_last_run_*` with `run` and `model_version` labels.
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd

from xray_ray.files import atomic_write_text

RUN_FILE = "metrics.prom"
LATEST_FILE = "xray_scoring.prom"


class LiveRunMetrics:
    """The running driver's counters, fed one batch of prediction rows at a time."""

    def __init__(self, run: str, model_version: str) -> None:
        from ray.util.metrics import Counter, Gauge  # Ray is connected by now; importing it earlier is the CLI's call

        keys = ("run", "model_version")
        self.files = Counter("xray_scoring_files_total", "Files done by this run, by status.", ("status", *keys))
        self.errors = Counter("xray_scoring_errors_total", "Files that could not be scored, by code.", ("code", *keys))
        self.predictions = Counter("xray_scoring_predictions_total", "Answers by predicted class.",
                                   ("predicted_class", *keys))
        self.out_of_distribution = Counter("xray_scoring_out_of_distribution_total",
                                           "Answers flagged out of distribution.", keys)
        self.speed = Gauge("xray_scoring_images_per_second", "Rows done per second of the run so far.", keys)
        for metric in (self.files, self.errors, self.predictions, self.out_of_distribution, self.speed):
            metric.set_default_tags({"run": run, "model_version": model_version})
        self.started, self.rows = time.perf_counter(), 0

    @staticmethod
    def _count(counter, values: pd.Series, key: str) -> None:
        for value, n in values.value_counts().items():
            counter.inc(int(n), tags={key: str(value)})

    def add(self, rows: pd.DataFrame) -> None:
        """Count one batch of prediction rows (as the pipeline yields them)."""
        ok = rows["status"] == "ok"
        self._count(self.files, rows["status"], "status")
        self._count(self.errors, rows.loc[~ok, "error_code"], "code")
        self._count(self.predictions, rows.loc[ok, "predicted_label"], "predicted_class")
        flagged = int(rows.loc[ok, "out_of_distribution"].fillna(False).astype(bool).sum())
        if flagged:
            self.out_of_distribution.inc(flagged)
        self.rows += len(rows)
        self.speed.set(self.rows / max(time.perf_counter() - self.started, 1e-9))


def prometheus_text(summary: dict) -> str:
    """The run's figures from its summary, in Prometheus' text exposition format (prometheus_client's)."""
    from prometheus_client import CollectorRegistry, Gauge, generate_latest

    registry, run = CollectorRegistry(), {"run": summary["run"], "model_version": summary["model_version"]}

    def gauge(name: str, help_text: str, values: dict[str, float] | float, label: str | None = None) -> None:
        family = Gauge(f"xray_scoring_last_run_{name}", help_text, [*run, *([label] if label else [])],
                       registry=registry)
        for key, value in (values.items() if label else [(None, values)]):
            family.labels(**run, **({label: key} if label else {})).set(value)

    timing = summary.get("timing") or {}
    gauge("files", "Files of the run, by status (ok, error).", {"ok": summary["scored"], "error": summary["errors"]},
          "status")
    gauge("errors", "Files that could not be scored, by error code.", summary["error_codes"], "code")
    gauge("predictions", "In-distribution answers, by predicted class.", summary["per_class"], "predicted_class")
    gauge("out_of_distribution", "Answers flagged out of distribution.", summary["out_of_distribution"])
    gauge("scored_this_time", "Files scored by the last attempt (the rest had been scored before).",
          summary.get("scored_this_time") or 0)
    gauge("wall_seconds", "Wall time of the last attempt.", timing.get("wall_s") or 0)
    gauge("images_per_second", "Images scored per second of the last attempt's wall time.",
          timing.get("images_per_s") or 0)
    gauge("drift_shifted", "1 when the report flagged a shift in class mix or out-of-distribution rate.",
          int(bool((summary.get("drift") or {}).get("shifted"))))
    gauge("finished_timestamp_seconds", "When the run finished (Unix time).", time.time())
    return generate_latest(registry).decode()


def write_textfiles(folder: Path, summary: dict) -> Path:
    """`<run>/metrics.prom`, and the same as `<out>/xray_scoring.prom` (the latest run); both atomic."""
    text = prometheus_text(summary)
    atomic_write_text(folder / RUN_FILE, text)
    atomic_write_text(folder.parent / LATEST_FILE, text)
    return folder / RUN_FILE
