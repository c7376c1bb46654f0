"""The scoring ledger: what has been scored, by content hash and model version; kept intact across power losses.

It lives in `<out>/ledger/` as one small Parquet file per committed predictions part
(`<run>--part-00001.parquet`). The predictions part is written first, then its ledger
file, each atomically and durably (`files.atomic_path`: temp file, fsync, rename, fsync the
folder), so they count only once they are on disk. When the ledger file cannot be written
(a full disk) the writer takes its part back (`run._write_part`), so a failed run leaves no
part without its ledger file and no ledger file without its part; after a crash between the
two writes, `repair` rebuilds the ledger file from the part.

One rule decides whether a file gets a new row; every place that deduplicates rows follows it
(`row_key`, `known_keys`, the read stage's check, `run.read_predictions` within a run):

- a PACS instance (its path is its WADO-RS URL) is keyed by its SOP Instance UID once answered, and an instance
  the selection rules left out by its UID and reason: both are known before anything is fetched;
- a file that was read is keyed by its content (sha256), so a renamed or copied image is not
  scored twice: once the ledger holds its key for a model version it gets no new row from that
  version, unless the model or our own code failed on it (`RETRIED_CODES`, `internal_error:*`),
  which the next run tries again;
- an entry with no content to hash (a broken link, a symlink loop, a folder or file that could
  not be read, a file refused before reading: not a regular file, over the size cap, outside
  the archive, changed while read) is keyed by its path and error code. Every run looks at it
  again (that costs no decoding and follows the run's options): read now, it has a content hash
  and is a new key; failing another way, it is a new key too; failing the same way, it gets no
  new row but comes back from the read stage as `STILL_FAILING`, which the run lists in that
  night's report (rows, errors.csv, the page) without committing it.

So re-running into the same `--out` never adds a second row for a path that fails the same way,
and each night's report still lists everything that is failing.

`repair`, run under the output lock before every run, makes the ledger agree with the
committed parts whatever happened before (a driver killed between two writes, a power
loss, a disk that returned zeros):

- a part whose footer or schema cannot be read (empty, truncated, zeroed) is moved to `<out>/quarantine/`
  with a warning, with its ledger file: its files are scored again, so nothing is lost;
- a ledger file that cannot be read, or whose part is gone, is moved there too;
- a readable part without its ledger file gets it rebuilt from the part;
- temp files left by an interrupted write are removed.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from xray_ray.files import atomic_path, fsync_folder
from xray_ray.scoring.dicomweb import SKIP_CODES, instance_sop

log = logging.getLogger(__name__)

LEDGER_DIR = "ledger"
PARTS_DIR = "predictions"
QUARANTINE_DIR = "quarantine"
LEDGER_COLUMNS = ["key", "model_version", "sha256", "path", "status", "error_code", "run", "scored_at"]
MODEL_FAILED = "model_failed"
STORE_REFUSED = "store_refused"
"""An answered PACS instance whose results the PACS refused to store (`scoring.dicom_out`)."""
RETRIED_CODES = frozenset({MODEL_FAILED, STORE_REFUSED})
"""Error codes of read files that the next run tries again (also any `internal_error:*`)."""
SKIPPED_CODES = SKIP_CODES
"""Codes of PACS instances the selection rules leave out (a lateral view, not a chest): `skipped` rows, committed
once per model version like an answer, never fetched."""
STILL_FAILING = "still_failing"
"""Status the read stage gives an entry with no content hash whose path and error code the ledger already holds
for this model version: the run lists it in the night's report as an error and commits no row for it."""


def row_key(sha256: str, path: str, code: str = "") -> str:
    """The ledger key of a row: its content hash, or, for an entry with no content to hash, a hash of its path and
    error code (the module's rule). A PACS instance answered is keyed by its SOP Instance UID, known before it is
    fetched, so a second night fetches nothing that model already scored."""
    if not code and (sop := instance_sop(path)):
        return hashlib.sha256(f"sop:{sop}".encode()).hexdigest()
    return sha256 or hashlib.sha256(f"unread:{code}:{path}".encode()).hexdigest()


def is_retried(code: str) -> bool:
    """True for the error code of a read file that the next run should score again (the model or our code failed)."""
    return code in RETRIED_CODES or code.startswith("internal_error")


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
    entry = predictions.reindex(columns=["model_version", "sha256", "path", "status", "error_code", "scored_at"])
    entry[["sha256", "error_code"]] = entry[["sha256", "error_code"]].fillna("")
    entry.insert(0, "key", [row_key(s, p, c) for s, p, c in zip(entry["sha256"], entry["path"], entry["error_code"])])
    entry["run"] = run
    with atomic_path(_entry_path(Path(out), run, Path(part))) as tmp:
        entry[LEDGER_COLUMNS].to_parquet(tmp, index=False)


