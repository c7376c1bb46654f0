"""The Ray Tune experiment: search space, OptunaSearch + ASHA, resources, storage, resume, best model out.

One experiment = one index, split and balanced once (`train.prepare_training_data`) and
shared with every trial through the object store (`tune.with_parameters`). Each trial is
`train.tune_trainable` (Keras + LRA, a checkpoint every epoch) wrapped by `run_trial`, which
adds to every report where the trial ran (node id, GPU ids) and `best_<metric>`: the metric
of the weights the trial keeps (the LRA's best epoch). That value drives Optuna, ASHA,
checkpoint retention and the choice of the model to export, so the trial that wins is the
model that ships.

At the end the best trial's checkpoint is exported (`train.export_and_evaluate`, the card
carrying the trial id and winning hyperparameters) and `reports/tune/<name>/` gets
trials.csv, the validation curves, Optuna's parameter importances, the best model's test
report and an index.html tying them together.
"""


from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Callable

import pandas as pd
from ray import tune

from xray_ray.config import Config, config_from_dict, config_to_dict, load_config, with_overrides
from xray_ray.config_training import AUTO, SEARCHED, TuneConfig
from xray_ray.images.index import build_index, fingerprint, load_index, save_index
from xray_ray.ray_runtime import require_ray
from xray_ray.reports.figures import plot_curves
from xray_ray.reports.tables import write_csv, write_json
from xray_ray.training.network import resolve_weights
from xray_ray.training.run import (
    export_and_evaluate,
    prepare_training_data,
    result_from_checkpoint,
)
from xray_ray.tuning import storage
from xray_ray.tuning.report import SUMMARY_FILE, write_report
from xray_ray.tuning.results import best_trial, epochs_of, importances, trial_table
from xray_ray.tuning.search import TrialLog, build_tuner, run_trial
from xray_ray.tuning.storage import Experiment

log = logging.getLogger(__name__)

SETTINGS_FILE = "xray_experiment.json"  # in the experiment folder: what --resume needs besides Tune's own state


def load_experiment_config(path: str | Path | None, overrides: list[str] | None = None, values: dict | None = None,
                           check_weights: bool = True) -> tuple[Config, TuneConfig]:
    """Defaults, the YAML file, `--set` overrides, then `values` (the command's flags, dotted keys): the
    training config and its `tune:` section.

    Pretrained weights are looked up here, before any work: a missing weights file fails in
    seconds with the file and folder to fill (network.WeightsUnavailableError), not after the
    data is prepared and every trial has failed. A resumed experiment uses its saved config
    instead, checked by `run_experiment` (`check_weights=False` here).
    """
    config = load_config(path, overrides, values)
    if check_weights:
        resolve_weights(config.model)
    return config, config.tune


def check_can_start(experiment: Experiment, resume: bool, overwrite: bool) -> dict | None:
    """Refuse, before any work, what would fail or overwrite later; on resume return the saved settings."""
    saved = None
    if resume:
        text = storage.read_text(storage.join(experiment.path, SETTINGS_FILE))
        if text is None or not tune.Tuner.can_restore(experiment.path):
            raise FileNotFoundError(f"no experiment to resume at {experiment.path}: check --name and --storage-path "
                                    "(an experiment that stopped before its first trial cannot resume: delete it)")
        saved = json.loads(text)
    elif storage.exists(experiment.path):
        raise FileExistsError(f"experiment {experiment.path} already exists: pass --resume to continue it, "
                              "or choose another --name")
    if not overwrite:
        for what, path in (("model folder", experiment.out), ("report folder", experiment.report_dir / "index.html")):
            if path.exists():
                raise FileExistsError(f"{what} {path} already exists: choose another one or pass --overwrite")
    return saved


