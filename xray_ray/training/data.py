"""From the index to what training needs: a stratified split, a balanced training set, and batches.

The split is a pure function of the index's content and the seed, and keeps every copy
of an image (same sha256) in one split, so duplicates cannot leak from train into test.
Undersampling and image loading run on Ray Data, so the same code scales from a laptop to a
cluster; TensorFlow only sees the final batches, in a new seeded order every epoch, drawn over
the loaded images in memory (no Ray Data pass per epoch).
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

from xray_ray.config import CLASS_NAMES
from xray_ray.images.decode import ImageDecodeError, read_image
from xray_ray.images.preprocess import preprocess
from xray_ray.ray_runtime import require_ray

log = logging.getLogger(__name__)
SPLITS = ("train", "valid", "test")
BLOCK_ROWS = 32  # rows per Ray Data block of index rows: the unit of parallel image loading


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


def _keep_of_class(group: pd.DataFrame, label: str, keep: int, seed: int) -> pd.DataFrame:
    """`keep` rows of one class: a seeded choice among its rows sorted by path (so input order never matters)."""
    group = group.sort_values("path")
    rng = np.random.default_rng([seed, CLASS_NAMES.index(label)])
    return group.iloc[np.sort(rng.choice(len(group), size=keep, replace=False))]


def undersample_frame(frame: pd.DataFrame, seed: int = 123) -> pd.DataFrame:
    """Undersampling on the driver, in pandas: the reference `undersample` must equal (tests, benchmark)."""
    counts = {label: n for label, n in class_counts(frame).items() if n}
    keep = min(counts.values())
    return pd.concat([_keep_of_class(frame[frame["label"] == label], label, keep, seed) for label in counts],
                     ignore_index=True)


def _count_labels(block: pd.DataFrame) -> pd.DataFrame:
    return block.groupby("label").size().rename("rows").reset_index()


def _keep_batch(group: pd.DataFrame, keep: int, seed: int) -> pd.DataFrame:
    return _keep_of_class(group, group["label"].iloc[0], keep, seed)


def undersample(ds, seed: int = 123):
    """Cut every class of a Ray Dataset of index rows to the smallest class's count, on Ray Data.

    Exact per-class counts (rows per label counted block by block, then one seeded choice per
    class group), and the same rows as `undersample_frame` for the same seed and index. The
    groupby shuffle is sized to the data: one partition per class present, not Ray's default
    200, and sort-based, since Ray's default (hash shuffle) starts aggregator actors that cost
    seconds for a few thousand index rows (benchmarks/bench_undersample.py). That setting goes
    on `ds`'s own copy of Ray Data's settings (`ds.context`). Returns a Dataset of the kept rows.
    """
    from ray.data.context import ShuffleStrategy  # Ray is imported late: the split needs only pandas

    per_block = ds.map_batches(_count_labels, batch_format="pandas", batch_size=None).to_pandas()
    counts = per_block.groupby("label")["rows"].sum()
    keep = int(counts.min())
    ds.context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    return ds.groupby("label", num_partitions=len(counts)).map_groups(
        _keep_batch, fn_kwargs={"keep": keep, "seed": seed}, batch_format="pandas")


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
    """Decode and preprocess (images.preprocess, as everywhere) into `image` and one-hot `y` columns.

    The output keeps the rows' order. By default Ray Data hands blocks on in the order their
    tasks finish, which can vary from run to run; the stored order decides which images each
    epoch's permutation (`epoch_order`) and the BatchNorm refreshes read, so without this two
    runs with the same seed would train differently. Set on `ds`'s own copy of the settings.
    """
    ds.context.execution_options.preserve_order = True
    return ds.map_batches(_load_batch, fn_kwargs={"size": size}, batch_format="pandas", batch_size=32)


def row_blocks(frame: pd.DataFrame):
    """A Ray Dataset of `frame` in blocks of BLOCK_ROWS rows: the unit of parallel image loading."""
    import ray

    chunks = [frame.iloc[i:i + BLOCK_ROWS] for i in range(0, len(frame), BLOCK_ROWS)]
    return ray.data.from_pandas(chunks or [frame])


def prepare(frame: pd.DataFrame, fractions, seed: int, balance: str):
    """Split the index and return Ray Datasets of rows (not yet images) per part, plus the split.

    `balance`: `undersample` cuts the training classes to the smallest (on Ray Data);
    `class_weights` and `none` keep every training row.
    """
    require_ray("preparing training data")
    import ray

    split = split_index(frame, fractions, seed)
    train = split.train
    if balance == "undersample":
        # The kept index rows (paths and labels, not images) come back to the driver to be put in
        # one seeded order: class by class, by path, as `undersample_frame` returns them.
        kept = undersample(ray.data.from_pandas(split.train), seed).to_pandas()  # index rows: one block
        rank = kept["label"].map(CLASS_NAMES.index)
        train = kept.assign(_rank=rank).sort_values(["_rank", "path"]).drop(columns="_rank")
    # The split keeps rows sorted by path, which groups them by class. Passes in the stored order
    # (the BatchNorm refreshes read the first few training batches) must still see every class:
    # one seeded permutation makes every block and batch hold every class.
    train = train.sample(frac=1.0, random_state=seed, ignore_index=True)
    datasets = {"train": row_blocks(train)}
    datasets.update({name: row_blocks(split.part(name)) for name in ("valid", "test")})
    return datasets, split


def in_memory(ds) -> tuple[np.ndarray, np.ndarray]:
    """The `image` and one-hot `y` columns of a (materialized) image dataset as two arrays, in its
    stored order: read from Ray once, so no epoch goes back to Ray Data."""
    images, labels = [], []
    for block in ds.iter_batches(batch_size=None, batch_format="numpy"):
        images.append(block["image"])
        labels.append(block["y"])
    return np.concatenate(images), np.concatenate(labels)


def epoch_order(rows: int, seed: int, epoch: int) -> np.ndarray:
    """The order of one training epoch: a permutation of all rows drawn from (`seed`, `epoch`)."""
    return np.random.default_rng([seed, epoch]).permutation(rows)


def to_tf(ds, batch_size: int, training: bool, seed: int = 123, first_epoch: int = 0):
    """A tf.data pipeline over a (materialized) image dataset: float32 images and one-hot labels.

    The images are read into memory once (`in_memory`: uint8, e.g. 5 MB for the demo's 420
    images at 64 px). Training pipelines, like the origin's `flow_from_dataframe`, see a new
    order every epoch: each pass over the pipeline is one epoch, whose order is `epoch_order`
    (`seed`, epoch number), a permutation of all rows. Two runs with the same seed see the same
    orders; a run resumed at `first_epoch` continues the sequence. Training images are also
    flipped horizontally at random by a Keras layer, whose seed state moves on every epoch (a
    seeded `tf.image` op would restart with each pass and flip the same images every epoch).
    Evaluation pipelines keep the stored order.

    Batches are gathered by `tf.numpy_function`, not `Dataset.from_generator`: TensorFlow's generator
    op sets glibc's trim threshold when it first runs (it logs "Memory patch applied:
    M_TRIM_THRESHOLD=128 kb"), which also freezes malloc's mmap threshold at 128 KB, so every
    step's activation buffers were mapped and unmapped afresh: a demo epoch (5.1 s) spent about
    4 CPU-seconds in the kernel on 1.5 million page faults. Without it a demo epoch under Tune
    takes about 3 s, with the same batches and figures (measured, docs/demo.md).
    """
    import keras
    import tensorflow as tf

    images, labels = in_memory(ds)
    epochs = itertools.count(first_epoch)

    def order() -> np.ndarray:  # called once per pass over the pipeline, i.e. once per epoch
        rows = epoch_order(len(images), seed, next(epochs)) if training else np.arange(len(images))
        return rows.astype(np.int64)

    def gather(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return images[rows], labels[rows]

    def batch(rows):
        x, y = tf.numpy_function(gather, [rows], (tf.uint8, tf.float32), stateful=False)
        return tf.ensure_shape(x, (None, *images.shape[1:])), tf.ensure_shape(y, (None, len(CLASS_NAMES)))

    passes = tf.data.Dataset.from_tensors(0).map(lambda _: tf.numpy_function(order, [], tf.int64))
    tfds = passes.flat_map(lambda rows: tf.data.Dataset.from_tensor_slices(rows).batch(batch_size)).map(batch)
    # The flat_map hides the length; stating it lets Keras count steps (and not warn).
    tfds = tfds.apply(tf.data.experimental.assert_cardinality(-(-len(images) // batch_size)))
    tfds = tfds.map(lambda x, y: (tf.cast(x, tf.float32), y))
    if training:
        flip = keras.layers.RandomFlip("horizontal", seed=seed)
        tfds = tfds.map(lambda x, y: (flip(x, training=True), y))
    return tfds.prefetch(tf.data.AUTOTUNE)
