"""The search: Optuna's TPE over the searched settings, ASHA on top, one trial = one LRA training run.

Each trial is `training.run.tune_trainable` wrapped by `run_trial`, which adds where the
trial ran (node id, GPU ids) to every report. `TrialLog` prints one line per trial event.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any

from ray import tune

from xray_ray.config import Config, flat_config
from xray_ray.config_training import INTEGER, LOG_SCALE, SEARCHED, TuneConfig
from xray_ray.training.run import tune_trainable
from xray_ray.tuning.storage import Experiment

log = logging.getLogger(__name__)


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
    flat = flat_config(config)
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


def trial_placement() -> dict[str, Any]:
    """Where this trial runs: Ray node id, the GPU ids Ray gave it, and what CUDA sees."""
    import ray  # already imported in the trial's Ray worker

    return {
        "node_id": ray.get_runtime_context().get_node_id(),
        "gpu_ids": ",".join(str(g) for g in ray.get_gpu_ids()),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
        "host": socket.gethostname(),
        "started_at": time.time(),
    }


def run_trial(params: dict, training, config: Config) -> None:
    """One trial: `train.tune_trainable`, with where it runs added to every report."""
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


def asha_grace_period(settings: TuneConfig, max_epochs: int) -> int:
    """ASHA's grace period, at most the epochs a trial may run (`--set lra.epochs=1` on a config with grace 3)."""
    if settings.grace_period > max_epochs:
        log.warning("tune.grace_period %d is more than lra.epochs %d: ASHA gives every trial all %d epoch(s)",
                    settings.grace_period, max_epochs, max_epochs)
        return max_epochs
    return settings.grace_period


def build_searcher(config: Config, settings: TuneConfig):
    """OptunaSearch with a seeded TPE sampler, the base config's point first (`start_from_base`).

    For its first `startup_trials` trials TPE draws at random from its seed, so the i-th trial gets
    the same values whenever and in whatever order the trials before it finish; after that it models
    the finished trials, so with trials running side by side their timing changes what it suggests.
    """
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    point = first_point(config, settings) if settings.start_from_base else {}
    return OptunaSearch(
        points_to_evaluate=[point] if point else None,
        sampler=optuna.samplers.TPESampler(seed=settings.seed, n_startup_trials=settings.startup_trials),
    )


def build_tuner(trainable, config: Config, settings: TuneConfig, experiment: Experiment, callbacks: list):
    """The Tuner: `build_searcher`'s search, ASHA on the epoch count (or no early stopping), resources and storage."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    searcher = build_searcher(config, settings)
    if settings.scheduler == "asha":
        grace = asha_grace_period(settings, config.lra.epochs)
        scheduler = ASHAScheduler(time_attr="epoch", max_t=config.lra.epochs, grace_period=grace,
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