def gpus_per_trial(settings: TuneConfig) -> float:
    """`tune.gpus_per_trial`, with `auto` resolved from the cluster's resources now: 1 GPU per
    trial when the cluster has GPUs, else 0 (trials train on CPU), said in one log line."""
    if settings.gpus_per_trial != AUTO:
        return float(settings.gpus_per_trial)
    import ray  # connected by the caller's ray_session

    gpus = ray.cluster_resources().get("GPU", 0)
    if gpus:
        log.info("tune.gpus_per_trial=auto: the cluster has %g GPU(s): 1 GPU per trial", gpus)
        return 1.0
    log.warning("tune.gpus_per_trial=auto: the cluster has no GPU: every trial trains on CPU (%s CPU each), which "
                "for EfficientNetB1 at 240 px takes days. An autoscaling cluster whose GPU nodes start on demand "
                "needs tune.gpus_per_trial=1.", settings.cpus_per_trial)
    return 0.0


def fit_trials(training, config: Config, settings: TuneConfig, experiment: Experiment, *, resume: bool = False,
               trainable: Callable | None = None, callbacks: list | None = None):
    """Run (or restore and continue) the trials on prepared data; returns Tune's ResultGrid.

    `Tuner.fit` does not raise when trials fail: see `results.errors`.
    """
    # Tune snapshots the experiment whenever a trial has written keep_checkpoints checkpoints since the last
    # snapshot, which is what makes resume safe; its warning about that is noise here.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    resources = {"cpu": settings.cpus_per_trial, "gpu": gpus_per_trial(settings)}
    wrapped = tune.with_resources(
        tune.with_parameters(trainable or run_trial, training=training, config=config), resources)
    if resume:
        tuner = tune.Tuner.restore(experiment.path, trainable=wrapped, resume_errored=True)
    else:
        tuner = build_tuner(wrapped, config, settings, experiment, list(callbacks or []))
    log.info("experiment %s: %d trial(s), each %s, storage %s", experiment.name, settings.num_samples, resources,
             experiment.path)
    return tuner.fit()


def resolve_index(experiment: Experiment, saved: dict | None, index_path: Path | None,
                  data_dir: Path | None) -> tuple[pd.DataFrame, Path]:
    """The experiment's index and its path: `--data` indexed now (saved in the report folder), `--index`,
    or on resume the index the experiment recorded. ValueError when none applies."""
    if index_path and data_dir:
        raise ValueError("give --index or --data, not both")
    if data_dir:
        frame, _ = build_index(data_dir)
        index_path = experiment.report_dir / "index.parquet"
        save_index(frame, index_path)
        return frame, index_path
    if index_path is None and saved is not None:
        if not saved.get("index_path"):
            raise ValueError("the experiment did not record its index: give --index")
        index_path = Path(saved["index_path"])
    if index_path is None:
        raise ValueError("give --index (or --data) for a new experiment")
    try:
        return load_index(index_path), index_path
    except OSError as err:
        raise ValueError(f"cannot read the index {index_path}: {err}") from None


