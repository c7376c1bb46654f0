"""Training: learning proven through the exported model, BatchNorm refresh, Tune reporting and resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import COMPACT_CONFIG, EFFICIENTNETB1_CONFIG
from xray_ray.config import flat_config, load_config
from xray_ray.model_folder.card import ModelCard
from xray_ray.model_folder.classifier import Classifier

pytestmark = pytest.mark.timeout(900)

TUNE_DEMO_CONFIG = COMPACT_CONFIG.with_name("tune_demo.yaml")
COMPACT = [f"{key}={json.dumps(value)}" for key, value in flat_config(load_config(COMPACT_CONFIG)).items()]


def test_compact_backbone_learns_held_out_phantoms(compact_model):
    _, _, card = compact_model
    assert card["metrics"]["test"]["accuracy"] >= 0.75, card["metrics"]["test"]
    assert card["metrics"]["test"]["n"] >= 80


def test_model_card_describes_the_export(compact_model, learn_index):
    from xray_ray.images.index import fingerprint

    out, _, card = compact_model
    saved = ModelCard.read(out).data
    assert saved["version"] == card["version"] and saved["version"].startswith("compact-")
    assert saved["classes"] == ["COVID", "Lung_Opacity", "Normal", "Viral Pneumonia"]
    assert saved["input"]["size"] == 64 and saved["backbone"] == "compact" and saved["synthetic_data"] is True
    assert saved["index_fingerprint"] == fingerprint(learn_index)
    assert saved["hyperparameters"]["dropout"] == 0.45 and saved["hyperparameters"]["lra_patience"] == 2
    assert saved["config"]["model"]["learning_rate"] == 0.002
    assert {"tensorflow", "keras", "ray"} <= set(saved["versions"])
    assert saved["training"]["stop_reason"] in ("max_epochs", "stop_patience")
    assert 1 <= saved["training"]["best_epoch"] <= saved["training"]["epochs_run"]
    assert set(saved["metrics"]) == {"valid", "test"}


def test_training_report_files_are_valid(compact_model):
    _, reports, card = compact_model
    report = json.loads((reports / "classification_report.json").read_text())
    assert report["accuracy"] == pytest.approx(card["metrics"]["test"]["accuracy"])
    for name in ("confusion_matrix.png", "training_curves.png"):
        width, height = Image.open(reports / name).size
        assert width >= 400 and height >= 300
    html = (reports / "index.html").read_text()
    assert "synthetic" in html.lower() and "compact" in html and "confusion_matrix.png" in html


def test_exported_model_predicts_bytes_and_arrays_alike(compact_model, learn_index):
    out, _, _ = compact_model
    classifier = Classifier(out)
    paths = list(learn_index["path"][:6])
    from_bytes = classifier.predict([open(p, "rb").read() for p in paths])
    probabilities, errors = classifier.predict_files(paths)
    assert errors == [""] * 6
    np.testing.assert_allclose(from_bytes.probabilities, probabilities, rtol=0, atol=1e-6)
    np.testing.assert_allclose(from_bytes.probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert from_bytes.model_version == ModelCard.read(out).data["version"]
    assert from_bytes.probabilities.std(axis=0).max() > 1e-3, "answers do not depend on the image"


def test_undecodable_input_never_reaches_the_model(compact_model):
    from xray_ray.images.decode import ImageDecodeError

    classifier = Classifier(compact_model[0])
    with pytest.raises(ImageDecodeError, match="not an image"):
        classifier.predict([b"this is not an image at all"])
    _, errors = classifier.predict_files(["/nonexistent/file.png"])
    assert errors[0].startswith("unreadable file")


def test_export_refuses_to_overwrite_silently(compact_model, learn_index):
    from xray_ray.training.run import train_and_export

    out, reports, _ = compact_model
    with pytest.raises(FileExistsError, match="already exists"):
        train_and_export(learn_index, load_config(None, COMPACT), out, reports)


def _accuracy(probabilities, y) -> float:
    return float((np.asarray(probabilities).argmax(1) == y).mean())


@pytest.mark.parametrize("config_file, overrides, per_class, floor", [
    # Momentum 0.999 makes the compact CNN's statistics lag on purpose.
    pytest.param(COMPACT_CONFIG, ["model.bn_momentum=0.999", "lra.epochs=12"], 80, 0.5, id="compact"),
    # The origin's momentum (0.99) over a few dozen steps: the lag the issue measured. The
    # training images are few, so this shows EfficientNetB1 learning them, not generalising;
    # benchmarks/bench_train.py holds the longer run with held-out figures. The 56 images fit
    # one refresh batch: averaged over several small batches, this deep network's statistics
    # fall short of the whole set's (measured 0.66 against 0.82 with batches of 32 and 24).
    # Its path over 30 epochs follows the CPU's kernels: 0.82 on one machine, 0.46 (refreshed
    # 0.45, stale 0.25) on an AVX-512 VNNI one. The floor, 0.4 of 56 images, is above chance
    # (0.25) at p = 0.006 (one-sided binomial).
    pytest.param(EFFICIENTNETB1_CONFIG, ["model.bn_momentum=0.99", "lra.epochs=30", "data.split=[0.7, 0.3, 0.0]"], 20,
                 0.4, id="efficientnetb1"),
])
def test_backbone_learns_from_scratch_and_refreshed_inference_matches_batch_statistics(
        learn_index, config_file, overrides, per_class, floor):
    """Learning shown through inference mode (`predict`) once the BatchNorm statistics are refreshed.

    The reference is what the trained weights compute when BatchNorm normalises by the training
    set's own statistics, dropout off; lagging moving averages pull inference mode away from
    it, and the refresh brings it back.
    """
    from xray_ray.training.network import (
        predict_with_batch_statistics,
        refresh_batchnorm,
    )
    from xray_ray.training.run import fit, prepare_training_data

    # No refresh during or after fit (validation's included): the statistics must lag before the refresh below.
    config = load_config(config_file, [*overrides, "train.bn_refresh_batches=0", "train.validation_bn_refresh_batches=0"])
    training = prepare_training_data(learn_index.groupby("label").head(per_class), config)
    model = fit(training, config).model
    rows = training.train.to_pandas()
    x = np.stack([np.asarray(i, np.float32) for i in rows["image"]])
    y = np.stack([np.asarray(v) for v in rows["y"]]).argmax(1)
    learned = _accuracy(predict_with_batch_statistics(model, x, len(x)), y)  # the training set's own statistics
    stale = _accuracy(model.predict(x, verbose=0), y)
    assert learned >= floor, f"training accuracy {learned:.2f} is not clearly above chance (0.25)"
    batch = config.train.bn_refresh_batch_size
    used = refresh_batchnorm(model, (x[i:i + batch] for i in range(0, len(x), batch)), 50)
    refreshed = _accuracy(model.predict(x, verbose=0), y)
    assert used == -(-len(x) // batch)
    assert abs(refreshed - learned) <= 0.1, (stale, refreshed, learned)
    assert refreshed > stale, (stale, refreshed, learned)


def test_validation_describes_the_model_from_the_first_epochs(learn_index):
    """Validation runs on BatchNorm statistics re-estimated for the current weights. With the
    moving averages the demo's settings (tune_demo.yaml) read exactly chance (0.25) at epochs 1-3
    while training accuracy climbed (issue 16; benchmarks/bench_validation.py): at epoch 2, 0.25
    against 0.36. Validation must now be above chance whenever training is, i.e. never far below
    the training figure (capped at 0.45: two epochs, a few hundred phantoms)."""
    from xray_ray.training.run import fit, prepare_training_data

    config = load_config(TUNE_DEMO_CONFIG, ["lra.epochs=2"])
    history = fit(prepare_training_data(learn_index, config), config).epochs
    train, val = history[1]["accuracy"], history[1]["val_accuracy"]
    assert val >= min(train, 0.45) - 0.05, history


def _missing_weights_config(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    return tmp_path / "keras" / "models"


def test_weights_error_names_the_file_and_folder(tmp_path, monkeypatch):
    from xray_ray.config_training import ModelConfig
    from xray_ray.training import network as model

    folder = _missing_weights_config(tmp_path, monkeypatch)
    with pytest.raises(model.WeightsUnavailableError) as err:
        model.resolve_weights(ModelConfig(weights="imagenet"))
    message = str(err.value)
    assert f"the file efficientnetb1_notop.h5 in the folder {folder}" in message
    assert "model.weights=none" in message and "nothing is downloaded" in message
    with pytest.raises(model.WeightsUnavailableError, match="no pretrained weights"):
        model.resolve_weights(ModelConfig(backbone="compact", weights="imagenet"))
    with pytest.raises(model.WeightsUnavailableError, match="no such file"):
        model.resolve_weights(ModelConfig(weights=str(tmp_path / "missing.h5")))


def test_jobs_fail_on_missing_weights_before_any_work(tmp_path, monkeypatch):
    """`xray-ray tune` / `train` with weights: imagenet and no file: the error comes from reading the
    config, before an index is read or Ray started."""
    from xray_ray.training.network import WeightsUnavailableError
    from xray_ray.training.run import train_and_export
    from xray_ray.tuning.experiment import load_experiment_config

    folder = _missing_weights_config(tmp_path, monkeypatch)
    with pytest.raises(WeightsUnavailableError, match=str(folder)):
        load_experiment_config(Path(COMPACT_CONFIG).with_name("tune_real.yaml"))
    with pytest.raises(WeightsUnavailableError, match=str(folder)):
        train_and_export(None, load_config(None), tmp_path / "model", tmp_path / "report")


def _save_keras_release_layout(model, path: Path) -> None:
    """Weights in the legacy HDF5 layout of Keras's published `*_notop.h5` files (Keras 3's
    `save_weights` writes only its own `.weights.h5` format)."""
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, model)


@pytest.fixture(scope="module")
def offline_weights(tmp_path_factory):
    """An EfficientNetB1 notop with random weights, saved where `weights: imagenet` looks for them."""
    import keras

    home = tmp_path_factory.mktemp("keras_home")
    keras.utils.set_random_seed(99)
    notop = keras.applications.EfficientNetB1(include_top=False, weights=None, input_shape=(64, 64, 3),
                                             pooling="max")
    path = home / "models" / "efficientnetb1_notop.h5"
    _save_keras_release_layout(notop, path)
    return home, path, notop.get_layer("stem_conv").get_weights()[0]


@pytest.mark.parametrize("weights", ["imagenet", "path"])
def test_offline_imagenet_weights_are_loaded_and_kept_through_training(offline_weights, learn_index, weights,
                                                                       monkeypatch):
    """One epoch with the backbone frozen (`model.trainable=head`): the backbone must hold exactly the
    placed file's weights, whether found through KERAS_HOME (`imagenet`) or given as a path."""
    from xray_ray.training.run import fit, prepare_training_data

    home, path, stem = offline_weights
    monkeypatch.setenv("KERAS_HOME", str(home))
    config = load_config(None, ["data.image_size=64", "data.split=[0.5, 0.5, 0.0]", "data.batch_size=16",
                                f"model.weights={'imagenet' if weights == 'imagenet' else path}",
                                "model.trainable=head", "lra.epochs=1"])
    result = fit(prepare_training_data(learn_index.groupby("label").head(8), config), config)
    assert len(result.epochs) == 1
    loaded = result.model.get_layer("backbone").get_layer("stem_conv").get_weights()[0]
    np.testing.assert_array_equal(loaded, stem)


