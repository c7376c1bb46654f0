"""Has tonight's archive changed? The run's class mix and out-of-distribution rate against two baselines.

* the model card: the class mix of the images the model was trained and evaluated on
  (`split_counts`, before undersampling) and the share of its held-out test images the
  out-of-distribution check flagged;
* the last `RECENT_RUNS` runs in the same output folder, read from their `summary.json`
  (pooled: their counts added up).

The class mix compared is the mix of the model's answers on in-distribution images, the
only mix a run without labels has. A shift is flagged only when it is both large and more
than chance: the class mix when the total variation distance (half the summed absolute
difference of the shares, i.e. the share of images that would have to change class to
match) reaches `MIX_SHIFT` and a chi-square goodness-of-fit test gives p < `P_VALUE`; the
out-of-distribution rate when it exceeds the baseline's by `OOD_RISE` or more and a
one-sided binomial test gives p < `P_VALUE`. Small runs therefore never raise a flag on
noise alone, and a baseline with no images gives no verdict. `write_drift` draws the trend
chart into a run's report folder and `drift_section` is the report page's section.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from scipy import stats

from xray_ray.config import CLASS_NAMES
from xray_ray.reports.figures import plot_drift_trend
from xray_ray.reports.html import Image, Section, Table, Text

log = logging.getLogger(__name__)

RECENT_RUNS = 7
MIX_SHIFT = 0.15
OOD_RISE = 0.05
P_VALUE = 0.01
SUMMARY_PATH = Path("report") / "summary.json"
DRIFT_PNG = "drift_trend.png"


def recent_runs(out: Path, this_run: str, limit: int = RECENT_RUNS) -> list[dict]:
    """Summaries of the `limit` latest other complete runs under `out`, oldest first (damaged ones skipped)."""
    found = []
    for path in Path(out).glob(f"*/{SUMMARY_PATH}"):
        if path.parents[1].name == this_run:
            continue
        try:
            summary = json.loads(path.read_text())
            found.append((str(summary["started_at"]), summary["run"], summary))
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("%s cannot be read; it is left out of the drift baseline", path)
    return [summary for _, _, summary in sorted(found, key=lambda entry: entry[:2])[-limit:]]  # never by dict


def _mix_test(counts: np.ndarray, reference: np.ndarray) -> dict:
    """Total variation distance and chi-square p-value of `counts` against `reference` counts' shares."""
    shares, expected = counts / counts.sum(), reference / reference.sum()
    distance = 0.5 * float(np.abs(shares - expected).sum())
    present = expected > 0
    if (counts[~present] > 0).any():  # a class the baseline never saw: as far from it as can be
        p_value = 0.0
    else:
        p_value = float(stats.chisquare(counts[present], expected[present] * counts.sum()).pvalue)
    flagged = distance >= MIX_SHIFT and p_value < P_VALUE
    return {"distance": round(distance, 4), "p_value": p_value, "flagged": bool(flagged)}


def _rate_test(flagged: int, images: int, reference: float) -> dict:
    """Tonight's out-of-distribution rate against `reference`: the rise and a one-sided binomial p-value."""
    rate = flagged / images
    p_value = float(stats.binomtest(flagged, images, min(max(reference, 1e-6), 1.0), alternative="greater").pvalue)
    return {"rate": round(rate, 4), "baseline_rate": round(reference, 4), "rise": round(rate - reference, 4),
            "p_value": p_value, "flagged": bool(rate - reference >= OOD_RISE and p_value < P_VALUE)}


