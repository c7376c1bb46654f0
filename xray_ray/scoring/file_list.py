"""A run's file list: the entries to score, streamed to Parquet chunks that the read tasks take one each.

Discovery writes it before the pipeline starts, from archive folders (`write_file_list`) or
from a PACS (`scoring.pacs.write_instance_list`): a chunk holds `chunk_rows` entries, each a
path (a file, or a PACS instance's WADO-RS URL) with the error and code that keep it from
being read (empty for a readable entry). Chunks keep the driver's memory flat in archive size.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd

from xray_ray.files import atomic_path
from xray_ray.scoring import archive

COLUMNS = ["path", "error", "code"]


class FileList:
    """Writes entries to `folder` as `files-<n>.parquet` chunks of `chunk_rows` (the folder is emptied first)."""

    def __init__(self, folder: Path, chunk_rows: int) -> None:
        shutil.rmtree(folder, ignore_errors=True)
        self.folder, self.chunk_rows = folder, chunk_rows
        self.written, self.with_error = 0, 0
        self._chunk: list[tuple[str, str, str]] = []

    def add(self, path: str, error: str = "", code: str = "") -> None:
        """One entry; a full chunk is written at once."""
        self._chunk.append((path, error, code))
        self.with_error += bool(error)
        if len(self._chunk) == self.chunk_rows:
            self.flush()

    def flush(self) -> None:
        """Write the entries held so far as the next chunk."""
        if self._chunk:
            with atomic_path(self.folder / f"files-{self.written // self.chunk_rows:08d}.parquet") as tmp:
                pd.DataFrame(self._chunk, columns=COLUMNS).to_parquet(tmp, index=False)
            self.written += len(self._chunk)
            self._chunk.clear()


def write_file_list(roots: list[Path], folder: Path, exclude: Path, chunk_rows: int,
                    follow_symlinks: bool = False) -> dict:
    """Stream the archives' files (and walk errors) into the file list; returns counts."""
    files = FileList(folder, chunk_rows)
    for found in archive.walk_all(roots, exclude, follow_symlinks):
        files.add(found.path, found.error, found.code)
    files.flush()
    return {"files": files.written, "walk_errors": files.with_error}
