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
import math
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pandas as pd
from ray import tune

from xray_ray.config import INTEGER, LOG_SCALE, SEARCHED, Config, TuneConfig, config_to_dict, load_config, with_overrides

log = logging.getLogger(__name__)

SETTINGS_FILE = "xray_experiment.json"  # in the experiment folder: what --resume needs besides Tune's own state
SUMMARY_FILE = "summary.json"


def load_experiment_config(path: str | Path | None, overrides: list[str] | None = None) -> tuple[Config, TuneConfig]:
    """Defaults, the YAML file, then `--set` overrides: the training config and its `tune:` section."""
    config = load_config(path, overrides)
    return config, config.tune


def config_from_dict(saved: dict) -> Config:
    """A Config back from `config_to_dict` output (as saved with the experiment)."""
    sections = {f.name for f in dataclasses.fields(Config)}
    flat = {f"{section}.{key}": value for section, values in saved.items() if section in sections
            for key, value in values.items()}
    return with_overrides(Config(), flat)


def search_space(settings: TuneConfig) -> dict[str, Any]:
    """The Tune search space over dotted config keys; a pair with low == high is a constant."""
    space: dict[str, Any] = {}
    for key, dotted in SEARCHED.items():
        low, high = getattr(settings, key)
        if low == high:
            space[dotted] = low
        elif key in INTEGER:
            space[dotted] = tune.randint(low, high + 1)  # randint's upper bound is exclusive
        elif key in LOG_SCALE:
            space[dotted] = tune.loguniform(low, high)
        else:
            space[dotted] = tune.uniform(low, high)
    return space


def first_point(config: Config, settings: TuneConfig) -> dict[str, Any]:
    """The base config's values of the searched keys (the origin's defaults unless overridden), clipped to the bounds."""
    flat = {f"{s}.{k}": v for s, values in config_to_dict(config).items() for k, v in values.items()}
    point = {}
    for key, dotted in SEARCHED.items():
        low, high = getattr(settings, key)
        if low == high:
            continue
        value = min(max(flat[dotted], low), high)
        if value != flat[dotted]:
            log.warning("the base %s=%s is outside tune.%s=[%s, %s]; the first trial uses %s",
                        dotted, flat[dotted], key, low, high, value)
        point[dotted] = value
    return point


# --------------------------------------------------------------------------- where things go


def output_root() -> Path:
    """Where relative output paths resolve: $XRAY_RAY_HOME, else the working folder.

    Under `ray job submit --working-dir`, the working folder is a temporary copy that Ray
    deletes; relative outputs then go to ~/xray-ray on the node running the driver.
    """
    home = os.environ.get("XRAY_RAY_HOME")
    if home:
        return Path(home).expanduser().resolve()
    cwd = Path.cwd()
    if "working_dir_files" in cwd.parts or cwd.name.startswith("_ray_pkg_"):
        return Path.home() / "xray-ray"
    return cwd


def resolve_storage(storage_path: str) -> str:
    """An absolute local path or a URI (s3://, gs://, ...), as Tune requires."""
    if "://" in storage_path:
        return storage_path.rstrip("/")
    path = Path(storage_path).expanduser()
    return str(path if path.is_absolute() else output_root() / path)


def _filesystem(uri: str):
    import pyarrow.fs

    if "://" in uri:
        return pyarrow.fs.FileSystem.from_uri(uri)
    return pyarrow.fs.LocalFileSystem(), uri


def _join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def _read_text(uri: str) -> str | None:
    import pyarrow.fs

    fs, path = _filesystem(uri)
    if fs.get_file_info(path).type != pyarrow.fs.FileType.File:
        return None
    with fs.open_input_stream(path) as stream:
        return stream.read().decode("utf-8")