def compare(summary: dict, baseline: dict, recent: list[dict]) -> dict:
    """The drift section of a run's summary: each comparison's measure, threshold and verdict."""
    counts = np.array([summary["per_class"].get(name, 0) for name in CLASS_NAMES], dtype=float)
    scored = int(summary["scored"])
    pooled = np.array([sum(run.get("per_class", {}).get(name, 0) for run in recent) for name in CLASS_NAMES], float)
    recent_scored = sum(int(run.get("scored", 0)) for run in recent)
    recent_flagged = sum(int(run.get("out_of_distribution", 0)) for run in recent)
    references = {"model card": (np.array([baseline["class_counts"].get(name, 0) for name in CLASS_NAMES], float),
                                 baseline.get("ood_rate"))}
    if recent:  # the first run in an output folder has no earlier runs to compare with
        references[f"last {len(recent)} runs"] = (pooled, recent_flagged / recent_scored if recent_scored else None)
    comparisons = []
    for against, (reference_counts, reference_rate) in references.items():
        row = {"against": against}
        if counts.sum() and reference_counts.sum():
            row["class_mix"] = {"shares": dict(zip(CLASS_NAMES, np.round(counts / counts.sum(), 4).tolist())),
                                "baseline_shares": dict(zip(CLASS_NAMES, np.round(reference_counts /
                                                                                  reference_counts.sum(), 4).tolist())),
                                **_mix_test(counts, reference_counts)}
        if scored and reference_rate is not None:
            row["out_of_distribution"] = _rate_test(int(summary["out_of_distribution"]), scored, reference_rate)
        comparisons.append(row)
    flags = [f"{kind.replace('_', ' ')} against the {row['against']}" for row in comparisons
             for kind in ("class_mix", "out_of_distribution") if row.get(kind, {}).get("flagged")]
    trend = [{"run": run["run"], "scored": int(run.get("scored", 0)),
              "per_class": {name: int(run.get("per_class", {}).get(name, 0)) for name in CLASS_NAMES},
              "out_of_distribution": int(run.get("out_of_distribution", 0))} for run in [*recent, summary]]
    return {"thresholds": {"class_mix_distance": MIX_SHIFT, "ood_rate_rise": OOD_RISE, "p_value": P_VALUE},
            "comparisons": comparisons, "flags": flags, "shifted": bool(flags), "trend": trend}


def write_drift(report: Path, summary: dict, baseline: dict) -> dict:
    """Compare this run with the card and the last runs under the same output folder; draw the trend."""
    found = compare(summary, {"class_counts": {}, **baseline}, recent_runs(report.parents[1], summary["run"]))
    card = next(row for row in found["comparisons"] if row["against"] == "model card")
    plot_drift_trend(report / DRIFT_PNG, found["trend"], list(CLASS_NAMES),
                     card.get("class_mix", {}).get("baseline_shares", {}), baseline.get("ood_rate"),
                     "This run against the model card and the runs before it")
    return found


def _drift_rows(found: dict) -> list[dict]:
    """One table row per comparison made: what was compared, tonight against the baseline, the verdict."""
    rows = []
    for row in found["comparisons"]:
        if "class_mix" in row:
            mix = row["class_mix"]
            rows.append({"Against": row["against"], "Compared": "class mix",
                         "This run": ", ".join(f"{k} {v:.0%}" for k, v in mix["shares"].items()),
                         "Baseline": ", ".join(f"{k} {v:.0%}" for k, v in mix["baseline_shares"].items()),
                         "Shift": f"{mix['distance']:.1%} of answers", "p-value": f"{mix['p_value']:.3g}",
                         "Flagged": "YES" if mix["flagged"] else "no"})
        if "out_of_distribution" in row:
            ood = row["out_of_distribution"]
            rows.append({"Against": row["against"], "Compared": "out-of-distribution rate",
                         "This run": f"{ood['rate']:.1%}", "Baseline": f"{ood['baseline_rate']:.1%}",
                         "Shift": f"{ood['rise']:+.1%}", "p-value": f"{ood['p_value']:.3g}",
                         "Flagged": "YES" if ood["flagged"] else "no"})
    return rows


def drift_section(found: dict) -> Section:
    """The report page's drift section: the verdict, the comparisons, what the thresholds mean, the trend."""
    limits = found["thresholds"]
    verdict = ("The archive has changed: " + "; ".join(found["flags"]) + ". Check what is new in it (another "
               "scanner, ward or protocol, a new source of files) before trusting tonight's counts."
               if found["shifted"] else "No shift beyond the thresholds below.")
    rows = _drift_rows(found)
    return Section("Has the archive changed? (drift)", [
        Text(verdict),
        Table(rows) if rows else Text("Nothing to compare yet: no scored images, or no baseline."),
        Text(f"Tonight's mix of answers (in-distribution images) and out-of-distribution rate are compared with "
             f"the images the model was trained and tested on (its model card) and with the last runs in this "
             f"output folder (up to {RECENT_RUNS}, pooled). The class mix is flagged when at least "
             f"{limits['class_mix_distance']:.0%} of answers would have to change class to match the baseline; the "
             f"out-of-distribution rate when it is {100 * limits['ood_rate_rise']:.0f} percentage points or more above "
             f"baseline's. Either is flagged only when chance is an unlikely explanation (p-value below "
             f"{limits['p_value']}), so a small run does not raise a flag on noise. A shift in answers can be a "
             "change in the patients or in the images; it is a reason to look, not a finding."),
        Image(DRIFT_PNG, "Class mix and out-of-distribution rate per run, with the baseline",
              "Left: the share of answers per class, for the model card's images and each run (tonight last). "
              "Right: the share of images flagged out of distribution per run; the dashed line is the model "
              "card's rate on its held-out test images."),
    ])
