"""The report of one scoring run, written to `<run>/report/` for a clinician-facing reviewer.

Counts per predicted class, a confidence histogram per class, the images to review (the
model was unsure, or each class's most confident answers, for spot checks), the files
that could not be read and why, one CSV per class, and, when the true classes are known
(class folders or a labels CSV), accuracy, per-class figures and a confusion matrix. All
of it is in `summary.json` and on one `index.html` that explains each number in plain words.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import pandas as pd

from xray_ray.config import CLASS_NAMES
from xray_ray.images.synth import SYNTHETIC_NOTE
from xray_ray.reports.figures import plot_confusion_matrix, plot_histograms
from xray_ray.reports.html import Image, KeyValues, Links, Metrics, Section, Table, Text, write_html
from xray_ray.reports.metrics import evaluate
from xray_ray.reports.tables import (
    class_rows,
    write_classification_report,
    write_csv,
    write_json,
)
from xray_ray.scoring import drift
from xray_ray.scoring.archive import class_folder_label, is_synthetic
from xray_ray.scoring.explain import gallery_blocks, write_explanations
from xray_ray.scoring.pipeline import PROBABILITY_COLUMNS
from xray_ray.scoring.report_dicom import dicom_section, dicom_summary

FLAGGED_CSV = "out_of_distribution.csv"

CLASS_CSV = {name: f"files_{name.replace(' ', '_')}.csv" for name in CLASS_NAMES}


def _root_of(path: str, roots: list[Path]) -> Path | None:
    return next((root for root in roots if path.startswith(str(root) + os.sep)), None)


def display_path(path: str, roots: list[Path]) -> str:
    """`<archive folder name>/<path inside it>`: short, and still unambiguous across archives."""
    root = _root_of(path, roots)
    return path if root is None else f"{root.name}/{os.path.relpath(path, root)}"


def true_labels(paths: pd.Series, roots: list[Path], labels: dict[str, str] | None) -> pd.Series:
    """The known class of each path (from `labels`, else its class folder), None where unknown."""
    if labels is not None:
        return paths.map(lambda p: labels.get(os.path.abspath(p)))
    return paths.map(lambda p: class_folder_label(p, str(root)) if (root := _root_of(p, roots)) else None)


def _listing(frame: pd.DataFrame, roots: list[Path]) -> pd.DataFrame:
    """Rows as a reviewer reads them: file, answer, confidence, then each class's probability."""
    shown = pd.DataFrame({"file": [display_path(p, roots) for p in frame["path"]],
                          "predicted class": frame["predicted_label"], "confidence": frame["confidence"].round(3)})
    for name, column in PROBABILITY_COLUMNS.items():
        shown[f"P({name})"] = frame[column].round(3)
    return shown.assign(path=frame["path"].to_numpy(), sha256=frame["sha256"].to_numpy())


def write_report(folder: str | Path, predictions: pd.DataFrame, state: dict, roots: list[Path],
                 labels: dict[str, str] | None, threshold: float, top_n: int, explain: int = 0,
                 model: str | None = None, engine: str = "auto") -> dict:
    """Write `<folder>/report/` for the run's rows; returns the summary (also summary.json).

    With `explain` > 0 and the run's `model` folder, up to `explain` review images get a heat map (scoring.explain).
    """
    report = Path(folder) / "report"
    rows = _sort_rows(predictions)
    flagged_rows, review_rows, error_rows = _write_lists(report, rows, roots, threshold, top_n)
    explained, explain_note = write_explanations(report, review_rows, model, state["model_version"], engine, explain)
    counts = _write_counts(report, rows.ok, threshold)
    evaluation, flagged_known = _write_evaluation(report, rows, roots, labels)
    summary = {**_run_summary(state, rows, roots, counts, threshold, top_n), **dicom_summary(state, predictions),
               "out_of_distribution_with_known_class": flagged_known,
               "explanations": {"limit": explain, "shown": len(explained), "note": explain_note},
               "ground_truth": None if evaluation is None else {
                   "source": "labels CSV" if labels is not None else "class folders", **evaluation.as_dict()}}
    summary["drift"] = drift.write_drift(report, summary, state.get("baseline") or {})
    write_json(report / "summary.json", summary)
    _write_page(report, summary, counts, review_rows, error_rows, evaluation, flagged_rows,
                gallery_blocks(explained, explain_note))
    return summary


