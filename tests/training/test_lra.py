"""The LRA callback, driven with scripted epoch logs on a tiny model, plus one real ``fit``.

Weights are "marked" before each scripted epoch end: every weight array (BatchNorm moving
statistics included) is filled with the epoch number, so the model's weights afterwards tell which
epoch they come from.
"""

from __future__ import annotations

import json
import logging

import keras
import numpy as np
import pytest

from xray_ray.training.lra import LRA

LR0 = 0.001


def make_model(jit_compile="auto") -> keras.Model:
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(4),
            keras.layers.BatchNormalization(),  # non-trainable moving stats must follow too
            keras.layers.Activation("softmax"),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adamax(LR0), loss="categorical_crossentropy", metrics=["accuracy"],
        jit_compile=jit_compile,
    )
    model.stop_training = False
    return model


@pytest.fixture
def model() -> keras.Model:
    return make_model()


def mark(model: keras.Model, k: float) -> None:
    model.set_weights([np.full_like(w, k) for w in model.get_weights()])


def marked_as(model: keras.Model) -> float:
    """The epoch mark the weights carry; asserts all arrays (BN stats included) agree."""
    values = {float(v) for w in model.get_weights() for v in np.unique(w)}
    assert len(values) == 1, values
    return values.pop()


def lr_of(model: keras.Model) -> float:
    return float(model.optimizer.learning_rate.numpy())


def L(acc: float, vloss: float, loss: float = 0.5, vacc: float = 0.5) -> dict:
    return {"loss": loss, "accuracy": acc, "val_loss": vloss, "val_accuracy": vacc}


def start(model, **kw) -> LRA:
    cb = LRA(**kw)
    cb.set_model(model)
    cb.on_train_begin()
    return cb


def epoch(cb: LRA, model, i: int, logs: dict) -> dict:
    """Scripted epoch i (0-based): the weights become mark i+1, then the epoch ends."""
    mark(model, i + 1)
    cb.on_epoch_end(i, logs)
    return cb.epochs[-1]


def test_train_begin_state(model):
    mark(model, 7)
    cb = start(model)
    assert (cb.highest_tracc, cb.lowest_vloss, cb.count, cb.stop_count, cb.best_epoch) == (
        0.0, float("inf"), 0, 0, 0)
    assert [float(np.unique(w)[0]) for w in cb.best_weights] == [7.0] * len(cb.best_weights)
    assert cb.epochs == [] and cb.stop_reason is None


@pytest.mark.parametrize("patience", [1, 2])
@pytest.mark.parametrize("factor", [0.5, 0.3])
def test_lr_cut_after_patience(model, patience, factor):
    cb = start(model, patience=patience, factor=factor, stop_patience=10)
    epoch(cb, model, 0, L(0.5, 1.0))
    for i in range(1, patience):  # not yet
        rec = epoch(cb, model, i, L(0.4, 1.0))
        assert rec["action"] == f"no improvement ({i}/{patience})"
        assert lr_of(model) == pytest.approx(LR0)
    rec = epoch(cb, model, patience, L(0.4, 1.0))
    assert lr_of(model) == pytest.approx(LR0 * factor)
    assert rec["lr"] == pytest.approx(LR0) and rec["lr_after"] == pytest.approx(LR0 * factor)
    assert rec["action"].startswith(f"lr 0.001 -> {LR0 * factor:.6g}")
    assert (cb.count, cb.stop_count) == (0, 1)
    # the next non-improving stretch cuts again from the new lr
    for i in range(patience + 1, 2 * patience + 1):
        epoch(cb, model, i, L(0.4, 1.0))
    assert lr_of(model) == pytest.approx(LR0 * factor**2)
    assert cb.stop_count == 2


