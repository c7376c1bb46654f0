"""Split, balancing and TensorFlow batches built from an index."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest

from xray_ray.config import CLASS_NAMES
from xray_ray.images import decode as imaging
from xray_ray.images.preprocess import preprocess
from xray_ray.training import data

pytestmark = pytest.mark.timeout(300)

SIZES = {"COVID": 400, "Lung_Opacity": 250, "Normal": 600, "Viral Pneumonia": 120}


def fake_index(sizes=SIZES, duplicates=0, conflicts=0, seed=0) -> pd.DataFrame:
    """An index without files: what split logic sees. Adds exact copies and label conflicts on request."""
    rows = [
        {"path": f"/d/{label}/{i}.png", "label": label, "sha256": f"{label}-{i}", "readable": True}
        for label, n in sizes.items()
        for i in range(n)
    ]
    rng = np.random.default_rng(seed)
    for k in rng.choice(len(rows), duplicates, replace=False):
        rows.append({**rows[k], "path": rows[k]["path"] + ".copy"})
    for k in rng.choice(len(rows), conflicts, replace=False):
        other = next(label for label in CLASS_NAMES if label != rows[k]["label"])
        rows.append({**rows[k], "path": rows[k]["path"] + ".relabelled", "label": other})
    rows.append({"path": "/d/bad.png", "label": "COVID", "sha256": "", "readable": False})
    return pd.DataFrame(rows)


def test_split_is_stratified_90_5_5():
    split = data.split_index(fake_index())
    counts = split.counts()
    for label, n in SIZES.items():
        assert counts["train"][label] == round(0.9 * n)
        assert abs(counts["valid"][label] - 0.05 * n) <= 1 and abs(counts["test"][label] - 0.05 * n) <= 1
        assert sum(counts[part][label] for part in data.SPLITS) == n


def test_split_is_deterministic_and_seeded():
    frame = fake_index(duplicates=30)
    first, again = data.split_index(frame, seed=5), data.split_index(frame.sample(frac=1, random_state=1), seed=5)
    other = data.split_index(frame, seed=6)
    for part in data.SPLITS:
        assert first.part(part)["path"].tolist() == again.part(part)["path"].tolist()
    assert first.test["path"].tolist() != other.test["path"].tolist()


def test_duplicates_never_straddle_splits_and_conflicts_are_left_out():
    frame = fake_index(duplicates=80, conflicts=10)
    split = data.split_index(frame)
    owner = {}
    for part in data.SPLITS:
        for digest in split.part(part)["sha256"]:
            assert owner.setdefault(digest, part) == part
    assert split.duplicate_rows >= 2 * 80 - 20  # some copies may have been relabelled
    relabelled = set(frame.loc[frame["path"].str.endswith(".relabelled"), "sha256"])
    assert split.conflicting_rows == frame["sha256"].isin(relabelled).sum() >= 20
    assert all("relabelled" not in p for part in data.SPLITS for p in split.part(part)["path"])
    assert "/d/bad.png" not in set().union(*(set(split.part(p)["path"]) for p in data.SPLITS))


def test_class_weights_are_inverse_frequency():
    weights = data.class_weights(pd.DataFrame({"label": ["COVID"] * 30 + ["Normal"] * 10}))
    assert weights[0] == pytest.approx(40 / 60) and weights[2] == pytest.approx(2.0)
    assert weights[1] == weights[3] == 0.0


def test_undersampling_equalises_classes_deterministically():
    frame = data.split_index(fake_index()).train
    first, again = data.undersample_frame(frame, 3), data.undersample_frame(frame.sample(frac=1, random_state=2), 3)
    smallest = min(data.class_counts(frame).values())
    assert data.class_counts(first) == {label: smallest for label in CLASS_NAMES}
    assert first["path"].tolist() == again["path"].tolist()
    assert sorted(data.undersample_frame(frame, 4)["path"]) != sorted(first["path"])
    assert set(first["path"]) <= set(frame["path"])


def test_undersampling_on_ray_data_keeps_the_same_rows_as_pandas(ray_local):
    import ray

    frame = data.split_index(fake_index()).train
    for seed in (3, 4):
        reference = data.undersample_frame(frame, seed)
        rows = frame.sample(frac=1, random_state=seed)
        shuffled = ray.data.from_pandas([rows.iloc[i::5] for i in range(5)])  # any order, several blocks
        kept = data.undersample(shuffled, seed).to_pandas()
        assert data.class_counts(kept) == data.class_counts(reference)
        assert sorted(kept["path"]) == sorted(reference["path"])


def test_prepare_balances_only_training(ray_local):
    datasets, split = data.prepare(fake_index(), (0.9, 0.05, 0.05), 123, "undersample")
    train = datasets["train"].to_pandas()
    assert len(set(data.class_counts(train).values())) == 1
    assert datasets["test"].count() == len(split.test)
    unbalanced, _ = data.prepare(fake_index(), (0.9, 0.05, 0.05), 123, "class_weights")
    assert unbalanced["train"].count() == len(split.train)


def test_training_rows_mix_the_classes_in_a_fixed_order(ray_local):
    """The index is sorted by path (so by class); batches cut from it must still mix the classes,
    and the balanced rows come in the order the driver-side undersampling gives them."""
    def train_rows():
        datasets, _ = data.prepare(fake_index(), (0.9, 0.05, 0.05), 123, "undersample")
        return datasets["train"].to_pandas()

    labels = train_rows()["label"].tolist()
    assert all(len(set(labels[i:i + 16])) >= 3 for i in range(0, len(labels) - 16, 16))
    assert train_rows()["label"].tolist() == labels
    reference = data.undersample_frame(data.split_index(fake_index()).train, 123)
    assert train_rows()["path"].tolist() == reference.sample(frac=1.0, random_state=123)["path"].tolist()


@pytest.fixture(scope="module")
def phantom_split(ray_local, phantom_root):
    from xray_ray.images.index import build_index

    frame, _ = build_index(phantom_root)
    return data.split_index(frame, (0.5, 0.25, 0.25), seed=0)


def test_image_batches_use_the_shared_preprocessing(phantom_split):
    import ray

    images = data.load_images(ray.data.from_pandas(phantom_split.valid), size=64).to_pandas()
    row = images.iloc[0]
    expected = preprocess(imaging.read_image(phantom_split.valid["path"].iloc[0]), 64)
    assert np.array_equal(np.asarray(row["image"]), expected.astype(np.uint8))
    assert np.asarray(row["y"]).tolist() == data.one_hot([row["label"]])[0].tolist()


def test_tf_batches_flip_on_training_only_and_afresh_each_epoch(phantom_split):
    import ray

    ds = data.load_images(ray.data.from_pandas(phantom_split.valid), size=64).materialize()
    reference = {bytes(np.asarray(img, np.uint8)) for img in ds.to_pandas()["image"]}
    flipped = {bytes(np.asarray(img, np.uint8)[:, ::-1].copy()) for img in ds.to_pandas()["image"]}

    def seen(training):
        batches = [x.numpy().astype(np.uint8) for _ in range(3) for x, _ in data.to_tf(ds, 8, training=training)]
        return [bytes(img) for batch in batches for img in batch]

    plain = seen(training=False)
    assert set(plain) <= reference and len(plain) == 3 * len(reference)
    augmented = seen(training=True)
    assert set(augmented) <= reference | flipped
    assert set(augmented) & (flipped - reference), "training batches were never flipped"
    pipeline = data.to_tf(ds, 8, training=True)  # as fit uses it: one pipeline, one pass per epoch
    epochs = [sorted(bytes(img) for x, _ in pipeline for img in x.numpy().astype(np.uint8)) for _ in range(3)]
    assert len({tuple(epoch) for epoch in epochs}) > 1, "every epoch flipped the same images"
    for x, y in data.to_tf(ds, 8, training=False).take(1):
        assert x.dtype.name == "float32" and x.shape[1:] == (64, 64, 3) and y.shape[1:] == (4,)


def _epoch_order(pipeline) -> list[bytes]:
    """One pass over a training pipeline as image identities (an image and its mirror count as one)."""
    seen = []
    for x, _ in pipeline:
        for img in x.numpy().astype(np.uint8):
            seen.append(min(bytes(img), bytes(img[:, ::-1].copy())))
    return seen


def test_training_order_is_new_every_epoch_and_repeats_with_the_seed(phantom_split):
    ds = data.load_images(data.row_blocks(phantom_split.train), size=32).materialize()
    pipeline = data.to_tf(ds, 4, training=True, seed=7)
    epochs = [_epoch_order(pipeline) for _ in range(3)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == sorted(epochs[2]), "every image once per epoch"
    for first, second in itertools.combinations(range(3), 2):
        assert epochs[first] != epochs[second], f"epochs {first} and {second} saw the same order"
    again = data.to_tf(ds, 4, training=True, seed=7)
    assert [_epoch_order(again) for _ in range(3)] == epochs
    assert _epoch_order(data.to_tf(ds, 4, training=True, seed=7, first_epoch=2)) == epochs[2], "resume continues"
    assert _epoch_order(data.to_tf(ds, 4, training=True, seed=8)) != epochs[0]
    plain = data.to_tf(ds, 4, training=False)
    assert _epoch_order(plain) == _epoch_order(plain), "evaluation keeps one order"