@pytest.mark.parametrize("trainable, frozen_first", [("head", True), ("block7a", True), ("all", False)])
def test_trainability_choices(trainable, frozen_first):
    from xray_ray.config_training import ModelConfig
    from xray_ray.training.network import build_model

    model = build_model(ModelConfig(weights="none", trainable=trainable), 64)
    backbone = model.get_layer("backbone")
    assert backbone.layers[3].trainable is not frozen_first
    assert model.get_layer("head_dense").trainable and model.optimizer is not None
    if trainable == "block7a":
        assert backbone.get_layer("top_conv").trainable


def test_efficientnetb1_end_to_end_fit_export_reload(learn_index, tmp_path):
    """The origin's network through the same path: fit with LRA, BN refresh, export, reload, identical answers."""
    from xray_ray.model_folder import export
    from xray_ray.model_folder.card import build_card
    from xray_ray.training.run import fit, prepare_training_data

    small = learn_index.groupby("label").head(12)
    config = load_config(None, ["data.image_size=64", "data.split=[0.5, 0.5, 0.0]", "model.weights=none",
                                "lra.epochs=2", "train.bn_refresh_batches=2", "data.batch_size=16",
                                "train.bn_refresh_batch_size=16"])
    training = prepare_training_data(small, config)
    result = fit(training, config)
    assert len(result.epochs) == 2 and result.bn_refresh_batches == 2
    card = build_card("effb1", config, training={"epochs_run": 2}, index_fingerprint="x", split_counts={},
                      synthetic=True)
    export.export_model(result.model, tmp_path / "effb1", card)
    images = np.stack([np.asarray(i, np.float32) for i in training.valid.to_pandas()["image"]])
    expected = np.asarray(result.model.predict_on_batch(images))
    got = Classifier(tmp_path / "effb1", engine="keras").predict_arrays(images).probabilities
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def test_tune_trainable_reports_each_epoch_and_resumes_from_its_checkpoint(learn_index, tmp_path):
    """A trial that fails after epoch 1 is retried by Tune and continues at epoch 2 from its checkpoint."""
    from ray import tune

    from xray_ray.training.run import prepare_training_data, tune_trainable

    config = load_config(None, COMPACT + ["lra.epochs=3"])
    training = prepare_training_data(learn_index.groupby("label").head(30), config)
    marker = tmp_path / "failed-once"

    def flaky(params, training, config):
        if not marker.exists():
            marker.touch()
            tune_trainable({**params, "lra.epochs": 1}, training, config)
            raise RuntimeError("simulated worker loss after epoch 1")
        tune_trainable(params, training, config)

    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(flaky, training=training, config=config), {"cpu": 1}),
        param_space={"model.dropout": 0.3},
        run_config=tune.RunConfig(storage_path=str(tmp_path / "tune"), name="resume",
                                  failure_config=tune.FailureConfig(max_failures=1),
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=2)),
    )
    results = tuner.fit()
    assert not results.errors
    history = results[0].metrics_dataframe
    # The retry starts at epoch 2 (epoch 1's report may be lost with the failed attempt; its checkpoint is not).
    epochs = history["epoch"].tolist()
    assert epochs[-2:] == [2, 3] and epochs.count(1) <= 1, epochs
    assert {"loss", "accuracy", "val_loss", "val_accuracy", "lr", "best_epoch"} <= set(history.columns)
    assert results[0].checkpoint is not None
    state = json.loads((Path(results[0].checkpoint.to_directory()) / "state.json").read_text())
    assert state["epoch"] == 3 and len(state["lra"]["epochs"]) == 3


