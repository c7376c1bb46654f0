"""Where an experiment lives: its name, storage path (local folder, shared path or s3://), model and report folders.

Relative paths resolve under `output_root()`, so the same command writes to the same place
whether run by hand or by `ray job submit`, whose working folder is a temporary copy.
Small text files (the experiment's saved settings) go through pyarrow's file systems so a
bucket works like a folder; local ones are written atomically.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs

from xray_ray.config_training import TuneConfig
from xray_ray.files import atomic_write_text


def output_root() -> Path:
    """Where relative output paths resolve: $XRAY_RAY_HOME, else the working folder.

    Under `ray job submit --working-dir`, the working folder is a temporary copy that Ray
    deletes; relative outputs then go to ~/xray-ray on the node running the driver.
    """
    home = os.environ.get("XRAY_RAY_HOME")
    if home:
        return Path(home).expanduser().resolve()
    cwd = Path.cwd()
    if "working_dir_files" in cwd.parts or cwd.name.startswith("_ray_pkg_"):
        return Path.home() / "xray-ray"
    return cwd


def resolve_storage(storage_path: str) -> str:
    """An absolute local path or a URI (s3://, gs://, ...), as Tune requires."""
    if "://" in storage_path:
        return storage_path.rstrip("/")
    path = Path(storage_path).expanduser()
    return str(path if path.is_absolute() else output_root() / path)


def _filesystem(uri: str):
    if "://" in uri:
        return pyarrow.fs.FileSystem.from_uri(uri)
    return pyarrow.fs.LocalFileSystem(), uri


def join(base: str, *parts: str) -> str:
    """`base/part/...` for a local path or a URI alike."""
    return "/".join([base.rstrip("/"), *parts])


def read_text(uri: str) -> str | None:
    """A small text file's content, or None when there is no such file."""
    fs, path = _filesystem(uri)
    if fs.get_file_info(path).type != pyarrow.fs.FileType.File:
        return None
    with fs.open_input_stream(path) as stream:
        return stream.read().decode("utf-8")


def write_text(uri: str, text: str) -> None:
    """Write a small text file: atomically on a local disk; object stores replace an object whole anyway."""
    if "://" not in uri:
        atomic_write_text(uri, text)
        return
    fs, path = _filesystem(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as stream:
        stream.write(text.encode("utf-8"))


def exists(uri: str) -> bool:
    """Whether a file or folder is there."""
    fs, path = _filesystem(uri)
    return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound


@dataclass
class Experiment:
    """Where an experiment lives and writes: resolved paths, fixed before anything runs."""

    name: str
    storage_path: str  # absolute path or URI
    out: Path  # model folder of the best trial
    report_dir: Path

    @property
    def path(self) -> str:
        return join(self.storage_path, self.name)


def plan(settings: TuneConfig, name: str | None = None, storage_path: str | None = None,
         out: str | Path | None = None, report_dir: str | Path | None = None) -> Experiment:
    """Resolve the experiment's name and folders (relative ones under `output_root()`)."""
    name = name or settings.name
    root = output_root()

    def local(path, default: Path) -> Path:
        path = Path(path).expanduser() if path is not None else default
        return path if path.is_absolute() else root / path

    return Experiment(name, resolve_storage(storage_path or settings.storage_path),
                      local(out, Path("models") / name), local(report_dir, Path("reports/tune") / name))