@pytest.mark.parametrize(
    "threshold, first, second, monitor, improved",
    [
        (0.9, L(0.5, 1.0), L(0.4, 0.5), "accuracy", False),  # below: val_loss gain ignored
        (0.9, L(0.5, 1.0), L(0.6, 2.0), "accuracy", True),  # below: val_loss loss ignored
        (0.9, L(0.95, 1.0), L(0.92, 0.5), "val_loss", True),  # above: acc drop ignored
        (0.9, L(0.95, 1.0), L(0.99, 1.2), "val_loss", False),  # above: acc gain ignored
        (0.9, L(0.5, 0.6), L(0.95, 0.7), "val_loss", False),  # switch compares to tracked vloss
        (0.5, L(0.6, 1.0), L(0.55, 0.8), "val_loss", True),  # custom threshold
    ],
)
def test_monitor_switch_at_threshold(model, threshold, first, second, monitor, improved):
    cb = start(model, threshold=threshold, patience=5)
    epoch(cb, model, 0, first)
    rec = epoch(cb, model, 1, second)
    assert (rec["monitor"], rec["improved"]) == (monitor, improved)
    assert cb.best_epoch == (2 if improved else 1)
    if monitor == "val_loss":  # the highest train accuracy is kept current meanwhile
        assert cb.highest_tracc == max(first["accuracy"], second["accuracy"])


@pytest.mark.parametrize("dwell", [True, False])
@pytest.mark.parametrize("patience", [1, 2])
def test_rollback_with_dwell(model, dwell, patience):
    cb = start(model, dwell=dwell, patience=patience, stop_patience=10)
    epoch(cb, model, 0, L(0.5, 1.0))
    epoch(cb, model, 1, L(0.6, 1.0))  # best: epoch 2
    for i in range(2, 2 + patience - 1):
        epoch(cb, model, i, L(0.55, 1.0))
        assert marked_as(model) == i + 1  # no cut yet, no rollback
    last = 2 + patience - 1
    rec = epoch(cb, model, last, L(0.55, 1.0))
    assert cb.stop_count == 1
    if dwell:
        assert marked_as(model) == 2.0  # BN moving stats included
        assert "weights back to epoch 2" in rec["action"]
    else:
        assert marked_as(model) == last + 1
        assert "weights back" not in rec["action"]


def test_stop_after_stop_patience(model):
    cb = start(model, patience=1, stop_patience=3)
    epoch(cb, model, 0, L(0.5, 1.0))
    for i in (1, 2):
        epoch(cb, model, i, L(0.4, 1.0))
        assert not model.stop_training
    rec = epoch(cb, model, 3, L(0.4, 1.0))
    assert model.stop_training and cb.stop_reason == "stop_patience"
    assert rec["action"].endswith("stop: 3 lr cuts without improvement")
    assert lr_of(model) == pytest.approx(LR0 * 0.5**3)
    cb.on_train_end()
    assert cb.stop_reason == "stop_patience" and marked_as(model) == 1.0


def test_improvement_resets_stop_count(model):
    cb = start(model, patience=1, stop_patience=3)
    accs = [0.5, 0.4, 0.4, 0.6, 0.4, 0.4]  # two cuts, improvement, two cuts
    for i, a in enumerate(accs):
        epoch(cb, model, i, L(a, 1.0))
        if i == 3:
            assert (cb.stop_count, cb.count, cb.best_epoch) == (0, 0, 4)
    assert cb.stop_count == 2 and not model.stop_training
    epoch(cb, model, 6, L(0.4, 1.0))
    assert model.stop_training and cb.stop_reason == "stop_patience"


def test_best_weights_restored_at_end(model):
    cb = start(model, dwell=False, patience=5)
    for i, a in enumerate([0.5, 0.7, 0.6, 0.65]):
        epoch(cb, model, i, L(a, 1.0))
    assert marked_as(model) == 4.0
    cb.on_train_end()
    assert marked_as(model) == 2.0 and cb.best_epoch == 2
    assert cb.stop_reason == "max_epochs"


SCRIPT = [L(0.5, 1.0), L(0.6, 0.9), L(0.55, 0.8), L(0.58, 0.85), L(0.92, 0.7), L(0.95, 0.75),
          L(0.96, 0.72), L(0.97, 0.6), L(0.97, 0.65), L(0.98, 0.66), L(0.99, 0.7), L(0.99, 0.71)]


def run(cb, model, epochs):
    """Scripted epochs; returns the weight mark and lr after each."""
    traj = []
    for i in epochs:
        epoch(cb, model, i, SCRIPT[i])
        traj.append((marked_as(model), lr_of(model)))
    return traj


RESUME_KW = dict(patience=2, stop_patience=2, factor=0.3)  # SCRIPT ends in an early stop


@pytest.fixture(scope="module")
def uninterrupted():
    """The reference: the whole script in one run (computed once for all split points)."""
    ref_model = make_model()
    ref = start(ref_model, **RESUME_KW)
    ref_traj = run(ref, ref_model, range(len(SCRIPT)))
    ref.on_train_end()
    return ref, ref_traj, marked_as(ref_model)


