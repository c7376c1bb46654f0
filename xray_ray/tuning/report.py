"""The experiment's report page: the winner, every trial, validation curves, importances, links."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from xray_ray.config import Config
from xray_ray.config_training import SEARCHED, TuneConfig
from xray_ray.images.synth import SYNTHETIC_NOTE
from xray_ray.reports.html import Image, KeyValues, Links, Metrics, Section, Table, Text, write_html

SUMMARY_FILE = "summary.json"


def write_report(folder: Path, table: pd.DataFrame, summary: dict, settings: TuneConfig, config: Config,
                 ranked: pd.DataFrame | None, importance_note: str, card: dict) -> Path:
    """index.html of the experiment: the winner, every trial, curves, importances, links."""
    score = settings.score
    shown = table[["trial", "trial_id", *SEARCHED.values(), score, "best_epoch", "epochs_run", "stop_reason", "node_id",
                   "gpu_ids", "seconds"]].copy()
    shown["node_id"] = shown["node_id"].astype(str).str[:12]
    shown["seconds"] = shown["seconds"].round(1)
    test = card["metrics"]["test"]
    sections = [
        Section("Summary", [
            Metrics({f"Best {settings.metric} (valid)": f"{summary['best_score']:.4g}",
                             "Test accuracy of the exported model": f"{test['accuracy']:.1%}",
                             "Trials": len(table), "Epochs saved by ASHA": summary["epochs_saved_by_asha"]}),
            Text(f"Trials are ranked by {score}: {settings.metric} of the weights each trial keeps "
                         "(the LRA's best epoch), which is the model that would be exported."),
        ]),
        Section("Best trial", [KeyValues({
            "trial": f"{summary['best_trial_number']} (id {summary['best_trial']})", **summary["best_params"],
            "model folder": summary["model"], "model version": summary["model_version"], "test images": test["n"]})]),
        Section("Trials", [Table(shown, max_rows=200, full_file="trials.csv"),
                                   Text("stop_reason: stop_patience (LRA stopped), max_epochs, asha (stopped "
                                                "early by the scheduler) or error. node_id and gpu_ids: where the trial ran.")]),
        Section("Validation curves", [Image("validation_curves.png", "Validation metric per epoch, one "
                                                             "line per trial", f"{settings.metric} after each epoch.")]),
        Section("Parameter importances", [Table(ranked), Text(importance_note)]
                        if ranked is not None else [Text(importance_note)]),
        Section("Experiment", [KeyValues({
            "storage": summary["storage_path"], "search": f"Optuna TPE (seed {settings.seed})",
            "scheduler": settings.scheduler, "per trial": f"{settings.cpus_per_trial} CPU, {settings.gpus_per_trial} GPU",
            "max concurrent trials": settings.max_concurrent_trials or "as resources allow",
            "max epochs": config.lra.epochs, "errors": len(summary["errors"])})]),
        Section("Files", [Links({
            "Test report of the best model": "best_model/index.html", "Trials (CSV)": "trials.csv",
            "Validation curves (PNG)": "validation_curves.png", "Summary (JSON)": SUMMARY_FILE,
            **({"Parameter importances (CSV)": "importances.csv"} if ranked is not None else {})})]),
    ]
    note = SYNTHETIC_NOTE if summary["synthetic_data"] else None
    return write_html(folder / "index.html", f"Tuning report: {summary['experiment']}", sections, note)
