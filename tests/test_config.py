"""Config loading: defaults, YAML, dotted overrides, and clear errors."""

import numpy as np
import pandas as pd
import pytest

from xray_ray.config import (
    CLASS_NAMES,
    canonical_label,
    config_to_dict,
    flat_config,
    load_config,
    with_overrides,
)


@pytest.mark.parametrize(
    "folder, label",
    [
        ("COVID", "COVID"),
        ("covid", "COVID"),
        ("Lung_Opacity", "Lung_Opacity"),
        ("lung opacity", "Lung_Opacity"),
        ("LUNG-OPACITY", "Lung_Opacity"),
        ("Viral Pneumonia", "Viral Pneumonia"),
        ("viral_pneumonia", "Viral Pneumonia"),
        ("NORMAL", "Normal"),
        ("pneumonia", None),
        ("masks", None),
    ],
)
def test_canonical_label(folder, label):
    assert canonical_label(folder) == label


def test_class_order_is_the_models_output_order(tmp_path):
    """The origin's Keras generator numbered the classes alphabetically: output i is the i-th name in sorted order.
    Training's one-hot targets put each class at that output, and a model card listing the classes in another
    order is refused, so no engine reads an output as another class."""
    from xray_ray.model_folder.card import ModelCard
    from xray_ray.training.data import one_hot

    origin = sorted(["Normal", "Viral Pneumonia", "COVID", "Lung_Opacity"])
    assert one_hot(origin).tolist() == np.eye(4).tolist()
    card = {"input": {"size": 64}, "version": "v1"}
    ModelCard(tmp_path, {"classes": origin, **card}).check()
    for other_order in (origin[::-1], [origin[1], origin[0], *origin[2:]]):
        with pytest.raises(ValueError, match="classes"):
            ModelCard(tmp_path, {"classes": other_order, **card}).check()


def test_default_settings_prepare_the_data_the_origins_way(ray_local):
    """Without settings, the index is split 90/5/5 per class with seed 123 and every training class is cut to
    the smallest one's count, as the origin did (here on its class sizes divided by ten)."""
    from xray_ray.training import data

    sizes = {"COVID": 362, "Lung_Opacity": 601, "Normal": 1019, "Viral Pneumonia": 135}
    frame = pd.DataFrame([{"path": f"/d/{label}/{i}.png", "label": label, "sha256": f"{label}-{i}", "readable": True}
                          for label, n in sizes.items() for i in range(n)])
    settings = load_config().data
    datasets, split = data.prepare(frame, settings.split, settings.seed, settings.balance)
    counts = split.counts()
    for label, n in sizes.items():
        assert counts["train"][label] == round(0.9 * n)
        assert abs(counts["valid"][label] - 0.05 * n) <= 1 and abs(counts["test"][label] - 0.05 * n) <= 1
    assert data.class_counts(datasets["train"].to_pandas()) == dict.fromkeys(CLASS_NAMES, round(0.9 * 135))
    assert split.test["path"].tolist() == data.split_index(frame, seed=123).test["path"].tolist()
    assert split.test["path"].tolist() != data.split_index(frame, seed=124).test["path"].tolist()


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  image_size: 96\n  seed: 7\n")
    config = load_config(path, ["data.seed=9", "data.split=[0.8, 0.1, 0.1]"])
    assert (config.data.image_size, config.data.seed, config.data.split) == (96, 9, (0.8, 0.1, 0.1))
    assert config_to_dict(config)["data"]["seed"] == 9


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.nope=1"], "unknown setting"),
        (["nosection.x=1"], "unknown setting"),
        (["data.split=[0.5, 0.2]"], "three non-negative fractions"),
        (["data.balance=oversample"], "undersample, class_weights or none"),
        (["data.seed"], "section.key=value"),
    ],
)
def test_bad_settings_say_what_is_wrong(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, overrides)


def test_flat_config_and_overrides_round_trip():
    config = load_config()
    flat = flat_config(config)
    assert flat["model.dropout"] == 0.45 and flat["lra.patience"] == 1
    changed = with_overrides(config, {"model.dropout": 0.3, "lra.patience": 2})
    assert (changed.model.dropout, changed.lra.patience, config.model.dropout) == (0.3, 2, 0.45)
    with pytest.raises(ValueError, match="lra.factor"):
        with_overrides(config, {"lra.factor": 1.5})


@pytest.mark.parametrize(
    "override, key, value",
    [("model.l1=1e-05", "l1", 1e-05), ("model.l2=0", "l2", 0.0), ("model.units=128", "units", 128),
     ("model.backbone=compact", "backbone", "compact"), ("model.weights=/w/x.h5", "weights", "/w/x.h5")],
)
def test_override_values_take_the_settings_type(override, key, value):
    got = getattr(load_config(None, [override]).model, key)
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize("override", ["model.units=12.5", "model.l2=abc"])
def test_wrong_types_are_refused(override):
    with pytest.raises(ValueError, match="must be a"):
        load_config(None, [override])