def test_cli_evaluate_reproduces_the_cards_test_split(compact_model, learn_index, tmp_path):
    from typer.testing import CliRunner

    from xray_ray.cli import app
    from xray_ray.images.index import save_index

    out, _, card = compact_model
    save_index(learn_index, tmp_path / "index.parquet")
    result = CliRunner().invoke(app, ["evaluate", "--model", str(out), "--index", str(tmp_path / "index.parquet"),
                                      "--split", "test", "--report-dir", str(tmp_path / "eval")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "eval" / "classification_report.json").read_text())
    assert report["accuracy"] == pytest.approx(card["metrics"]["test"]["accuracy"])
    assert "differs" not in result.output


def _older_layout(folder: Path) -> None:
    """Rewrite `folder`'s ood.npz as an xray-ray before the layout version wrote it, its card's digest to match."""
    from tests.helpers import write_first_layout
    from xray_ray.files import sha256_file
    from xray_ray.model_folder.card import OOD_FILE

    write_first_layout(folder / OOD_FILE, folder / OOD_FILE)
    card = ModelCard.read(folder)
    card.update(files={**card["files"], OOD_FILE: {"sha256": sha256_file(folder / OOD_FILE)}})


def test_cli_refit_brings_an_older_folder_back_to_what_its_export_fitted(compact_model, learn_index, tmp_path):
    import shutil

    from typer.testing import CliRunner

    from xray_ray.cli import app
    from xray_ray.images.index import save_index
    from xray_ray.model_folder.card import OOD_FILE
    from xray_ray.config_services import ScoreConfig, ServeConfig
    from xray_ray.scoring.preflight import ScoreError, model_info
    from xray_ray.serving.settings import checked_model

    exported, _, _ = compact_model
    folder = shutil.copytree(exported, tmp_path / "older")
    with np.load(folder / OOD_FILE) as arrays:
        fitted = {key: arrays[key] for key in arrays.files}
    before = ModelCard.read(folder)
    before.update(golden=None)  # exported before golden sets, too
    _older_layout(folder)
    with pytest.raises(ValueError, match="xray-ray refit --model"):
        Classifier(folder)
    # Serve and scoring refuse it before any replica or actor starts, with the same way out.
    with pytest.raises(ScoreError, match="xray-ray refit --model") as refused:
        model_info(ScoreConfig(archives=[str(tmp_path)], out=str(tmp_path / "scores"), model=str(folder)))
    assert refused.value.exit_code == 3
    with pytest.raises(ValueError, match="xray-ray refit --model"):
        checked_model(ServeConfig(model=str(folder)))

    save_index(learn_index, tmp_path / "index.parquet")
    other = learn_index.iloc[5:].reset_index(drop=True)  # not the training index: refused, nothing changed
    save_index(other, tmp_path / "other.parquet")
    stale = (folder / OOD_FILE).read_bytes()
    refused = CliRunner().invoke(app, ["refit", "--model", str(folder), "--index", str(tmp_path / "other.parquet")])
    assert refused.exit_code == 2 and "not the one" in refused.output, refused.output
    assert (folder / OOD_FILE).read_bytes() == stale

    result = CliRunner().invoke(app, ["refit", "--model", str(folder), "--index", str(tmp_path / "index.parquet")])
    assert result.exit_code == 0, result.output
    assert before.version in result.output
    with np.load(folder / OOD_FILE) as arrays:
        refitted = {key: arrays[key] for key in arrays.files}
    assert refitted.keys() == fitted.keys()
    for key, value in fitted.items():
        np.testing.assert_allclose(refitted[key], value, rtol=1e-6, atol=1e-9, err_msg=key)
    after = ModelCard.read(folder)
    assert after["ood"]["threshold"] == before["ood"]["threshold"]
    assert after["ood"]["valid_flag_rate"] == pytest.approx(before["ood"]["valid_flag_rate"])
    assert after["calibration"]["method"] == before["calibration"]["method"]
    assert after["metrics"]["test"]["accuracy"] == pytest.approx(before["metrics"]["test"]["accuracy"])
    assert after.version == before.version  # the network and its version are untouched
    classifier = Classifier(folder)  # reads the new layout, digest verified, golden set answered
    assert classifier.detector is not None
    exported_golden = ModelCard.read(exported)["golden"]["images"]  # refit recorded it again, as the export did
    assert [image["input_sha256"] for image in after["golden"]["images"]] == \
        [image["input_sha256"] for image in exported_golden]
    np.testing.assert_allclose([image["probabilities"] for image in after["golden"]["images"]],
                               [image["probabilities"] for image in exported_golden], atol=1e-6)
    assert after["files"]["golden.npz"]["sha256"] == after["golden"]["sha256"]