def run_experiment(frame: pd.DataFrame, config: Config, settings: TuneConfig, experiment: Experiment, *,
                   resume: bool = False, overwrite: bool = False, index_path: str | None = None,
                   trainable: Callable | None = None, callbacks: list | None = None) -> dict:
    """Run (or resume) the experiment, then export and report its best trial; returns the summary.

    `trainable` replaces `run_trial` (same signature), for tests and benchmarks that
    instrument trials; `callbacks` are extra Tune callbacks.
    """
    require_ray("a tuning experiment")
    saved = check_can_start(experiment, resume, overwrite)
    digest = fingerprint(frame)
    if saved is not None:
        if saved["index_fingerprint"] != digest:
            raise ValueError(f"the index differs from the one experiment {experiment.name} started with "
                             f"({saved['index_path']}): resume with that index")
        config, settings = config_from_dict(saved["config"]), TuneConfig(**saved["tune"])
        resolve_weights(config.model)  # the saved config's weights, before any work
        log.info("resuming experiment %s with its saved settings", experiment.path)
    else:
        storage.write_text(storage.join(experiment.path, SETTINGS_FILE), json.dumps({
            "config": config_to_dict(config), "tune": dataclasses.asdict(settings), "index_fingerprint": digest,
            "index_path": index_path, "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=2))
    started = time.time()
    training = prepare_training_data(frame, config)
    prepared_s = time.time() - started
    trial_log = TrialLog(settings.metric)
    results = fit_trials(training, config, settings, experiment, resume=resume, trainable=trainable,
                         callbacks=[trial_log, *(callbacks or [])])
    fit_s = time.time() - started - prepared_s
    table = trial_table(results, settings, config.lra.epochs, trial_log.launched)
    summary = finish(results, table, frame, training, config, settings, experiment, overwrite)
    summary["timing"] = {"prepare_data_s": round(prepared_s, 1), "tune_fit_s": round(fit_s, 1),
                         "total_s": round(time.time() - started, 1)}
    write_json(experiment.report_dir / SUMMARY_FILE, summary)
    return summary


def finish(results, table: pd.DataFrame, frame: pd.DataFrame, training, config: Config, settings: TuneConfig,
           experiment: Experiment, overwrite: bool) -> dict:
    """Export the best trial's model, then write the experiment's report folder."""
    folder = experiment.report_dir
    folder.mkdir(parents=True, exist_ok=True)
    write_csv(folder / "trials.csv", table.drop(columns=["path"]))
    errors = [str(e).splitlines()[0][:300] for e in results.errors]
    best = best_trial(table, settings)
    result = next(r for r in results if r.path == best["path"])
    params = {dotted: result.config[dotted] for dotted in SEARCHED.values() if dotted in result.config}
    trial_config = with_overrides(config, params)
    tune_card = {"experiment": experiment.name, "trial_id": best["trial_id"], "params": params,
                 settings.score: float(best[settings.score]), "trials": len(table),
                 "storage_path": experiment.path, "metric": settings.metric, "mode": settings.mode}
    log.info("best trial %s (%s %.4f): exporting to %s", best["trial_id"], settings.score,
             best[settings.score], experiment.out)
    with result.checkpoint.as_directory() as checkpoint_dir:
        trained = result_from_checkpoint(checkpoint_dir, training, trial_config)
    trained.seconds = float(best["seconds"])  # the trial's wall time, start to last report
    card = export_and_evaluate(trained, training, frame, trial_config, experiment.out, folder / "best_model",
                               overwrite=overwrite, card_extra={"tune": tune_card})
    curves = {f"{row.trial_id} ({row.stop_reason})": epochs_of(r, settings.score)[settings.metric].tolist()
              for row, r in ((row, next(x for x in results if x.path == row.path)) for row in table.itertuples())}
    plot_curves(folder / "validation_curves.png", curves, f"Validation curve of each trial ({settings.metric})",
                        "Epoch", settings.metric)
    ranked, importance_note = importances(table, settings)
    if ranked is not None:
        write_csv(folder / "importances.csv", ranked)
    summary = {
        "experiment": experiment.name, "storage_path": experiment.path, "metric": settings.score, "mode": settings.mode,
        "best_trial": best["trial_id"], "best_trial_number": int(best["trial"]), "best_params": params,
        "best_score": float(best[settings.score]),
        "model": str(experiment.out), "model_version": card["version"], "test_accuracy": card["metrics"]["test"]["accuracy"],
        "trials": len(table), "errors": errors, "importances": None if ranked is None else dict(zip(ranked.parameter, ranked.importance)),
        "epochs_run": int(table["epochs_run"].sum()),
        "epochs_saved_by_asha": int(sum(config.lra.epochs - r.epochs_run for r in table.itertuples() if r.stop_reason == "asha")),
        "synthetic_data": bool(frame.attrs.get("synthetic", False)),
    }
    write_report(folder, table, summary, settings, config, ranked, importance_note, card)
    return summary
