"""Finding the image files of an archive folder, one at a time, and their ground truth if known.

A nightly archive has any depth and layout, and it may be huge: `walk` is a generator
over `os.scandir`, so neither the file list nor any image is held in memory. A file is
picked up by its extension (`images.decode.SUPPORTED_EXTENSIONS`) or, without an extension, by
the DICOM "DICM" marker. Anything that stops the walk from reaching a file (a folder it
may not read, a symlink loop, a dangling link) comes out as an entry with an error code
and reason instead of an exception, so the scoring job reports it as an error row.

Scoring stays inside the archive: a symlink (to a file or a folder) that resolves outside
every archive root is an `outside_archive` entry and is not read, unless the caller asks
to follow such links. The job's own output folder is never entered, whether it is reached
by its path, through a symlink or under another name (compared by device and inode).

Ground truth is known when the archive uses class folders (the nearest enclosing folder
whose name is a class, e.g. `<archive>/COVID/images/x.png`) or from a labels CSV.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from xray_ray.config import canonical_label
from xray_ray.images.decode import SUPPORTED_EXTENSIONS, looks_like_dicom
from xray_ray.images.synth import SYNTHETIC_MARKER

OUTSIDE_ARCHIVE = "outside_archive"
UNREADABLE = "unreadable"


@dataclass(frozen=True)
class Found:
    """One archive entry: a candidate image file, or a path the walk could not use (`code` and `error` set)."""

    path: str
    error: str = ""
    code: str = ""


class ArchiveError(ValueError):
    """An archive root that does not exist or cannot be listed."""


def check_root(root: str | Path) -> Path:
    """The archive root as an absolute path, or ArchiveError saying why it cannot be walked."""
    path = Path(os.path.abspath(root))
    if not path.is_dir():
        raise ArchiveError(f"archive folder not found (or not a folder): {path}")
    try:
        with os.scandir(path):
            pass
    except OSError as err:
        raise ArchiveError(f"archive folder cannot be listed: {path}: {err.strerror or err}") from None
    return path


def _named_like_an_image(name: str) -> bool:
    """A supported extension, or none (a DICOM may have none)."""
    suffix = os.path.splitext(name)[1].lower()
    return not suffix or suffix in SUPPORTED_EXTENSIONS


def _is_candidate(entry: os.DirEntry, mode: int) -> bool:
    """A supported extension, or no extension and the DICOM marker in the first 132 bytes of a regular file."""
    if os.path.splitext(entry.name)[1]:
        return _named_like_an_image(entry.name)
    if not stat.S_ISREG(mode):  # never open a pipe or a device to sniff it: the open could block
        return False
    try:
        with open(entry.path, "rb") as file:
            return looks_like_dicom(file.read(132))
    except OSError:
        return False  # cannot tell what it is; only named images are reported unreadable


def _inside(path: str, roots: list[str]) -> bool:
    return any(path == root or path.startswith(root.rstrip(os.sep) + os.sep) for root in roots)


def _identity(path: str | Path) -> tuple[int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def walk(root: str | Path, exclude: Iterable[str | Path] = (), roots: Iterable[str | Path] = (),
         follow_symlinks: bool = False) -> Iterator[Found]:
    """Yield every image file under `root`: a folder's files, then its subfolders, in name order; hidden names skipped.

    Symlinks are followed while they resolve inside `root` or one of `roots` (all resolved);
    one that leads outside is reported as `outside_archive` unless `follow_symlinks`. A folder
    reached twice (a symlink loop, or a second link to it) is reported once as an error
    instead of being walked again. `exclude` lists folders never entered, e.g. the job's own
    output folder when it lies inside the archive, matched by resolved path and by inode.
    """
    allowed = [os.path.realpath(p) for p in (root, *roots)]
    excluded_paths = {os.path.realpath(p) for p in exclude}
    excluded_ids = {i for p in exclude if (i := _identity(p)) is not None}
    seen: set[tuple[int, int]] = set()
    stack = [os.path.abspath(root)]
    while stack:
        folder = stack.pop()
        try:
            info = os.stat(folder)
            if (info.st_dev, info.st_ino) in seen:
                yield Found(folder, "folder skipped: symlink loop (already scanned)", UNREADABLE)
                continue
            seen.add((info.st_dev, info.st_ino))
            with os.scandir(folder) as listing:
                entries = sorted(listing, key=lambda e: e.name)
        except OSError as err:
            yield Found(folder, f"unreadable folder: {err.strerror or err}", UNREADABLE)
            continue
        subfolders = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                info = entry.stat()  # follows symlinks
            except OSError as err:  # dangling link, symlink loop, permission
                if entry.is_symlink() or os.path.splitext(entry.name)[1].lower() in SUPPORTED_EXTENSIONS:
                    yield Found(entry.path, f"unreadable file: {err.strerror or err}", UNREADABLE)
                continue
            if stat.S_ISDIR(info.st_mode) and (
                    (info.st_dev, info.st_ino) in excluded_ids or os.path.realpath(entry.path) in excluded_paths):
                continue
            is_dir = stat.S_ISDIR(info.st_mode)
            if entry.is_symlink() and not follow_symlinks and not _inside(os.path.realpath(entry.path), allowed):
                if is_dir or _named_like_an_image(entry.name):  # never read outside to sniff for a DICOM
                    yield Found(entry.path, "symlink leads outside the archive folders (not followed)",
                                OUTSIDE_ARCHIVE)
            elif is_dir:
                subfolders.append(entry.path)
            elif _is_candidate(entry, info.st_mode):
                yield Found(entry.path)
        stack.extend(reversed(subfolders))  # depth first: the stack holds folders, never files


def walk_all(roots: list[Path], exclude: Path, follow_symlinks: bool = False) -> Iterator[Found]:
    """`walk` over every archive root in turn (each may link into the others), never entering `exclude`.

    The one list of a run's entries: discovery writes it out, the free-space check counts it.
    """
    for root in roots:
        yield from walk(root, exclude=[exclude], roots=roots, follow_symlinks=follow_symlinks)


def class_folder_label(path: str, root: str) -> str | None:
    """The class of the nearest folder between `root` and `path` named after one, else None."""
    relative = Path(os.path.relpath(path, root))
    for folder in reversed(relative.parts[:-1]):
        label = canonical_label(folder)
        if label is not None:
            return label
    return None


def read_labels(csv_path: str | Path) -> dict[str, str]:
    """{absolute path: class} from a CSV with columns `path` (or `file_path`) and `label`.

    Relative paths are relative to the CSV's folder; labels may be spelled like folder
    names (`viral_pneumonia`). Raises ValueError for a missing column or an unknown label.
    """
    csv_path = Path(csv_path)
    frame = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    column = next((c for c in ("path", "file_path") if c in frame.columns), None)
    if column is None or "label" not in frame.columns:
        raise ValueError(f"{csv_path} needs columns 'path' (or 'file_path') and 'label', has {list(frame.columns)}")
    labels = {}
    for path, name in zip(frame[column], frame["label"]):
        label = canonical_label(name)
        if label is None:
            raise ValueError(f"{csv_path}: unknown label {name!r} for {path}")
        labels[os.path.abspath(csv_path.parent / path)] = label
    return labels


def is_synthetic(roots: Iterable[str | Path]) -> bool:
    """True when any archive root carries the synthetic-data marker written by xray_ray.synth."""
    return any((Path(root) / SYNTHETIC_MARKER).is_file() for root in roots)
