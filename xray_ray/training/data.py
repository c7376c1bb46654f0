"""From the index to what training needs: a stratified split, a balanced training set, and batches.

The split is a pure function of the index's content and the seed, and keeps every copy
of an image (same sha256) in one split, so duplicates cannot leak from train into test.
Image loading runs on Ray Data, so the same code scales from a laptop to a cluster;
TensorFlow only sees the final batches.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

from xray_ray.config import CLASS_NAMES
from xray_ray.images.decode import ImageDecodeError, read_image
from xray_ray.images.preprocess import preprocess

log = logging.getLogger(__name__)
SPLITS = ("train", "valid", "test")


@dataclass
class Split:
    """The three parts of an index, and what the split noticed about duplicates."""

    train: pd.DataFrame
    valid: pd.DataFrame
    test: pd.DataFrame
    duplicate_rows: int  # rows whose content also appears in another row
    conflicting_rows: int  # rows left out: the same content carries two labels

    def part(self, name: str) -> pd.DataFrame:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; choose one of {', '.join(SPLITS)}")
        return getattr(self, name)

    def counts(self) -> dict[str, dict[str, int]]:
        """Per-split, per-class row counts."""
        return {name: class_counts(self.part(name)) for name in SPLITS}


def class_counts(frame: pd.DataFrame) -> dict[str, int]:
    """Rows per class, in canonical class order."""
    return {label: int((frame["label"] == label).sum()) for label in CLASS_NAMES}


def _quotas(n: int, fractions: tuple[float, float, float]) -> list[int]:
    train = round(fractions[0] * n)
    valid = round(fractions[1] * n)
    return [train, valid, n - train - valid]


def split_index(frame: pd.DataFrame, fractions=(0.9, 0.05, 0.05), seed: int = 123) -> Split:
    """Stratified split of the usable rows; copies of one image always land in the same part."""
    usable = frame[frame["readable"]].sort_values("path", ignore_index=True)
    labels_per_hash = usable.groupby("sha256")["label"].nunique()
    conflicting = set(labels_per_hash[labels_per_hash > 1].index)
    if conflicting:
        log.warning("%d images carry two different labels; they are left out of every split", len(conflicting))
    clean = usable[~usable["sha256"].isin(conflicting)]
    sizes = clean.groupby("sha256").size()
    assignment: dict[str, str] = {}
    for class_index, label in enumerate(CLASS_NAMES):
        groups = clean[clean["label"] == label].groupby("sha256").size().sort_index()
        order = np.random.default_rng([seed, class_index]).permutation(len(groups))
        quotas = _quotas(int(groups.sum()), fractions)
        filled = [0, 0, 0]
        for position in order:
            digest, size = groups.index[position], int(groups.iloc[position])
            part = next((i for i in range(3) if filled[i] < quotas[i]), 2)
            assignment[digest] = SPLITS[part]
            filled[part] += size
    parts = clean["sha256"].map(assignment)
    return Split(
        *(clean[parts == name].reset_index(drop=True) for name in SPLITS),
        duplicate_rows=int(sizes[sizes > 1].sum()),
        conflicting_rows=int(usable["sha256"].isin(conflicting).sum()),
    )


def class_weights(frame: pd.DataFrame) -> dict[int, float]:
    """Keras `class_weight`: the alternative to undersampling, inverse to class frequency."""
    counts = class_counts(frame)
    total, present = sum(counts.values()), sum(1 for c in counts.values() if c)
    return {i: (total / (present * counts[label]) if counts[label] else 0.0) for i, label in enumerate(CLASS_NAMES)}


def undersample(frame: pd.DataFrame, seed: int = 123) -> pd.DataFrame:
    """Cut every class to the smallest class's count; the same rows for the same seed and index.

    This works on index rows (paths and labels, not images), so it runs in the driver
    in milliseconds even for the full database; a Ray Data groupby shuffle cost about
    20 s per call on a 2-core machine for the same result. Images are loaded afterwards
    on Ray Data, from the kept rows only.
    """
    counts = {label: n for label, n in class_counts(frame).items() if n}
    keep = min(counts.values())
    parts = []
    for label in counts:
        group = frame[frame["label"] == label].sort_values("path")
        rng = np.random.default_rng([seed, CLASS_NAMES.index(label)])
        parts.append(group.iloc[np.sort(rng.choice(len(group), size=keep, replace=False))])
    return pd.concat(parts, ignore_index=True)


def one_hot(labels) -> np.ndarray:
    """Labels as one-hot float32 rows in canonical class order."""
    index = np.array([CLASS_NAMES.index(label) for label in labels])
    return np.eye(len(CLASS_NAMES), dtype=np.float32)[index]


def _load_batch(batch: pd.DataFrame, size: int) -> dict[str, np.ndarray]:
    images, labels = [], []
    for path, label in zip(batch["path"], batch["label"]):
        try:
            images.append(preprocess(read_image(path), size).astype(np.uint8))
            labels.append(label)
        except ImageDecodeError as err:
            log.warning("%s was readable when indexed but is not now (%s); skipped", path, err.reason)
    empty = np.zeros((0, size, size, 3), np.uint8)
    return {
        "image": np.stack(images) if images else empty,
        "y": one_hot(labels) if labels else np.zeros((0, len(CLASS_NAMES)), np.float32),
        "label": np.array(labels, dtype=object),
    }


def load_images(ds, size: int):
    """Decode and preprocess (images.preprocess, as everywhere) into `image` and one-hot `y` columns."""
    return ds.map_batches(_load_batch, fn_kwargs={"size": size}, batch_format="pandas", batch_size=32)


def prepare(frame: pd.DataFrame, fractions, seed: int, balance: str):
    """Split the index and return Ray Datasets of rows (not yet images) per part, plus the split.

    `balance`: `undersample` cuts the training classes to the smallest; `class_weights`
    and `none` keep every training row.
    """
    import ray

    split = split_index(frame, fractions, seed)
    train = undersample(split.train, seed) if balance == "undersample" else split.train
    # The split keeps rows sorted by path, which groups them by class, and to_tf's shuffle buffer
    # only mixes neighbours: batches would hold one class each, and BatchNorm and every gradient
    # step would see one class at a time. One seeded permutation of the rows fixes the order.
    train = train.sample(frac=1.0, random_state=seed, ignore_index=True)
    datasets = {"train": ray.data.from_pandas(train)}
    datasets.update({name: ray.data.from_pandas(split.part(name)) for name in ("valid", "test")})
    return datasets, split


def to_tf(ds, batch_size: int, training: bool, seed: int = 123):
    """A tf.data pipeline over a (materialized) image dataset; random horizontal flips on training only.

    The flips come from a Keras layer, whose seed state moves on every epoch; a seeded
    `tf.image` random op restarts with each pass over the data and flips the same images
    every epoch, which is no augmentation at all.
    """
    import keras
    import tensorflow as tf

    tfds = ds.to_tf(
        feature_columns="image",
        label_columns="y",
        batch_size=batch_size,
        local_shuffle_buffer_size=4 * batch_size if training else None,
        local_shuffle_seed=seed if training else None,
    )
    # Ray's generator has no known length; stating it lets Keras count steps (and not warn).
    tfds = tfds.apply(tf.data.experimental.assert_cardinality(-(-ds.count() // batch_size)))
    tfds = tfds.map(lambda x, y: (tf.cast(x, tf.float32), y))
    if training:
        flip = keras.layers.RandomFlip("horizontal", seed=seed)
        tfds = tfds.map(lambda x, y: (flip(x, training=True), y))
    return tfds.prefetch(tf.data.AUTOTUNE)
