"""Data files of every report: strictly valid JSON, CSV, and the classification report in three forms.

Written atomically (`xray_ray.files`), so a crashed job never leaves a half-written file.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd

from xray_ray.files import atomic_write_text
from xray_ray.reports.metrics import Evaluation


def _jsonable(obj: Any) -> Any:
    """Plain JSON types: numpy values become Python ones, Paths strings, NaN/inf null."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, np.ndarray)):
        return [_jsonable(v) for v in (sorted(obj) if isinstance(obj, set) else obj)]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return str(obj) if isinstance(obj, Path) else obj


def write_json(path: str | Path, obj: Any) -> Path:
    """Write `obj` as indented, strictly valid JSON."""
    atomic_write_text(path, json.dumps(_jsonable(obj), indent=2, allow_nan=False) + "\n")
    return Path(path)


def frame_of(frame_or_rows: pd.DataFrame | Iterable[Mapping]) -> pd.DataFrame:
    """A DataFrame whose index is kept (as columns) only if it is named."""
    frame = frame_or_rows if isinstance(frame_or_rows, pd.DataFrame) else pd.DataFrame(list(frame_or_rows))
    named = any(name is not None for name in frame.index.names)
    return frame.reset_index() if named else frame.reset_index(drop=True)


def write_csv(path: str | Path, frame_or_rows: pd.DataFrame | Iterable[Mapping]) -> Path:
    """Write a DataFrame or a list of dicts as CSV (an unnamed index is not written)."""
    atomic_write_text(path, frame_of(frame_or_rows).to_csv(index=False))
    return Path(path)


def write_classification_report(folder: str | Path, evaluation: Evaluation) -> dict[str, Path]:
    """Write classification_report.txt, .csv (per class + averages) and .json (as_dict)."""
    folder = Path(folder)
    paths = {ext: folder / f"classification_report.{ext}" for ext in ("txt", "csv", "json")}
    atomic_write_text(paths["txt"], evaluation.report_text())
    write_csv(paths["csv"], evaluation.report_rows())
    write_json(paths["json"], evaluation.as_dict())
    return paths


def class_rows(evaluation: Evaluation) -> list[dict]:
    """Per-class rows in plain words; a rate with nothing to count shows as a dash."""
    cm = evaluation.confusion
    rows = []
    for i, name in enumerate(evaluation.class_names):
        entry, total, predicted = evaluation.report[name], int(cm[i].sum()), int(cm[:, i].sum())
        rows.append({
            "Class": name, "Images": total, "Correct": int(cm[i, i]), "Missed": total - int(cm[i, i]),
            "Recall (sensitivity)": f"{entry['recall']:.1%}" if total else "–",
            "Precision": f"{entry['precision']:.1%}" if predicted else "–",
            "F1 score": f"{entry['f1-score']:.2f}" if total or predicted else "–",
        })
    return rows