class _Rows(NamedTuple):
    """A run's rows with their `confidence`: all; errors (not scored); scored in distribution (ok) or not (flagged)."""
    all: pd.DataFrame
    errors: pd.DataFrame
    ok: pd.DataFrame
    flagged: pd.DataFrame


def _sort_rows(predictions: pd.DataFrame) -> _Rows:
    """Confidence is a row's highest probability; rows written before the flag existed count as not flagged."""
    probabilities = predictions[list(PROBABILITY_COLUMNS.values())].astype(float)  # typed even with no rows
    frame = predictions.assign(confidence=probabilities.max(axis=1))
    frame = frame if "out_of_distribution" in frame else frame.assign(ood_score=float("nan"), out_of_distribution=False)
    scored, errors = frame[frame["status"] == "ok"], frame[frame["status"] == "error"]
    flag = scored["out_of_distribution"].fillna(False).astype(bool)
    return _Rows(frame, errors, scored[~flag], scored[flag])


def review_list(ok: pd.DataFrame, roots: list[Path], threshold: float, top_n: int) -> pd.DataFrame:
    """Answers under `threshold` (least sure first), then each class's `top_n` most confident, as a reviewer
    reads them, each row first saying why it is there."""
    unsure = ok[ok["confidence"] < threshold].sort_values("confidence").assign(why="low confidence")
    confident = [ok[(ok["predicted_label"] == name) & (ok["confidence"] >= threshold)].nlargest(top_n, "confidence")
                 .assign(why=f"most confident {name}") for name in CLASS_NAMES]
    review = pd.concat([unsure, *confident])
    rows = _listing(review, roots).assign(why=review["why"].to_numpy())
    return rows[["why", *rows.columns[:-1]]]


def flagged_listing(flagged: pd.DataFrame, roots: list[Path]) -> pd.DataFrame:
    """Flagged files, most unusual first: file, OOD score, and the class the model would have given."""
    rows = _listing(flagged, roots).assign(ood_score=flagged["ood_score"].round(3).to_numpy())
    rows = rows[["file", "ood_score", *[c for c in rows.columns if c not in ("file", "ood_score")]]]
    return rows.sort_values("ood_score", ascending=False)


def _write_lists(report: Path, rows: _Rows, roots: list[Path], threshold: float, top_n: int) -> tuple:
    """The CSVs to download: one per predicted class (most confident first), then the flagged files, the images to
    review and the files that could not be read, whose tables it returns."""
    listing = _listing(rows.ok, roots)
    for name, file in CLASS_CSV.items():
        write_csv(report / file, listing[rows.ok["predicted_label"].to_numpy() == name]
                  .sort_values("confidence", ascending=False))
    flagged_rows, review_rows = flagged_listing(rows.flagged, roots), review_list(rows.ok, roots, threshold, top_n)
    errors = rows.errors
    error_rows = pd.DataFrame({"file": [display_path(p, roots) for p in errors["path"]], "code": errors["error_code"],
                               "reason": errors["error_reason"], "path": errors["path"]})
    for file, table in ((FLAGGED_CSV, flagged_rows), ("review.csv", review_rows), ("errors.csv", error_rows)):
        write_csv(report / file, table)
    return flagged_rows, review_rows, error_rows


def _write_counts(report: Path, ok: pd.DataFrame, threshold: float) -> list[dict]:
    """counts.csv (images, share, median confidence, how many unsure) and the confidence histograms, per class."""
    counts = []
    for name in CLASS_NAMES:
        mine = ok[ok["predicted_label"] == name]
        counts.append({"Predicted class": name, "Images": len(mine),
                       "Share": f"{len(mine) / len(ok):.1%}" if len(ok) else "–",
                       "Median confidence": f"{mine['confidence'].median():.2f}" if len(mine) else "–",
                       f"Below {threshold:.2f}": int((mine["confidence"] < threshold).sum())})
    write_csv(report / "counts.csv", counts)
    plot_histograms(report / "confidence_by_class.png",
                    {name: ok.loc[ok["predicted_label"] == name, "confidence"].tolist() for name in CLASS_NAMES},
                    "How sure the model was, by predicted class", "confidence")
    return counts