def _write_text(uri: str, text: str) -> None:
    fs, path = _filesystem(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as stream:
        stream.write(text.encode("utf-8"))


def _exists(uri: str) -> bool:
    import pyarrow.fs

    fs, path = _filesystem(uri)
    return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound


# --------------------------------------------------------------------------- the trial


def trial_placement() -> dict[str, Any]:
    """Where this trial runs: Ray node id, the GPU ids Ray gave it, and what CUDA sees."""
    import ray

    return {
        "node_id": ray.get_runtime_context().get_node_id(),
        "gpu_ids": ",".join(str(g) for g in ray.get_gpu_ids()),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
        "host": socket.gethostname(),
        "started_at": time.time(),
    }


def run_trial(params: dict, training, config: Config) -> None:
    """One trial: `train.tune_trainable`, with where it runs added to every report."""
    from xray_ray.train import tune_trainable

    # With reuse_actors, Tune hands this process the next trial only once this function has returned, and
    # waits 2 s by default; after the last report, fit still restores the best weights.
    os.environ.setdefault("TUNE_FUNCTION_THREAD_TIMEOUT_S", "600")
    tune_trainable(params, training, config, extra_metrics=trial_placement())


def _trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


class TrialLog(tune.Callback):
    """One log line per trial event (start, finish, error), and when each trial was launched."""

    def __init__(self, metric: str = "val_accuracy"):
        self.metric = metric
        self.launched: dict[str, float] = {}

    def on_trial_start(self, iteration, trials, trial, **info):
        self.launched[trial.trial_id] = time.time()
        log.info("trial %s started: %s", trial.trial_id, _short(trial.config))

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        log.info("trial %s finished after %s epoch(s): best %s %s", trial.trial_id, last.get("epoch", "?"),
                 self.metric, _fmt(last.get(f"best_{self.metric}")))

    def on_trial_recover(self, iteration, trials, trial, **info):
        log.warning("trial %s failed; retrying it from its last checkpoint (tune.max_failures)", trial.trial_id)

    def on_trial_error(self, iteration, trials, trial, **info):
        log.warning("trial %s failed for good after %d retries", trial.trial_id, max(trial.num_failures - 1, 0))


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else str(value)


def _short(params: dict) -> str:
    return ", ".join(f"{k}={_fmt(v) if isinstance(v, float) else v}" for k, v in params.items())


# --------------------------------------------------------------------------- the experiment


@dataclass
class Experiment:
    """Where an experiment lives and writes: resolved paths, fixed before anything runs."""

    name: str
    storage_path: str  # absolute path or URI
    out: Path  # model folder of the best trial
    report_dir: Path

    @property
    def path(self) -> str:
        return _join(self.storage_path, self.name)


def plan(settings: TuneConfig, name: str | None = None, storage_path: str | None = None,
         out: str | Path | None = None, report_dir: str | Path | None = None) -> Experiment:
    """Resolve the experiment's name and folders (relative ones under `output_root()`)."""
    name = name or settings.name
    root = output_root()

    def local(path, default: Path) -> Path:
        path = Path(path).expanduser() if path is not None else default
        return path if path.is_absolute() else root / path

    return Experiment(name, resolve_storage(storage_path or settings.storage_path),
                      local(out, Path("models") / name), local(report_dir, Path("reports/tune") / name))


def _build_tuner(trainable, config: Config, settings: TuneConfig, experiment: Experiment, callbacks: list):
    import optuna
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.optuna import OptunaSearch

    point = first_point(config, settings) if settings.start_from_base else {}
    searcher = OptunaSearch(
        points_to_evaluate=[point] if point else None,
        sampler=optuna.samplers.TPESampler(seed=settings.seed, n_startup_trials=settings.startup_trials),
    )
    if settings.scheduler == "asha":
        scheduler = ASHAScheduler(time_attr="epoch", max_t=config.lra.epochs, grace_period=settings.grace_period,
                                  reduction_factor=settings.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    return tune.Tuner(
        trainable,
        param_space=search_space(settings),
        tune_config=tune.TuneConfig(
            metric=settings.score, mode=settings.mode, search_alg=searcher, scheduler=scheduler,
            num_samples=settings.num_samples, max_concurrent_trials=settings.max_concurrent_trials or None,
            trial_dirname_creator=_trial_dirname, reuse_actors=settings.reuse_actors,
        ),
        run_config=tune.RunConfig(
            name=experiment.name, storage_path=experiment.storage_path, callbacks=callbacks, verbose=1,
            failure_config=tune.FailureConfig(max_failures=settings.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=settings.keep_checkpoints,
                                                    checkpoint_score_attribute=settings.score,
                                                    checkpoint_score_order=settings.mode),
        ),
    )


def check_can_start(experiment: Experiment, resume: bool, overwrite: bool) -> dict | None:
    """Refuse, before any work, what would fail or overwrite later; on resume return the saved settings."""
    saved = None
    if resume:
        text = _read_text(_join(experiment.path, SETTINGS_FILE))
        if text is None or not tune.Tuner.can_restore(experiment.path):
            raise FileNotFoundError(f"no experiment to resume at {experiment.path}: check --name and --storage-path "
                                    "(an experiment that stopped before its first trial cannot resume: delete it)")
        saved = json.loads(text)
    elif _exists(experiment.path):
        raise FileExistsError(f"experiment {experiment.path} already exists: pass --resume to continue it, "
                              "or choose another --name")
    if not overwrite:
        for what, path in (("model folder", experiment.out), ("report folder", experiment.report_dir / "index.html")):
            if path.exists():
                raise FileExistsError(f"{what} {path} already exists: choose another one or pass --overwrite")
    return saved


def fit_trials(training, config: Config, settings: TuneConfig, experiment: Experiment, *, resume: bool = False,
               trainable: Callable | None = None, callbacks: list | None = None):
    """Run (or restore and continue) the trials on prepared data; returns Tune's ResultGrid.

    `Tuner.fit` does not raise when trials fail: see `results.errors`.
    """
    # Tune snapshots the experiment whenever a trial has written keep_checkpoints checkpoints since the last
    # snapshot, which is what makes resume safe; its warning about that is noise here.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    resources = {"cpu": settings.cpus_per_trial, "gpu": settings.gpus_per_trial}
    wrapped = tune.with_resources(
        tune.with_parameters(trainable or run_trial, training=training, config=config), resources)
    if resume:
        tuner = tune.Tuner.restore(experiment.path, trainable=wrapped, resume_errored=True)
    else:
        tuner = _build_tuner(wrapped, config, settings, experiment, list(callbacks or []))
    log.info("experiment %s: %d trial(s), each %s, storage %s", experiment.name, settings.num_samples, resources,
             experiment.path)
    return tuner.fit()


def run_experiment(frame: pd.DataFrame, config: Config, settings: TuneConfig, experiment: Experiment, *,
                   resume: bool = False, overwrite: bool = False, index_path: str | None = None,
                   trainable: Callable | None = None, callbacks: list | None = None) -> dict:
    """Run (or resume) the experiment, then export and report its best trial; returns the summary.

    `trainable` replaces `run_trial` (same signature), for tests and benchmarks that
    instrument trials; `callbacks` are extra Tune callbacks.
    """
    from xray_ray import index
    from xray_ray.ray_runtime import ensure_ray
    from xray_ray.train import prepare_training_data

    ensure_ray()
    saved = check_can_start(experiment, resume, overwrite)
    fingerprint = index.fingerprint(frame)
    if saved is not None:
        if saved["index_fingerprint"] != fingerprint:
            raise ValueError(f"the index differs from the one experiment {experiment.name} started with "
                             f"({saved['index_path']}): resume with that index")
        config, settings = config_from_dict(saved["config"]), TuneConfig(**saved["tune"])
        log.info("resuming experiment %s with its saved settings", experiment.path)
    else:
        _write_text(_join(experiment.path, SETTINGS_FILE), json.dumps({
            "config": config_to_dict(config), "tune": dataclasses.asdict(settings), "index_fingerprint": fingerprint,
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
    from xray_ray.reports import write_json

    write_json(experiment.report_dir / SUMMARY_FILE, summary)
    return summary


# --------------------------------------------------------------------------- results


def _epochs(result, score: str) -> pd.DataFrame:
    """One row per epoch of a trial (a restarted epoch keeps its last report)."""
    frame = result.metrics_dataframe
    if frame is None or frame.empty or "epoch" not in frame:
        return pd.DataFrame(columns=["epoch", "val_loss", "val_accuracy", score])
    return frame.dropna(subset=["epoch"]).drop_duplicates("epoch", keep="last").sort_values("epoch")


def trial_table(results, settings: TuneConfig, max_epochs: int, launched: dict | None = None) -> pd.DataFrame:
    """Every trial: params, best val metric, epochs run, why it stopped, where it ran, when."""
    rows = []
    for result in results:
        metrics = result.metrics or {}
        epochs = _epochs(result, settings.score)
        last = epochs.iloc[-1].to_dict() if len(epochs) else {}
        folder = Path(result.path).name
        trial_id = folder.removeprefix("trial_") if folder.startswith("trial_") else metrics.get("trial_id", folder)
        stop = last.get("stop_reason") or ""
        if result.error is not None:
            error = result.error
            stop = "error: " + (type(error).__name__ if isinstance(error, BaseException) else str(error).splitlines()[0][:80])
        elif not stop:
            stop = "max_epochs" if len(epochs) >= max_epochs else "asha" if settings.scheduler == "asha" else "stopped"
        row = {"trial": len(rows) + 1, "trial_id": trial_id}
        row.update({dotted: result.config.get(dotted) for dotted in SEARCHED.values()})
        row.update({
            settings.score: last.get(settings.score, math.nan),
            "best_epoch": last.get("best_epoch", math.nan),
            "epochs_run": len(epochs),
            "max_val_accuracy": epochs["val_accuracy"].max() if len(epochs) else math.nan,
            "min_val_loss": epochs["val_loss"].min() if len(epochs) else math.nan,
            "stop_reason": stop,
            "node_id": last.get("node_id", ""),
            "gpu_ids": "" if pd.isna(last.get("gpu_ids", "")) else str(last.get("gpu_ids", "")),
            "cuda_visible_devices": "" if pd.isna(last.get("cuda_visible_devices", "")) else str(last.get("cuda_visible_devices", "")),
            "host": last.get("host", ""),
            "launched_at": (launched or {}).get(trial_id, math.nan),
            "started_at": epochs["started_at"].min() if "started_at" in epochs else math.nan,
            "finished_at": last.get("reported_at", math.nan),
            "restarts": int(epochs["started_at"].nunique()) - 1 if "started_at" in epochs and len(epochs) else 0,
            "first_report_s": (epochs["reported_at"].min() - epochs["started_at"].min()) if "reported_at" in epochs else math.nan,
            "path": result.path,
        })
        row["seconds"] = row["finished_at"] - row["started_at"]
        rows.append(row)
    return pd.DataFrame(rows)  # in the order the search created the trials (the first is the base point)


def best_trial(table: pd.DataFrame, settings: TuneConfig) -> pd.Series:
    """The finished trial with the best score; ties go to the earlier trial."""
    ok = table[~table["stop_reason"].str.startswith("error") & table[settings.score].notna()]
    if ok.empty:
        raise RuntimeError("no trial finished with a result; see the errors in the trial logs")
    order = ok[settings.score].astype(float)
    position = order.idxmax() if settings.mode == "max" else order.idxmin()
    return table.loc[position]


def importances(table: pd.DataFrame, settings: TuneConfig) -> tuple[pd.DataFrame | None, str]:
    """Optuna's parameter importances over the finished trials, or why there are none."""
    import optuna

    searched = [(key, dotted) for key, dotted in SEARCHED.items() if len(set(getattr(settings, key))) == 2]
    ok = table[~table["stop_reason"].str.startswith("error") & table[settings.score].notna()]
    if len(ok) < 3 or not searched:
        return None, f"not computed: {len(ok)} finished trial(s); Optuna needs at least 3 to rank parameters"
    distributions = {}
    for key, dotted in searched:
        low, high = getattr(settings, key)
        distributions[dotted] = (optuna.distributions.IntDistribution(low, high) if key in INTEGER else
                                 optuna.distributions.FloatDistribution(low, high, log=key in LOG_SCALE))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize" if settings.mode == "max" else "minimize")
    for _, row in ok.iterrows():
        params = {d: (int(row[d]) if isinstance(dist, optuna.distributions.IntDistribution) else float(row[d]))
                  for d, dist in distributions.items()}
        study.add_trial(optuna.trial.create_trial(params=params, distributions=distributions,
                                                  value=float(row[settings.score])))
    if ok[settings.score].nunique() < 2:
        return None, f"not computed: all {len(ok)} finished trials scored the same {settings.score}"
    try:
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=settings.seed)
        ranked = optuna.importance.get_param_importances(study, evaluator=evaluator)
    except Exception as err:  # an importance is a bonus, never a reason to fail the experiment
        return None, f"not computed: {type(err).__name__}: {err}"
    frame = pd.DataFrame({"parameter": list(ranked), "importance": [round(v, 4) for v in ranked.values()]})
    note = (f"Optuna's fANOVA importances (share of the variance of {settings.score} each parameter explains) over "
            f"the {len(ok)} finished trials" + ("; with this few trials they are indicative only" if len(ok) < 10 else ""))
    return frame, note


def finish(results, table: pd.DataFrame, frame: pd.DataFrame, training, config: Config, settings: TuneConfig,
           experiment: Experiment, overwrite: bool) -> dict:
    """Export the best trial's model, then write the experiment's report folder."""
    from xray_ray import reports
    from xray_ray.train import export_and_evaluate, result_from_checkpoint

    folder = experiment.report_dir
    folder.mkdir(parents=True, exist_ok=True)
    reports.write_csv(folder / "trials.csv", table.drop(columns=["path"]))
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
    curves = {f"{row.trial_id} ({row.stop_reason})": _epochs(r, settings.score)[settings.metric].tolist()
              for row, r in ((row, next(x for x in results if x.path == row.path)) for row in table.itertuples())}
    reports.plot_curves(folder / "validation_curves.png", curves, f"Validation curve of each trial ({settings.metric})",
                        "Epoch", settings.metric)
    ranked, importance_note = importances(table, settings)
    if ranked is not None:
        reports.write_csv(folder / "importances.csv", ranked)
    summary = {
        "experiment": experiment.name, "storage_path": experiment.path, "metric": settings.score, "mode": settings.mode,
        "best_trial": best["trial_id"], "best_params": params, "best_score": float(best[settings.score]),
        "model": str(experiment.out), "model_version": card["version"], "test_accuracy": card["metrics"]["test"]["accuracy"],
        "trials": len(table), "errors": errors, "importances": None if ranked is None else dict(zip(ranked.parameter, ranked.importance)),
        "epochs_saved_by_asha": int(sum(config.lra.epochs - r.epochs_run for r in table.itertuples() if r.stop_reason == "asha")),
        "synthetic_data": bool(frame.attrs.get("synthetic", False)),
    }
    write_report(folder, table, summary, settings, config, ranked, importance_note, card)
    return summary


def write_report(folder: Path, table: pd.DataFrame, summary: dict, settings: TuneConfig, config: Config,
                 ranked: pd.DataFrame | None, importance_note: str, card: dict) -> Path:
    """index.html of the experiment: the winner, every trial, curves, importances, links."""
    from xray_ray import reports
    from xray_ray.synth import SYNTHETIC_NOTE

    score = settings.score
    shown = table[["trial", "trial_id", *SEARCHED.values(), score, "best_epoch", "epochs_run", "stop_reason", "node_id",
                   "gpu_ids", "seconds"]].copy()
    shown["node_id"] = shown["node_id"].astype(str).str[:12]
    shown["seconds"] = shown["seconds"].round(1)
    test = card["metrics"]["test"]
    sections = [
        reports.Section("Summary", [
            reports.Metrics({f"Best {settings.metric} (valid)": f"{summary['best_score']:.4g}",
                             "Test accuracy of the exported model": f"{test['accuracy']:.1%}",
                             "Trials": len(table), "Epochs saved by ASHA": summary["epochs_saved_by_asha"]}),
            reports.Text(f"Trials are ranked by {score}: {settings.metric} of the weights each trial keeps "
                         "(the LRA's best epoch), which is the model that would be exported."),
        ]),
        reports.Section("Best trial", [reports.KeyValues({
            "trial": summary["best_trial"], **summary["best_params"], "model folder": summary["model"],
            "model version": summary["model_version"], "test images": test["n"]})]),
        reports.Section("Trials", [reports.Table(shown, max_rows=200, full_file="trials.csv"),
                                   reports.Text("stop_reason: stop_patience (LRA stopped), max_epochs, asha (stopped "
                                                "early by the scheduler) or error. node_id and gpu_ids: where the trial ran.")]),
        reports.Section("Validation curves", [reports.Image("validation_curves.png", "Validation metric per epoch, one "
                                                             "line per trial", f"{settings.metric} after each epoch.")]),
        reports.Section("Parameter importances", [reports.Table(ranked), reports.Text(importance_note)]
                        if ranked is not None else [reports.Text(importance_note)]),
        reports.Section("Experiment", [reports.KeyValues({
            "storage": summary["storage_path"], "search": f"Optuna TPE (seed {settings.seed})",
            "scheduler": settings.scheduler, "per trial": f"{settings.cpus_per_trial} CPU, {settings.gpus_per_trial} GPU",
            "max concurrent trials": settings.max_concurrent_trials or "as resources allow",
            "max epochs": config.lra.epochs, "errors": len(summary["errors"])})]),
        reports.Section("Files", [reports.Links({
            "Test report of the best model": "best_model/index.html", "Trials (CSV)": "trials.csv",
            "Validation curves (PNG)": "validation_curves.png", "Summary (JSON)": SUMMARY_FILE,
            **({"Parameter importances (CSV)": "importances.csv"} if ranked is not None else {})})]),
    ]
    note = SYNTHETIC_NOTE if summary["synthetic_data"] else None
    return reports.write_html(folder / "index.html", f"Tuning report: {summary['experiment']}", sections, note)