PART_COLUMNS = ["path", "sha256", "model_version", "status", "error_code", "scored_at"]


def _intact(path: Path, required: list[str]) -> bool:
    """Cheap check of a Parquet file: footer and schema readable (an empty, truncated or zeroed file fails)."""
    try:
        return set(required) <= set(pq.read_metadata(path).schema.names)
    except Exception:  # noqa: BLE001 - whatever the damage, the file is unusable
        return False


def _readable(path: Path, columns: list[str]) -> pd.DataFrame | None:
    """The file's `columns` (those it has; the first two required), or None when it cannot be read."""
    try:
        names = pq.read_schema(path).names
        if not set(columns[:2]) <= set(names):
            return None
        return pd.read_parquet(path, columns=[c for c in columns if c in names])
    except Exception:  # noqa: BLE001 - whatever the damage, the file is unusable
        return None


@dataclass
class Repair:
    """What `repair` did: ledger files rebuilt from parts, files moved to quarantine, temp files removed."""

    rebuilt: int = 0
    quarantined: int = 0
    temp_removed: int = 0


def _quarantine(out: Path, path: Path, why: str, done: Repair) -> None:
    """Move `path` under `<out>/quarantine/` (same relative path, a time stamp added) and say so."""
    target = out / QUARANTINE_DIR / path.relative_to(out)
    target = target.with_name(f"{target.stem}.{time.strftime('%Y%m%dT%H%M%S')}-{time.time_ns() % 10**9}"
                              f"{target.suffix}")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(path, target)
    fsync_folder(path.parent)
    fsync_folder(target.parent)
    done.quarantined += 1
    log.warning("%s: %s; moved to %s", path, why, target)


def repair(out: str | Path, read_in_full: str | Path | None = None) -> Repair:
    """Make the ledger agree with the committed, readable parts (see the module docstring).

    Parts are checked by their footer and schema; those of the run folder `read_in_full`
    (the one about to be reported) are read in full, so damage inside them is found too.
    """
    out = Path(out)
    full = Path(read_in_full) if read_in_full is not None else None
    done = Repair()
    for temp in [*out.glob(f"*/{PARTS_DIR}/.*.tmp"), *out.glob(f"{LEDGER_DIR}/.*.tmp")]:
        temp.unlink(missing_ok=True)
        done.temp_removed += 1
    parts = {}
    for part in sorted(out.glob(f"*/{PARTS_DIR}/part-*.parquet")):
        run = part.parent.parent.name
        entry = _entry_path(out, run, part)
        readable = _readable(part, PART_COLUMNS) is not None if part.parent.parent == full else \
            _intact(part, PART_COLUMNS[:2])
        if not readable:
            _quarantine(out, part, "committed predictions part is unreadable (its files will be scored again)", done)
            if entry.is_file():
                _quarantine(out, entry, "ledger file of an unreadable part", done)
            continue
        parts[entry] = (run, part)
    for entry in sorted((out / LEDGER_DIR).glob("*.parquet")):
        if entry not in parts:
            _quarantine(out, entry, "ledger file without its predictions part", done)
        elif not _intact(entry, LEDGER_COLUMNS[:2]):
            _quarantine(out, entry, "ledger file is unreadable (rebuilt from its part)", done)
    for entry, (run, part) in parts.items():
        if entry.is_file():
            continue
        rows = _readable(part, PART_COLUMNS)
        if rows is None:
            _quarantine(out, part, "committed predictions part is unreadable (its files will be scored again)", done)
            continue
        record(out, run, part, rows)
        done.rebuilt += 1
        log.warning("%s: ledger file missing; rebuilt from %s", entry, part)
    return done


def known_keys(out: str | Path, model_version: str) -> KnownKeys:
    """The keys `model_version` needs no new row for (the module's rule): files read and answered or refused for
    good, and entries with no content to hash, by path and error code."""
    keys = []
    for entry in sorted((Path(out) / LEDGER_DIR).glob("*.parquet")):
        frame = _readable(entry, ["key", "model_version", "sha256", "error_code"])
        if frame is None:  # damaged after `repair`: its files are simply scored again
            continue
        codes = frame["error_code"].fillna("") if "error_code" in frame else pd.Series("", index=frame.index)
        read = frame["sha256"].fillna("").astype(bool) if "sha256" in frame else False
        settled = (frame["model_version"] == model_version) & ~(read & codes.map(is_retried))
        keys.extend(frame.loc[settled, "key"])
    return KnownKeys(keys)