def _write_evaluation(report: Path, rows: _Rows, roots: list[Path], labels: dict[str, str] | None) -> tuple:
    """What the known true classes say: the evaluation of the in-distribution rows (None: no class known), with its
    classification report and confusion matrix, and how many flagged rows the model's class got right."""
    flagged_truth = true_labels(rows.flagged["path"], roots, labels).dropna()
    flagged_right = (flagged_truth == rows.flagged.loc[flagged_truth.index, "predicted_label"]).sum()
    flagged_known = {"images": len(flagged_truth), "correct": int(flagged_right)}
    truth = true_labels(rows.ok["path"], roots, labels)
    known = truth.notna()
    if not known.any():
        return None, flagged_known
    evaluation = evaluate(truth[known].tolist(), rows.ok.loc[known, list(PROBABILITY_COLUMNS.values())].to_numpy())
    write_classification_report(report, evaluation)
    plot_confusion_matrix(report / "confusion_matrix.png", evaluation.confusion, evaluation.class_names,
                          f"True against predicted class ({evaluation.n} images)")
    return evaluation, flagged_known


def _run_summary(state: dict, rows: _Rows, roots: list[Path], counts: list[dict], threshold: float, top_n: int):
    """The summary's run and model, what it found, scored, flagged and could not read, and its answers per class."""
    return {"run": state["run"], "model_version": state["model_version"],
            "engines": sorted(rows.all["engine"].dropna().unique().tolist()) or [state["engine"]],
            "archives": state["archives"], "synthetic_data": is_synthetic(roots), "started_at": state["started_at"],
            "finished_at": state.get("finished_at"), "files": len(rows.all), "scored": len(rows.ok) + len(rows.flagged),
            "errors": len(rows.errors), "out_of_distribution": len(rows.flagged), "in_distribution": len(rows.ok),
            "found_this_time": state.get("found"), "scored_this_time": state.get("scored_now"),
            "skipped_already_scored": state.get("skipped_already_scored"),
            "per_class": {row["Predicted class"]: row["Images"] for row in counts}, "review_threshold": threshold,
            "below_threshold": int((rows.ok["confidence"] < threshold).sum()), "top_n": top_n,
            "error_codes": {str(k): int(v) for k, v in rows.errors["error_code"].value_counts().sort_index().items()},
            "error_reasons": {str(k): int(v) for k, v in rows.errors["error_reason"].value_counts().items()}}


def _accuracy_section(evaluation, source: str) -> Section:
    return Section("How often the model was right (images whose true class is known)", [
        Metrics({"Accuracy": f"{evaluation.accuracy:.1%}", "Images with a known class": evaluation.n}),
        Text(f"The true class comes from {source}. Accuracy is the share of these images the model put in "
             "their true class."),
        Table(class_rows(evaluation)),
        Text("Recall (sensitivity): of the images truly in a class, the share the model found. Precision: of the "
             "images the model put in a class, the share that truly belong there. F1 combines both (1.00 is perfect)."),
        Image("confusion_matrix.png", "Confusion matrix of true against predicted classes",
              "Rows are the true class, columns the model's answer; the diagonal holds the correct answers."),
    ])


def _review_blocks(review_rows: pd.DataFrame, threshold: float, top_n: int) -> list:
    """Two short tables (file, answer, confidence): the least sure answers, then each class's most confident."""
    shown = review_rows[["file", "predicted class", "confidence"]]
    unsure = review_rows["why"] == "low confidence"
    return [
        Text(f"Least sure: the images where the model's confidence was below {threshold:.2f}, least sure first. "
             "These are the answers to check first."),
        Table(shown[unsure], max_rows=25, full_file="review.csv") if unsure.any() else Text("None."),
        Text(f"Most sure: the {top_n} most confident images of each predicted class, for spot checks. The CSV "
             "also gives the probability the model gave every class."),
        Table(shown[~unsure], max_rows=4 * top_n, full_file="review.csv") if (~unsure).any() else Text("None."),
    ]


def _flagged_section(flagged_rows: pd.DataFrame, known: dict) -> Section:
    return Section("Not like the training images (out of distribution): check these first", [
        Text("The model's out-of-distribution check says these images are unlike the chest X-rays it was trained "
             "on: perhaps not a frontal chest film at all (a lateral view, another body part, a scanned form, a "
             "photograph, a blank image), or a chest film from an unusual source. Their class is shown but should "
             "not be trusted; they are left out of every count, figure and accuracy below. Most unusual first."),
        Table(flagged_rows[["file", "ood_score", "predicted class", "confidence"]], max_rows=50,
              full_file=FLAGGED_CSV) if len(flagged_rows) else Text("None: every scored image passed the check."),
        *([Text(f"Of the {known['images']} flagged images whose true class is known, the model's class was right "
                f"for {known['correct']}; this is not part of the accuracy below.")] if known["images"] else []),
    ])


