"""Reading a finished experiment: one row per trial, the best trial, Optuna's parameter importances."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from xray_ray.config_training import INTEGER, LOG_SCALE, SEARCHED, TuneConfig


def epochs_of(result, score: str) -> pd.DataFrame:
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
        epochs = epochs_of(result, settings.score)
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
    import optuna  # only when importances are computed: the experiment's end

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
