"""The scoring ledger: what has been scored, by content hash and model version.

It lives in `<out>/ledger/` as one small Parquet file per committed predictions part
(`<run>--part-00001.parquet`), each written atomically. A file is keyed by its content
(sha256), so a renamed or copied image is not scored twice; a file that could not even be
read has no hash and is keyed by its path instead. The predictions part is the commit
point: `reconcile` rebuilds the ledger file of any part whose ledger file is missing
(a driver killed between the two writes), so a re-run never scores a committed file again.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd

from xray_ray.files import atomic_path

LEDGER_DIR = "ledger"
PARTS_DIR = "predictions"
LEDGER_COLUMNS = ["key", "model_version", "sha256", "path", "status", "run", "scored_at"]


def row_key(sha256: str, path: str) -> str:
    """The ledger key of a file: its content hash, or a hash of its path when it could not be read."""
    return sha256 or hashlib.sha256(f"unreadable:{path}".encode()).hexdigest()


class KnownKeys:
    """A sorted array of 32-byte keys: compact (32 bytes per file) and shared zero-copy via Ray's object store."""

    def __init__(self, hex_keys) -> None:
        self.keys = np.unique(np.array([bytes.fromhex(k) for k in hex_keys], dtype="S32"))

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, hex_key: str) -> bool:
        key = np.array(bytes.fromhex(hex_key), dtype="S32")
        at = int(np.searchsorted(self.keys, key))
        return at < len(self.keys) and self.keys[at] == key


def _entry_path(out: Path, run: str, part: Path) -> Path:
    return out / LEDGER_DIR / f"{run}--{part.stem}.parquet"


def record(out: str | Path, run: str, part: str | Path, predictions: pd.DataFrame) -> None:
    """Write the ledger file of one committed predictions part of `run`."""
    entry = predictions[["model_version", "sha256", "path", "status", "scored_at"]].copy()
    entry.insert(0, "key", [row_key(s, p) for s, p in zip(entry["sha256"], entry["path"])])
    entry["run"] = run
    with atomic_path(_entry_path(Path(out), run, Path(part))) as tmp:
        entry[LEDGER_COLUMNS].to_parquet(tmp, index=False)


def reconcile(out: str | Path) -> int:
    """Add the ledger files missing for committed predictions parts; returns how many were added."""
    out = Path(out)
    added = 0
    for part in sorted(out.glob(f"*/{PARTS_DIR}/part-*.parquet")):
        run = part.parent.parent.name
        if not _entry_path(out, run, part).is_file():
            record(out, run, part, pd.read_parquet(part))
            added += 1
    return added


def known_keys(out: str | Path, model_version: str) -> KnownKeys:
    """The keys of every file already scored (ok or error) by `model_version`."""
    folder = Path(out) / LEDGER_DIR
    if not any(folder.glob("*.parquet")):
        return KnownKeys([])
    frame = pd.read_parquet(folder, columns=["key"], filters=[("model_version", "==", model_version)])
    return KnownKeys(frame["key"])
