"""One training run (one Tune trial): index in, Keras fit with LRA, the best model out.

`prepare_training_data` runs once (per experiment under Tune) and yields materialized Ray
Datasets of preprocessed images; `fit` trains on them in whatever process it runs in,
importing TensorFlow only there. `tune_trainable` is the same run as a Ray Tune function
trainable: it reports every epoch with a checkpoint and resumes from the last one.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from xray_ray.config import Config, config_to_dict, with_overrides
from xray_ray.images.index import fingerprint
from xray_ray.images.synth import SYNTHETIC_NOTE
from xray_ray.model_folder.calibration import Calibration, reliability_bins
from xray_ray.model_folder.card import MODEL_FILE
from xray_ray.model_folder.engines import setup_tensorflow
from xray_ray.model_folder.card import build_card
from xray_ray.model_folder.export import export_model
from xray_ray.model_folder.reliability import fit_and_measure
from xray_ray.reports.training import write_training_report
from xray_ray.training import data
from xray_ray.training.network import build_model, refresh_batchnorm, resolve_weights

log = logging.getLogger(__name__)
STATE_FILE = "state.json"
BEST_WEIGHTS_FILE = "best.weights.h5"


@dataclass
class TrainingData:
    """Preprocessed, materialized image datasets for one experiment, shared by its trials."""

    train: object  # ray.data.Dataset with image/y/label columns (balanced when undersampling)
    valid: object
    split: data.Split
    class_weight: dict[int, float] | None


@dataclass
class TrainResult:
    """What a run produced: the model with its best weights, and how it got there."""

    model: object
    epochs: list[dict]
    best_epoch: int
    stop_reason: str
    bn_refresh_batches: int
    seconds: float
    epoch_seconds: list[float] = field(default_factory=list)


def prepare_training_data(frame: pd.DataFrame, config: Config) -> TrainingData:
    """Split, balance, decode and preprocess once; every trial then reads the same blocks."""
    cfg = config.data
    datasets, split = data.prepare(frame, cfg.split, cfg.seed, cfg.balance)
    if len(split.train) == 0 or len(split.valid) == 0:
        raise ValueError(f"the index is too small to split: {split.counts()}")
    return TrainingData(
        train=data.load_images(datasets["train"], cfg.image_size).materialize(),
        valid=data.load_images(datasets["valid"], cfg.image_size).materialize(),
        split=split,
        class_weight=data.class_weights(split.train) if cfg.balance == "class_weights" else None,
    )


def _epoch_timer():
    """A Keras callback keeping the wall time of each epoch, for reports and the card."""
    import keras

    class EpochTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.seconds: list[float] = []

        def on_epoch_begin(self, epoch, logs=None):
            self._start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds.append(time.perf_counter() - self._start)

    return EpochTimer()


def fit(training: TrainingData, config: Config, tune_metrics: dict | None = None,
        resume_from: str | None = None) -> TrainResult:
    """Train with LRA; end with the best weights.

    Outside Tune, BatchNorm statistics are then refreshed after training from scratch.
    Under Tune (`tune_metrics` given, merged into every report) each epoch is reported
    with a checkpoint instead, and the refresh is left to whoever exports the winner.
    """
    started = time.perf_counter()
    setup_tensorflow(training=True)
    import keras  # after the set-up above, which must run before any TensorFlow op

    from xray_ray.training.lra import (
        LRA,  # a Keras callback class: importing it imports Keras
    )

    cfg = config.lra
    lra = LRA(patience=cfg.patience, stop_patience=cfg.stop_patience, threshold=cfg.threshold,
              factor=cfg.factor, dwell=cfg.dwell)
    initial_epoch, last_epoch = 0, cfg.epochs
    if resume_from:
        folder = Path(resume_from)
        model = keras.models.load_model(folder / MODEL_FILE, compile=True)
        best = build_model(config.model, config.data.image_size, config.data.seed)
        best.load_weights(folder / BEST_WEIGHTS_FILE)
        state = json.loads((folder / STATE_FILE).read_text())
        lra.set_state(state["lra"], best_weights=best.get_weights())
        initial_epoch = state["epoch"]
        if state["stop_reason"]:  # the run had ended (LRA stop): restoring it must not train on
            last_epoch = initial_epoch
        log.info("resuming at epoch %d of %d from %s", initial_epoch + 1, last_epoch, folder)
    else:
        model = build_model(config.model, config.data.image_size, config.data.seed)
    timer = _epoch_timer()
    under_tune = tune_metrics is not None
    callbacks = [_refresh_before_validation(training, config), lra, timer]
    callbacks += [_tune_reporter(lra, tune_metrics)] if under_tune else []
    batch = config.data.batch_size
    model.fit(
        data.to_tf(training.train, batch, training=True, seed=config.data.seed, first_epoch=initial_epoch),
        validation_data=data.to_tf(training.valid, batch, training=False),
        epochs=last_epoch,
        initial_epoch=initial_epoch,
        class_weight=training.class_weight,
        callbacks=callbacks,
        shuffle=False,  # the tf.data pipeline shuffles
        verbose=config.train.verbose,
    )
    refreshed = refresh_statistics(model, training, config) if not under_tune else 0
    return TrainResult(model, lra.epochs, lra.best_epoch, lra.stop_reason, refreshed,
                       time.perf_counter() - started, timer.seconds)


def _plain_training_images(training: TrainingData, config: Config):
    """Training images without augmentation, in batches of at least train.bn_refresh_batch_size."""
    size = max(config.data.batch_size, config.train.bn_refresh_batch_size)
    return (x for x, _ in data.to_tf(training.train, size, training=False))


def refresh_statistics(model, training: TrainingData, config: Config) -> int:
    """After training from scratch, re-estimate BatchNorm statistics on the training images
    (network.refresh_batchnorm, up to train.bn_refresh_batches); returns the batches used (0
    with pretrained weights, whose backbone statistics stay frozen)."""
    if config.model.weights != "none":
        return 0
    return refresh_batchnorm(model, _plain_training_images(training, config), config.train.bn_refresh_batches)


def _refresh_before_validation(training: TrainingData, config: Config):
    """A Keras callback re-estimating BatchNorm statistics right before fit's validation pass.

    Keras validates inside `fit`, in inference mode, on the moving averages; trained from
    scratch those lag the weights by many steps, so validation (and with it the LRA after its
    threshold, Tune's ranking and ASHA's cuts) judged a model nobody would export: the
    demo's trials read exactly chance for their first epochs. `fit` calls `on_test_begin`
    of its callbacks before the validation batches, so the statistics are refreshed there
    on `train.validation_bn_refresh_batches` training batches (0: validate on the moving
    averages as Keras does), read once and kept (as uint8) so an epoch costs no extra pass
    over the data. The best weights the LRA keeps then carry matching statistics.
    """
    import keras
    import numpy as np

    wanted = config.train.validation_bn_refresh_batches if config.model.weights == "none" else 0

    class RefreshBeforeValidation(keras.callbacks.Callback):
        batches: list | None = None

        def on_test_begin(self, logs=None):
            if not wanted:
                return
            if self.batches is None:
                images = _plain_training_images(training, config)
                self.batches = [np.asarray(x, np.uint8) for _, x in zip(range(wanted), images)]
            refresh_batchnorm(self.model, (batch.astype(np.float32) for batch in self.batches), wanted)

    return RefreshBeforeValidation()


def save_checkpoint(folder: Path, model, lra, epoch: int) -> None:
    """A resumable snapshot: the current model with its optimizer, the best weights, the LRA counters."""
    model.save(folder / MODEL_FILE)
    best = model.get_weights()
    model.set_weights(lra.best_weights)
    model.save_weights(folder / BEST_WEIGHTS_FILE)
    model.set_weights(best)
    (folder / STATE_FILE).write_text(json.dumps({"epoch": epoch, "lra": lra.get_state(), "stop_reason": lra.stop_reason}))


def _tune_reporter(lra, extra: dict):
    """A Keras callback reporting each epoch to Ray Tune, with a checkpoint to resume from.

    Besides Keras's metrics it reports the validation figures at the LRA's best epoch
    (`best_val_accuracy`, `best_val_loss`: what the trial's kept weights score, which is
    what trials are ranked by) and the caller's `extra` fields.
    """
    import keras
    import ray.tune

    class TuneReport(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            latest = lra.epochs[-1]
            best = lra.epochs[lra.best_epoch - 1] if lra.best_epoch else latest
            metrics = {key: float(value) for key, value in (logs or {}).items()}
            metrics.update(extra, epoch=epoch + 1, lr=latest["lr"], best_epoch=lra.best_epoch,
                           best_val_accuracy=best["val_accuracy"], best_val_loss=best["val_loss"],
                           lra_action=latest["action"], stop_reason=lra.stop_reason or "", reported_at=time.time())
            with tempfile.TemporaryDirectory() as tmp:
                save_checkpoint(Path(tmp), self.model, lra, epoch + 1)
                ray.tune.report(metrics, checkpoint=ray.tune.Checkpoint.from_directory(tmp))

    return TuneReport()


def tune_trainable(params: dict, training: TrainingData, config: Config, extra_metrics: dict | None = None) -> None:
    """Ray Tune function trainable: `params` are dotted overrides (`model.dropout`) on `config`.

    `extra_metrics` (e.g. where the trial runs) are added to every report.
    """
    import ray.tune

    checkpoint = ray.tune.get_checkpoint()
    fit(training, with_overrides(config, params), tune_metrics=extra_metrics or {},
        resume_from=checkpoint.to_directory() if checkpoint else None)


def train_and_export(frame: pd.DataFrame, config: Config, out: str | Path, report_dir: str | Path,
                     overwrite: bool = False) -> dict:
    """The `xray-ray train` job: fit, then export, evaluate and report (`export_and_evaluate`)."""
    out = Path(out)
    if out.exists() and not overwrite:  # fail before an hour of training, not after
        raise FileExistsError(f"{out} already exists: choose another name or pass --overwrite")
    resolve_weights(config.model)  # likewise: a missing weights file, before the data is prepared
    training = prepare_training_data(frame, config)
    return export_and_evaluate(fit(training, config), training, frame, config, out, report_dir, overwrite)


def result_from_checkpoint(folder: str | Path, training: TrainingData, config: Config) -> TrainResult:
    """The finished run a Tune checkpoint holds: its best weights (BatchNorm refreshed when from scratch)."""
    folder = Path(folder)
    setup_tensorflow(training=True)
    saved = json.loads((folder / STATE_FILE).read_text())
    state = saved["lra"]
    model = build_model(config.model, config.data.image_size, config.data.seed)
    model.load_weights(folder / BEST_WEIGHTS_FILE)
    refreshed = refresh_statistics(model, training, config)
    epochs = state["epochs"]
    stop_reason = saved["stop_reason"] or ("max_epochs" if len(epochs) >= config.lra.epochs else "interrupted")
    return TrainResult(model, epochs, int(state["best_epoch"]), stop_reason, refreshed, seconds=float("nan"))


def export_and_evaluate(result: TrainResult, training: TrainingData, frame: pd.DataFrame, config: Config,
                        out: str | Path, report_dir: str | Path, overwrite: bool = False,
                        card_extra: dict | None = None) -> dict:
    """Export the model folder, fit its calibration (valid) and OOD detector (train, threshold on valid),
    evaluate the export on valid and test, write the training report."""
    out = Path(out)
    synthetic = bool(frame.attrs.get("synthetic", False))
    card = build_card(
        out.name, config,
        training={"epochs_run": len(result.epochs), "best_epoch": result.best_epoch, "stop_reason": result.stop_reason,
                  "bn_refresh_batches": result.bn_refresh_batches, "seconds": round(result.seconds, 1),
                  "epoch_seconds": [round(s, 2) for s in result.epoch_seconds],
                  "train_images": int(training.train.count())},
        index_fingerprint=fingerprint(frame), split_counts=training.split.counts(), synthetic=synthetic,
        extra=card_extra,
    )
    export_model(result.model, out, card, overwrite=overwrite)
    # One pass of the exported model over each split serves the calibration, the detector and the metrics.
    exported, fitted, evaluations = fit_and_measure(out, *(training.split.part(name) for name in data.SPLITS))
    calibration = Calibration.from_dict(exported["calibration"])
    test = fitted["test"]
    reliability = {"before calibration": reliability_bins(test.raw, test.labels),
                   "after calibration": reliability_bins(calibration.apply(test.raw), test.labels)}
    card = exported.data
    page = write_training_report(
        Path(report_dir), title=f"Training report: {card['name']} ({config.model.backbone})",
        evaluation=evaluations["test"], epochs=result.epochs, best_epoch=result.best_epoch,
        config=config_to_dict(config), note=SYNTHETIC_NOTE if synthetic else None,
        calibration=card["calibration"], reliability=reliability, ood=card["ood"],
        extra={"model version": card["version"], "model folder": str(out), "backbone": config.model.backbone,
               "valid accuracy": f"{evaluations['valid'].accuracy:.3f}", **card["training"]},
    )
    return {**card, "report": str(page)}
