"""A scoring run's DICOM results: one Structured Report per answered DICOM input, and optionally its heat map.

As prediction rows reach the driver, each answered row whose input was DICOM gets its SR
(`images.dicom_results.structured_report`), and with `sr_heatmaps` an RGB Secondary Capture of
its Grad-CAM overlay (none for an out-of-distribution image). They go to `sr_out`
(`<study UID>/<SR UID>.dcm`, written atomically) and, with `pacs_store`, back to the PACS with
one STOW-RS request per input, into the study the input belongs to. Their UIDs are derived
from the input's SOP Instance UID and the model version, so writing them again overwrites the same
files, and storing them again sends the same UIDs: the PACS keeps one of each, never a duplicate.

An input that is not DICOM (PNG, JPEG...) gets no SR: it is counted, and the report says so.
A store the PACS refuses makes that row an error (`store_refused`, with the PACS's answer),
which the next run scores and stores again (`ledger.RETRIED_CODES`); the run goes on.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from xray_ray import __version__
from xray_ray.config_services import ScoreConfig
from xray_ray.files import atomic_write_bytes
from xray_ray.images.dicom_results import Answer, heatmap_capture, structured_report, to_bytes
from xray_ray.images.overlay import overlay
from xray_ray.scoring.dicomweb import PacsClient, PacsError
from xray_ray.scoring.ledger import STORE_REFUSED

log = logging.getLogger(__name__)


def answer_of(row) -> Answer:
    """The classifier's answer a prediction row holds, as the DICOM result writers take it."""
    from xray_ray.scoring.pipeline import PROBABILITY_COLUMNS

    ood = row["ood_score"]
    return Answer(predicted_label=row["predicted_label"],
                  probabilities={name: float(row[column]) for name, column in PROBABILITY_COLUMNS.items()},
                  ood_score=float(ood) if np.isfinite(ood) else float("nan"),
                  out_of_distribution=bool(row["out_of_distribution"]), model_version=row["model_version"])


class DicomResults:
    """Writes and stores the DICOM results of a run's rows as they arrive; `counts` feeds the report."""

    def __init__(self, options: ScoreConfig, pacs: PacsClient | None) -> None:
        self.sr_out = Path(options.sr_out) if options.sr_out else None
        self.pacs = pacs if options.pacs_store else None
        self.heatmaps = options.sr_heatmaps
        self.model = options.model
        self.counts: Counter = Counter()
        self.seconds = 0.0
        self._classifier = None

    @property
    def active(self) -> bool:
        """True when the run writes or stores DICOM results at all."""
        return bool(self.sr_out or self.pacs)

    def add(self, batch: pd.DataFrame) -> pd.DataFrame:
        """Write (and store) the results of `batch`'s answered DICOM rows; returns the batch, with the rows whose
        store the PACS refused turned into `store_refused` errors."""
        if not self.active:
            return batch
        started = time.perf_counter()
        answered = batch["status"] == "ok"
        dicom = answered & batch["dicom_header"].fillna("").astype(bool)
        self.counts["not_dicom"] += int((answered & ~dicom).sum())
        rows = batch[dicom]
        heat = self._heat_maps(rows) if self.heatmaps and len(rows) else {}
        for index, row in rows.iterrows():
            failure = self._write(row, heat.get(index))
            if failure:
                batch.loc[index, ["status", "error_code", "error_reason"]] = ["error", STORE_REFUSED, failure]
        self.seconds += time.perf_counter() - started
        return batch

    def _write(self, row, heat: np.ndarray | None) -> str:
        """The results of one row: written to `sr_out`, stored in the PACS; returns why the store failed, or ''."""
        answer = answer_of(row)
        report = structured_report(row["dicom_header"], answer, __version__)
        objects = [report]
        if heat is not None:
            objects.append(heatmap_capture(row["dicom_header"], heat, answer, __version__))
        encoded = [to_bytes(item) for item in objects]
        if self.sr_out:
            for item, data in zip(objects, encoded):
                atomic_write_bytes(self.sr_out / item.StudyInstanceUID / f"{item.SOPInstanceUID}.dcm", data)
            self.counts["sr_written"] += 1
            self.counts["sc_written"] += len(objects) - 1
        if self.pacs:
            try:
                self.pacs.store(encoded)
            except PacsError as err:
                self.counts["store_refused"] += 1
                log.warning("the PACS refused the results of %s: %s", row["path"], err)
                return f"the PACS refused the results: {err}"
            self.counts["sr_stored"] += 1
            self.counts["sc_stored"] += len(objects) - 1
        return ""

    def _heat_maps(self, rows: pd.DataFrame) -> dict:
        """Grad-CAM overlays (RGB uint8, at the model's input size) of the rows in distribution, by row index."""
        from xray_ray.model_folder.gradcam import explain
        from xray_ray.scoring.pipeline import unpack

        shown = rows[~rows["out_of_distribution"].astype(bool)]
        if not len(shown):
            return {}
        if self._classifier is None:
            from xray_ray.model_folder.classifier import Classifier

            self._classifier = Classifier(self.model)
        planes = np.stack(shown["pixels"].to_list())
        result = explain(self._classifier, unpack(planes), list(shown["predicted_label"]))
        self.counts["sc_skipped_out_of_distribution"] += len(rows) - len(shown)
        return {index: overlay(plane, heat) for index, plane, heat in zip(shown.index, planes, result.heatmaps)}

    def summary(self) -> dict:
        """What the report says about the run's DICOM results (counts, and the seconds they cost)."""
        return {**{key: int(value) for key, value in sorted(self.counts.items())},
                "seconds": round(self.seconds, 3), "sr_out": str(self.sr_out) if self.sr_out else None,
                "stored_to_pacs": bool(self.pacs)}
