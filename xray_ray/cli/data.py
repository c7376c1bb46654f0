"""`xray-ray synth` and `xray-ray index`: phantoms and the dataset index."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from xray_ray.cli.app import ADDRESS_OPTION, app, fail
from xray_ray.images.synth import SYNTHETIC_NOTE
from xray_ray.ray_runtime import ray_session


@app.command()
def synth(
    out_dir: Path = typer.Argument(..., help="Folder to write the phantom dataset into (Radiography DB layout)."),
    per_class: int = typer.Option(150, min=1, help="Images per class."),
    size: int = typer.Option(299, min=32, help="Image side in pixels (the database's is 299)."),
    seed: int = typer.Option(0, help="Random seed; the same seed writes the same files."),
) -> None:
    """Write synthetic phantom chest X-rays (not real images) for demos and tests."""
    from xray_ray.images.synth import write_dataset

    counts = write_dataset(out_dir, per_class=per_class, size=size, seed=seed)
    typer.echo(f"wrote {sum(counts.values())} {SYNTHETIC_NOTE} to {out_dir}: {counts}")


@app.command()
def index(
    data_dir: Path = typer.Argument(..., help="Dataset root with one folder per class."),
    out: Path = typer.Option(Path("index.parquet"), help="Where to write the index (Parquet)."),
    address: str = ADDRESS_OPTION,
) -> None:
    """Index a dataset folder: label, size, hash, dimensions and readability of every file."""
    from xray_ray.images import index as indexing

    try:
        found = indexing.discover(data_dir)  # a missing or empty folder is refused before Ray starts
        with ray_session(address):
            frame, found = indexing.build_index(data_dir, found)
    except (FileNotFoundError, ValueError) as err:
        raise fail(str(err))
    indexing.save_index(frame, out)
    summary = indexing.summarize(frame)
    for label, count in summary["per_class"].items():
        typer.echo(f"  {label:<16} {count:>7}")
    typer.echo(f"  {'unreadable':<16} {summary['unreadable']:>7}")
    for reason, count in frame.loc[~frame["readable"], "error"].value_counts().items():
        typer.echo(f"    {count} x {reason}")
    if found.unknown_folders:
        typer.echo(f"  not a class, skipped: {json.dumps(found.unknown_folders)}")
    typer.echo(f"index of {len(frame)} files written to {out}")
