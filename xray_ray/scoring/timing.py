"""Where a scoring run's time goes: seconds per stage, and start-up apart.

The driver times what it does itself (discovery, writing parts, the report); read tasks
and actors time reading, hashing, decoding, waiting for an actor and the model, and their
rows carry those seconds (`pipeline.TIMING_PREFIX` columns) to the driver, which sums them.
Stages overlap in a pipeline, so the stage seconds are busy time (summed over every task
and actor), shown beside the run's wall time: a stage whose busy time approaches the wall
time times its workers is the one that holds the run back. Queueing is not work but each
image's wait between its decoding and the model: summed over images it would dwarf every
stage, so it is given apart, as the mean wait per image.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import pandas as pd

from xray_ray.scoring.pipeline import TIMING_PREFIX, WORKER_STAGES

DRIVER_STAGES = ("discovery", "write", "report")
STAGES = ("discovery", "read", "hash", "decode_preprocess", "model", "write", "report")


class StageTimes:
    """Busy seconds per stage and start-up figures of one run, filled as it goes."""

    def __init__(self) -> None:
        self.busy = dict.fromkeys((*STAGES, "queueing", "model_load"), 0.0)
        self.startup: dict[str, float] = {}
        self.started = time.perf_counter()

    @contextlib.contextmanager
    def measure(self, stage: str) -> Iterator[None]:
        """Add the block's wall time to a driver stage (or a start-up figure, for any other name)."""
        started = time.perf_counter()
        try:
            yield
        finally:
            spent = time.perf_counter() - started
            if stage in DRIVER_STAGES:
                self.busy[stage] += spent
            else:
                self.startup[stage] = self.startup.get(stage, 0.0) + spent

    def mark(self, name: str) -> None:
        """Record the seconds since the run started under `name` (e.g. the first scored row), once."""
        self.startup.setdefault(name, time.perf_counter() - self.started)

    def add_rows(self, rows: pd.DataFrame) -> None:
        """Add the seconds the pipeline's rows carry."""
        for stage in WORKER_STAGES:
            column = f"{TIMING_PREFIX}{stage}"
            if column in rows:
                self.busy[stage] += float(rows[column].sum())

    def as_dict(self, images: int) -> dict:
        """The breakdown for run.json and summary.json."""
        wall = time.perf_counter() - self.started
        startup = {**self.startup, "model_load_s_per_actor_sum": self.busy["model_load"]}
        return {"wall_s": round(wall, 2), "images_scored": images,
                "images_per_s": round(images / wall, 2) if wall > 0 else None,
                "stage_busy_s": {stage: round(self.busy[stage], 2) for stage in STAGES},
                "queue_wait_s_per_image": round(self.busy["queueing"] / images, 3) if images else None,
                "startup_s": {key: round(value, 2) for key, value in startup.items()}}
