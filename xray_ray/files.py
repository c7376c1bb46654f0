"""Small file helpers every job shares: atomic, durable writes and content hashes.

Outputs are written to a temporary file (`atomic_path`) or a temporary folder
(`atomic_folder`, for files that belong together) beside the destination, flushed to disk,
renamed into place and the parent folder flushed too, so a reader, a re-run after a crash
or a power loss never sees a half-written output. Files get the permissions the process's
umask allows (outputs name patient image paths: the operator decides who may read them).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def current_umask() -> int:
    """The process's umask, read without changing it where Linux allows."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_folder(folder: str | Path) -> None:
    """Flush a folder's entries (a rename or a new file in it) to disk."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str | Path) -> None:
    """Flush a file's content to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _settle(path: str | Path) -> None:
    """Give a finished output file the umask's permissions and flush its content to disk.

    Shared by `atomic_path` and `atomic_folder`: mkstemp makes files private, so they are
    opened up as far as the umask allows, like open() would, before they are published.
    """
    os.chmod(path, 0o666 & ~current_umask())
    fsync_file(path)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; if the block succeeds it is made durable and renamed onto `path`."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        _settle(tmp)
        os.replace(tmp, target)
        fsync_folder(target.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; if the block succeeds it replaces `path` as one unit.

    For outputs made of several files that are only valid together (an exported model: its
    weights and the card holding their digests): every file in the folder is settled
    (umask permissions, fsync) and every folder flushed, then the folder is renamed onto
    `path` and the parent flushed. An existing `path` is renamed aside first and removed
    once the new folder is in place; whether it may be replaced is the caller's decision.
    A failed block leaves `path` as it was and no temporary behind.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield staging
        for folder, _, names in os.walk(staging, topdown=False):
            for name in names:
                _settle(Path(folder) / name)
            fsync_folder(folder)
        os.chmod(staging, 0o777 & ~current_umask())  # mkdtemp made it private; the output follows the umask
        if target.exists():
            retired = target.with_name(f".{target.name}.replaced")
            shutil.rmtree(retired, ignore_errors=True)
            target.rename(retired)
            staging.rename(target)
            shutil.rmtree(retired)
        else:
            staging.rename(target)
        fsync_folder(target.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` atomically and durably."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically and durably."""
    atomic_write_bytes(path, text.encode("utf-8"))


def sha256_hex(data: bytes) -> str:
    """The hex SHA-256 of `data`: the identity of an image's content across jobs."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """The hex SHA-256 of a file's content, read in chunks (model files can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(chunk):
            digest.update(block)
    return digest.hexdigest()
