"""A run's DICOM results, row by row: an SR per answered DICOM row, none for PNG rows, and a store the PACS refuses
becomes that row's `store_refused` error, which the ledger has the next run try again. Fast: no Ray, no PACS."""

from __future__ import annotations

import numpy as np
import pandas as pd

from tests.dicom_instances import dx_instance
from xray_ray.config import CLASS_NAMES
from xray_ray.config_services import ScoreConfig
from xray_ray.images.dicom_results import read_answer, source_header
from xray_ray.scoring.dicom_out import DicomResults
from xray_ray.scoring.dicomweb import PacsError
from xray_ray.scoring.ledger import STORE_REFUSED, is_retried
from xray_ray.scoring.pipeline import PROBABILITY_COLUMNS


class RefusingPacs:
    """Stands in for `dicomweb.PacsClient`: refuses the second store it is sent, keeps the others."""

    def __init__(self) -> None:
        self.stored: list[list[bytes]] = []

    def store(self, datasets_bytes: list[bytes]) -> list[str]:
        if len(self.stored) == 1:
            self.stored.append([])
            raise PacsError("STOW-RS: HTTP 409 Conflict", "store_refused")
        self.stored.append(datasets_bytes)
        return []


def rows(headers: list[str]) -> pd.DataFrame:
    frame = pd.DataFrame({"path": [f"/archive/{i}" for i in range(len(headers))], "status": "ok", "error_code": "",
                          "error_reason": "", "dicom_header": headers, "predicted_label": CLASS_NAMES[0],
                          "ood_score": 0.2, "out_of_distribution": False, "model_version": "v1"})
    for name, column in PROBABILITY_COLUMNS.items():
        frame[column] = 0.7 if name == CLASS_NAMES[0] else 0.1
    return frame


def test_each_answered_dicom_row_gets_its_sr_and_a_refused_store_is_that_rows_retried_error(tmp_path):
    headers = [source_header(dx_instance(f"1.2.3.{i}", f"1.2.4.{i}", f"1.2.5.{i}", "20261201", "PA", seed=i))
               for i in range(3)]
    pacs = RefusingPacs()
    results = DicomResults(ScoreConfig(pacs="https://pacs/dicom-web", study_date="20261201", pacs_store=True,
                                       sr_out=str(tmp_path)), pacs)
    batch = results.add(rows([*headers, ""]))  # three DICOM rows, then a PNG row (no header)
    assert list(batch["status"]) == ["ok", "error", "ok", "ok"]
    assert batch.loc[1, "error_code"] == STORE_REFUSED and "409" in batch.loc[1, "error_reason"]
    assert is_retried(STORE_REFUSED)
    assert {key: results.counts[key] for key in ("sr_written", "sr_stored", "store_refused", "not_dicom")} == {
        "sr_written": 3, "sr_stored": 2, "store_refused": 1, "not_dicom": 1}
    sent = [read_answer(objects[0])["source_sop_instance_uid"] for objects in pacs.stored if objects]
    assert sent == ["1.2.5.0", "1.2.5.2"]
    written = sorted(tmp_path.rglob("*.dcm"))
    assert len(written) == 3 and all(read_answer(p.read_bytes())["predicted_label"] == CLASS_NAMES[0] for p in written)
    assert np.isclose(read_answer(written[0].read_bytes())["probabilities"][CLASS_NAMES[0]], 0.7)
