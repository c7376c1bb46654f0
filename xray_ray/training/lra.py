"""LRA: the learning-rate adjuster callback of the EfficientNetB1 / COVID-19 Radiography Kaggle notebook.

At each epoch end the callback looks at one monitored value: training accuracy while it is below
``threshold`` (early on, validation loss is noisy and accuracy is the better signal), validation
loss once training accuracy has reached ``threshold`` (then over-fitting is the risk). An
improvement saves the weights as the best so far. ``patience`` epochs without improvement cut the
learning rate by ``factor`` and, with ``dwell``, put the weights back to the best ones (so the
smaller steps start from the best point found, not from wherever training drifted). After
``stop_patience`` consecutive cuts without improvement training stops. The best weights are
restored when training ends. The notebook's interactive "ask_epoch" prompt is replaced by the
ordinary ``fit(epochs=...)`` bound; running out of epochs is recorded as ``stop_reason="max_epochs"``.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable

import keras
import numpy as np

_LOGGER = logging.getLogger(__name__)


def _num(value: Any) -> float | None:
    """A plain Python float (JSON-friendly) from a log value, or None when absent."""
    return None if value is None else float(value)


def _fmt(value: float | None, spec: str = ".4f") -> str:
    return "n/a" if value is None else format(value, spec)


def _epoch_logs(logs: dict | None) -> dict[str, float | None]:
    """The four values an epoch record keeps from Keras' logs (None when absent)."""
    logs = logs or {}
    return {key: _num(logs.get(key)) for key in ("loss", "accuracy", "val_loss", "val_accuracy")}


def _is_improvement(monitor: str, value: float, best: float) -> bool:
    """Accuracy improves by rising, validation loss by falling (a NaN never improves)."""
    return bool(value > best if monitor == "accuracy" else value < best)


def _gain_pct(monitor: str, value: float, best: float) -> float | None:
    """How much better (+) or worse (-) than the best so far, in percent of it; None when there is no usable best."""
    if monitor == "accuracy":
        return (value - best) * 100 / best if best > 0 else None
    return (best - value) * 100 / best if math.isfinite(best) and best != 0 else None