@pytest.mark.parametrize("split", [1, 3, 5, 8, 11])  # 3 and 11: mid-patience count carried over
def test_state_round_trip_continues_identically(uninterrupted, split):
    ref, ref_traj, ref_final_mark = uninterrupted
    kw = RESUME_KW
    assert ref.stop_reason == "stop_patience"  # the script exercises cuts, rollbacks and the stop

    m1 = make_model()
    first = start(m1, **kw)
    traj = run(first, m1, range(split))
    state = json.loads(json.dumps(first.get_state(), allow_nan=False))  # strict JSON
    best, current = first.best_weights, m1.get_weights()

    m2 = make_model()  # rebuilt from scratch: initial lr, fresh optimizer
    m2.set_weights(current)
    second = LRA(**kw)
    second.set_state(state, best_weights=best)
    second.set_model(m2)
    second.on_train_begin()  # must not reset the restored state
    traj += run(second, m2, range(split, len(SCRIPT)))
    second.on_train_end()

    assert traj == ref_traj
    assert second.epochs == ref.epochs
    assert (second.best_epoch, second.stop_reason) == (ref.best_epoch, ref.stop_reason)
    assert marked_as(m2) == ref_final_mark


def test_fit_without_set_state_starts_fresh(model):
    cb = start(model, patience=1)
    epoch(cb, model, 0, L(0.5, 1.0))
    epoch(cb, model, 1, L(0.4, 1.0))
    cb.on_train_begin()
    assert (cb.stop_count, cb.best_epoch, cb.epochs) == (0, 0, [])


def test_log_lines(model, caplog):
    caplog.set_level(logging.INFO, logger="xray_ray.training.lra")
    cb = start(model, patience=2)
    cb.params = {"epochs": 5}
    epoch(cb, model, 0, L(0.5, 1.0, loss=0.75, vacc=0.25))
    epoch(cb, model, 1, L(0.4, 1.0))
    lines = [r.getMessage() for r in caplog.records if r.name == "xray_ray.training.lra"]
    assert "patience=2" in lines[0] and "lr=0.001" in lines[0]
    assert lines[1] == ("epoch 1/5: loss 0.7500 acc 0.5000 val_loss 1.0000 val_acc 0.2500 "
                        "lr 0.001 | accuracy 0.5000 (n/a vs best) | improved, saved best")
    assert "accuracy 0.4000 (-20.00% vs best) | no improvement (1/2)" in lines[2]


def test_custom_print_fn_and_val_loss_percent(model):
    out: list[str] = []
    cb = LRA(print_fn=out.append, patience=1)
    cb.set_model(model)
    cb.on_train_begin()
    epoch(cb, model, 0, L(0.95, 1.0))
    epoch(cb, model, 1, L(0.95, 0.8))
    epoch(cb, model, 2, L(0.95, 1.0))
    assert "val_loss 0.8000 (+20.00% vs best) | improved" in out[2]
    assert "val_loss 1.0000 (-25.00% vs best) | lr 0.001 -> 0.0005, weights back to epoch 2" in out[3]


@pytest.mark.slow  # trains a network
def test_inside_real_fit():
    keras.utils.set_random_seed(0)
    model = make_model(jit_compile=False)  # XLA compilation would dominate the test time
    x = np.random.rand(32, 3).astype("float32")
    y = keras.utils.to_categorical(np.random.randint(0, 4, 32), 4)
    cb = LRA(patience=1, stop_patience=10, threshold=0.0)  # val_loss drives from epoch 1
    model.fit(x[:24], y[:24], validation_data=(x[24:], y[24:]), epochs=4, batch_size=32,
              verbose=0, callbacks=[cb])
    assert [e["epoch"] for e in cb.epochs] == [1, 2, 3, 4]
    assert all(e["monitor"] == "val_loss" for e in cb.epochs)
    assert cb.stop_reason == "max_epochs" and 1 <= cb.best_epoch <= 4
    for w, b in zip(model.get_weights(), cb.best_weights):
        np.testing.assert_array_equal(w, b)
    assert lr_of(model) == pytest.approx(cb.epochs[-1]["lr_after"])
    json.dumps(cb.get_state(), allow_nan=False)