def _write_page(report: Path, summary: dict, counts: list[dict], review_rows: pd.DataFrame,
                error_rows: pd.DataFrame, evaluation, flagged_rows: pd.DataFrame, heat_maps: list) -> Path:
    """index.html: every figure of the summary, each explained in plain words."""
    threshold, top_n = summary["review_threshold"], summary["top_n"]
    notes = ["The model's answers help decide which images to look at first; they are not a diagnosis."]
    if summary["synthetic_data"]:
        notes.insert(0, f"Synthetic data: these images are {SYNTHETIC_NOTE}. The numbers only show that the "
                        "scoring works end to end and say nothing about real patients.")
    skipped = summary["skipped_already_scored"] or 0
    sections = [
        Section("Summary", [
            Metrics({"Images scored": summary["scored"], "Out of distribution": summary["out_of_distribution"],
                     "Could not be read": summary["errors"],
                     f"Unsure (confidence below {threshold:.2f})": summary["below_threshold"],
                     "Drift": "shift flagged" if summary["drift"]["shifted"] else "none flagged",
                     **({"Accuracy (known classes)": f"{evaluation.accuracy:.1%}"} if evaluation else {})}),
            Text(f"The model {summary['model_version']} (engine: {', '.join(summary['engines'])}) gave an answer "
                 f"for {summary['scored']} images of this run; {summary['errors']} files could not be read and "
                 "are listed below with the reason."
                 + (f" {skipped} files had already been scored by this model version in an earlier run and were "
                    "not scored again." if skipped else "")),
        ]),
        _flagged_section(flagged_rows, summary["out_of_distribution_with_known_class"]),
        *filter(None, [dicom_section(summary)]),
        Section("What the model found", [
            Table(counts),
            Text("Each image is put in the class the model finds most likely (images flagged out of distribution "
                 "are not counted here). Confidence is the calibrated probability of that class: on held-out images "
                 "like the training data, answers given with confidence 0.8 were right about 80 % of the time. It "
                 "is measured on the model's validation images, so it holds only for images like them."),
        ]),
        drift.drift_section(summary["drift"]),
        Section("How sure the model was", [
            Image("confidence_by_class.png", "Histograms of the model's confidence, one per predicted class",
                  "Each panel counts the images put in one class by how confident the model was; bars on the "
                  "left are answers to check more carefully."),
        ]),
        Section("Images to review", _review_blocks(review_rows, threshold, top_n)),
        Section("Where the model looked (heat maps of images to review)", heat_maps),
    ]
    if evaluation is not None:
        source = summary["ground_truth"]["source"]
        sections.append(_accuracy_section(evaluation, "the folder each image is in" if source == "class folders"
                                          else "the labels file given to the run"))
    sections += [
        Section("Files that could not be read", [
            Text("These files were not scored; the code says what kind of problem it is, the reason what is "
                 "wrong with each file. They did not stop the run. Files whose problem may pass (the model failed, "
                 "the file was being written or could not be opened) are tried again by the next run."),
            *([Table([{"Code": code, "Files": n} for code, n in summary["error_codes"].items()])]
              if summary["error_codes"] else []),
            Table(error_rows.drop(columns=["path"]), max_rows=100, full_file="errors.csv")
            if len(error_rows) else Text("None: every file was readable."),
        ]),
        Section("Lists to download", [Links({
            **{f"Images predicted {name} (CSV)": file for name, file in CLASS_CSV.items()},
            "Images to review (CSV)": "review.csv", "Out-of-distribution images (CSV)": FLAGGED_CSV,
            "Files that could not be read (CSV)": "errors.csv",
            "Counts per class (CSV)": "counts.csv", "Everything above, for programs (JSON)": "summary.json"})]),
        Section("About this run", [KeyValues({
            "Run": summary["run"], "Model version": summary["model_version"],
            "Engine": ", ".join(summary["engines"]), "Archive folders": summary["archives"],
            "Started": summary["started_at"], "Finished": summary["finished_at"],
            "Files found this time": summary["found_this_time"],
            "Scored this time": summary["scored_this_time"], "Skipped (already scored)": skipped,
            "Review threshold": threshold, "Most confident listed per class": top_n,
            "All predictions (Parquet)": "../predictions/"})]),
    ]
    return write_html(report / "index.html", f"X-ray archive scoring: run {summary['run']}", sections, notes)