class LRA(keras.callbacks.Callback):
    """Adjust the learning rate, roll back to the best weights and stop early, the notebook's way.

    Attributes:
        epochs: one dict per finished epoch (epoch (1-based), loss, accuracy, val_loss,
            val_accuracy, lr (used during the epoch), monitor, value, improved, action, lr_after).
        best_epoch: 1-based epoch whose weights are the best so far (0: the initial weights).
        best_weights: the best weights so far, a list of numpy arrays (``model.get_weights()``,
            so non-trainable BatchNorm statistics included).
        stop_reason: None while training, "stop_patience" after an early stop, "max_epochs" when
            fit ran out of epochs, "external" when something else stopped training.
        highest_tracc, lowest_vloss, count, stop_count: the running counters.
    """

    def __init__(
        self,
        patience: int = 1,
        stop_patience: int = 3,
        threshold: float = 0.9,
        factor: float = 0.5,
        dwell: bool = True,
        print_fn: Callable[[str], None] | None = None,
    ):
        super().__init__()
        if patience < 1 or stop_patience < 1:
            raise ValueError("patience and stop_patience must be >= 1")
        if not 0.0 < factor < 1.0:
            raise ValueError("factor must be in (0, 1)")
        self.patience = patience
        self.stop_patience = stop_patience
        self.threshold = threshold
        self.factor = factor
        self.dwell = dwell
        self.print_fn = print_fn or _LOGGER.info
        self.best_weights: list[np.ndarray] | None = None
        self.stop_reason: str | None = None
        self._state_restored = False
        self._pending_lr: float | None = None
        self._reset_counters()

    def _reset_counters(self) -> None:
        self.highest_tracc = 0.0
        self.lowest_vloss = math.inf
        self.count = 0
        self.stop_count = 0
        self.best_epoch = 0
        self.epochs: list[dict] = []

    # ---- learning rate and weights -------------------------------------------------------
    def _get_lr(self) -> float:
        return float(np.asarray(self.model.optimizer.learning_rate.numpy()))

    def _set_lr(self, lr: float) -> None:
        # In Keras 3 the learning rate is a backend Variable (a float lr, not a schedule, is needed).
        self.model.optimizer.learning_rate.assign(lr)

    def _save_best(self) -> None:
        self.best_weights = [np.array(w, copy=True) for w in self.model.get_weights()]

    # ---- Keras hooks ---------------------------------------------------------------------
    def on_train_begin(self, logs=None):
        """Start fresh, unless ``set_state`` was called before this fit (a resumed trial)."""
        self.stop_reason = None
        if self._state_restored:
            self._state_restored = False  # only the next fit continues; a later fit starts over
            if self._pending_lr is not None:
                self._set_lr(self._pending_lr)
                self._pending_lr = None
        else:
            self._reset_counters()
            self.best_weights = None
        if self.best_weights is None:
            self._save_best()
        self.print_fn(
            f"LRA: patience={self.patience} stop_patience={self.stop_patience} "
            f"threshold={self.threshold} factor={self.factor} dwell={self.dwell} "
            f"lr={self._get_lr():.6g}"
        )

    def on_epoch_end(self, epoch, logs=None):
        """Compare the monitored value with the best so far and act on it (see module doc)."""
        seen = _epoch_logs(logs)
        lr = self._get_lr()
        monitor, value, best = self._monitored(seen["accuracy"], seen["val_loss"])
        improved = _is_improvement(monitor, value, best)
        action = self._record_improvement(epoch) if improved else self._record_miss(lr)
        self._update_bests(monitor, value, improved, seen["accuracy"], seen["val_loss"])
        action += self._check_stop()
        self.epochs.append(dict(epoch=epoch + 1, **seen, lr=lr, monitor=monitor, value=_num(value), improved=improved,
                                action=action, lr_after=self._get_lr()))
        self._print_epoch(self.epochs[-1], _gain_pct(monitor, value, best))

    # ---- one epoch end, step by step -----------------------------------------------------
    def _monitored(self, acc: float | None, v_loss: float | None) -> tuple[str, float, float]:
        """(name, this epoch's value, best so far) of the monitored quantity: training accuracy until it
        reaches ``threshold`` (or while there is no validation loss), validation loss after."""
        acc_v = acc if acc is not None else math.nan
        if v_loss is None or not acc_v >= self.threshold:
            return "accuracy", acc_v, self.highest_tracc
        return "val_loss", v_loss, self.lowest_vloss

    def _record_improvement(self, epoch: int) -> str:
        """Save the weights as the best and reset both counters."""
        self._save_best()
        self.best_epoch = epoch + 1
        self.count = self.stop_count = 0
        return "improved, saved best"

    def _record_miss(self, lr: float) -> str:
        """Count an epoch without improvement; after ``patience`` of them, cut the learning rate."""
        self.count += 1
        if self.count < self.patience:
            return f"no improvement ({self.count}/{self.patience})"
        return self._cut_lr(lr)

    def _cut_lr(self, lr: float) -> str:
        """Multiply the learning rate by ``factor``, count the cut, and with ``dwell`` go back to the best weights."""
        new_lr = lr * self.factor
        self._set_lr(new_lr)
        self.count = 0
        self.stop_count += 1
        action = f"lr {lr:.6g} -> {new_lr:.6g}"
        if self.dwell and self.best_weights is not None:
            action += self._roll_back()
        return action + f" (cut {self.stop_count}/{self.stop_patience})"

    def _roll_back(self) -> str:
        """Put the best weights back (dwell); the words for the action."""
        self.model.set_weights(self.best_weights)
        return f", weights back to {f'epoch {self.best_epoch}' if self.best_epoch else 'initial weights'}"

    def _update_bests(self, monitor: str, value: float, improved: bool, acc: float | None,
                      v_loss: float | None) -> None:
        """Keep both best values current, so a switch of monitor compares against a sensible value."""
        if monitor == "accuracy":
            if improved:
                self.highest_tracc = value
                if v_loss is not None and v_loss < self.lowest_vloss:
                    self.lowest_vloss = v_loss
        else:
            if improved:
                self.lowest_vloss = value
            if acc is not None and acc > self.highest_tracc:
                self.highest_tracc = acc

    def _check_stop(self) -> str:
        """Stop training after ``stop_patience`` cuts without improvement; the words for the action, if so."""
        if self.stop_count < self.stop_patience:
            return ""
        self.model.stop_training = True
        self.stop_reason = "stop_patience"
        return f"; stop: {self.stop_count} lr cuts without improvement"

    def _print_epoch(self, record: dict, pct: float | None) -> None:
        """One line: the epoch's values, the monitored one against the best so far (``pct``), and the action."""
        total = (self.params or {}).get("epochs")
        pct_s = "n/a" if pct is None else f"{pct:+.2f}%"
        self.print_fn(
            f"epoch {record['epoch']}{f'/{total}' if total else ''}: loss {_fmt(record['loss'])} "
            f"acc {_fmt(record['accuracy'])} val_loss {_fmt(record['val_loss'])} "
            f"val_acc {_fmt(record['val_accuracy'])} lr {record['lr']:.6g} | "
            f"{record['monitor']} {_fmt(record['value'])} ({pct_s} vs best) | {record['action']}"
        )

    def on_train_end(self, logs=None):
        """Always finish on the best weights; record why training ended."""
        if self.best_weights is not None:
            self.model.set_weights(self.best_weights)
        if self.stop_reason is None:
            self.stop_reason = "external" if self.model.stop_training else "max_epochs"
        self.print_fn(
            f"LRA: training ended ({self.stop_reason}); best weights from epoch {self.best_epoch} restored"
        )

    # ---- resume support ------------------------------------------------------------------
    def get_state(self) -> dict:
        """JSON-serialisable counters and history (not weights; inf is stored as None).

        To resume exactly, the caller checkpoints ``self.best_weights`` alongside this dict
        (e.g. a second weights file) and passes both back to ``set_state`` before the next fit.
        """
        return {
            "highest_tracc": self.highest_tracc,
            "lowest_vloss": self.lowest_vloss if math.isfinite(self.lowest_vloss) else None,
            "count": self.count,
            "stop_count": self.stop_count,
            "best_epoch": self.best_epoch,
            "lr": self.epochs[-1]["lr_after"] if self.epochs else None,
            "epochs": [dict(e) for e in self.epochs],
        }

    def set_state(self, state: dict, best_weights: list[np.ndarray] | None = None) -> None:
        """Restore ``get_state()`` output; the next ``on_train_begin`` then keeps it.

        ``best_weights`` should be the checkpointed best weights; without them the model's weights
        at the start of the resumed fit count as the best. The saved lr (if any) is put back on
        the optimizer at train begin, so a model rebuilt with its initial lr continues correctly.
        """
        self.highest_tracc = float(state["highest_tracc"])
        lv = state.get("lowest_vloss")
        self.lowest_vloss = math.inf if lv is None else float(lv)
        self.count = int(state["count"])
        self.stop_count = int(state["stop_count"])
        self.best_epoch = int(state["best_epoch"])
        self.epochs = [dict(e) for e in state.get("epochs", [])]
        self._pending_lr = None if state.get("lr") is None else float(state["lr"])
        self.best_weights = (
            None if best_weights is None else [np.array(w, copy=True) for w in best_weights]
        )
        self._state_restored = True
