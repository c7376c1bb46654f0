"""A dataset folder becomes `index.parquet`: one row per file with its label and health.

Understands both layouts of the COVID-19 Radiography Database: `<root>/<Class>/images/*`
(the current one, whose `masks/` folders are ignored) and `<root>/<Class>/*` (older
versions). Every file is read and decoded once, in parallel on Ray Data, so later jobs
know its size, content hash and whether it is usable without opening it again.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from xray_ray.config import CLASS_NAMES, canonical_label
from xray_ray.files import atomic_path, sha256_hex
from xray_ray.images.decode import ImageDecodeError, decode, read_bytes
from xray_ray.images.synth import SYNTHETIC_MARKER
from xray_ray.ray_runtime import require_ray

INDEX_COLUMNS = ["path", "label", "bytes", "sha256", "width", "height", "readable", "error"]
IGNORED_FOLDERS = {"masks"}


@dataclass
class Discovery:
    """What walking a dataset root found: labelled files, and folders that are not a class."""

    files: list[tuple[str, str]] = field(default_factory=list)
    unknown_folders: list[str] = field(default_factory=list)


def _visible_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and not p.is_dir())


def discover(root: str | Path) -> Discovery:
    """List (path, label) for every file under the class folders of `root`."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {root}")
    found = Discovery()
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        label = canonical_label(folder.name)
        if label is None:
            found.unknown_folders.append(folder.name)
            continue
        images = folder / "images"
        source = images if images.is_dir() else folder
        found.files.extend((str(p.resolve()), label) for p in _visible_files(source))
        extra = [p.name for p in source.iterdir() if p.is_dir() and p.name not in IGNORED_FOLDERS | {"images"}]
        found.unknown_folders.extend(f"{folder.name}/{name}" for name in sorted(extra))
    if not found.files:
        expected = " or ".join(f"<root>/{CLASS_NAMES[0]}{tail}" for tail in ("/images/*.png", "/*.png"))
        raise ValueError(f"no labelled images under {root}: expected class folders such as {expected}")
    return found


def describe_file(path: str) -> dict:
    """Size, hash, dimensions and readability of one file; never raises for a bad file."""
    row = {"bytes": 0, "sha256": "", "width": 0, "height": 0, "readable": False, "error": ""}
    try:
        data = read_bytes(path)
        row.update(bytes=len(data), sha256=sha256_hex(data))
        height, width = decode(data).shape
        row.update(width=width, height=height, readable=True)
    except ImageDecodeError as err:
        row["error"] = err.reason
    return row


def _describe_batch(batch: pd.DataFrame) -> pd.DataFrame:
    described = pd.DataFrame([describe_file(path) for path in batch["path"]], index=batch.index)
    return pd.concat([batch, described], axis=1)


def build_index(root: str | Path, found: Discovery | None = None) -> tuple[pd.DataFrame, Discovery]:
    """Index every file under `root` (`found`: what `discover(root)` listed already) on Ray Data, inside
    the caller's Ray session; rows are sorted by path."""
    found = found or discover(root)
    require_ray("indexing")
    import ray  # heavy: only the commands that index pay for it

    items = [{"path": path, "label": label} for path, label in found.files]
    blocks = int(np.clip(len(items) // 200, 4, 200))  # big blocks: per-task overhead dominates small ones
    ds = ray.data.from_items(items, override_num_blocks=blocks)
    frame = ds.map_batches(_describe_batch, batch_format="pandas", batch_size=100).to_pandas()
    frame = frame[INDEX_COLUMNS].sort_values("path", ignore_index=True)
    frame = frame.astype({"bytes": "int64", "width": "int32", "height": "int32", "readable": bool})
    # Kept in the Parquet file's metadata, so every later report knows where the data came from.
    frame.attrs = {"root": str(Path(root).resolve()), "synthetic": (Path(root) / SYNTHETIC_MARKER).is_file()}
    return frame, found


def save_index(frame: pd.DataFrame, path: str | Path) -> None:
    """Write the index as Parquet, atomically."""
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)


def load_index(path: str | Path) -> pd.DataFrame:
    """Read an index written by `save_index`, checking its columns."""
    frame = pd.read_parquet(path)
    missing = set(INDEX_COLUMNS) - set(frame.columns)
    if missing:
        raise ValueError(f"{path} is not an xray-ray index: missing columns {sorted(missing)}")
    return frame


def fingerprint(frame: pd.DataFrame) -> str:
    """A short hash of the usable (content, label) pairs: the same data gives the same value wherever it lives."""
    usable = frame[frame["readable"]]
    lines = sorted(f"{digest},{label}" for digest, label in zip(usable["sha256"], usable["label"]))
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def summarize(frame: pd.DataFrame) -> dict:
    """Per-class counts of usable files and the number unreadable, for printing."""
    usable = frame[frame["readable"]]
    counts = {label: int((usable["label"] == label).sum()) for label in CLASS_NAMES}
    return {"per_class": counts, "usable": int(len(usable)), "unreadable": int((~frame["readable"]).sum())}
