"""The `xray-ray` Typer app and what its commands share: logging, one-line errors, config and index reading."""

from __future__ import annotations

import logging
from pathlib import Path

import typer

from xray_ray.config import load_config
from xray_ray.images.index import load_index
from xray_ray.images.synth import SYNTHETIC_NOTE

app = typer.Typer(help="Tune, serve and batch-score a chest X-ray classifier on Ray.", no_args_is_help=True)

CONFIG_OPTION = typer.Option(None, "--config", help="YAML config file (sections data, model, lra, train).")
SET_OPTION = typer.Option(None, "--set", help="Override a setting, e.g. --set model.backbone=compact (repeatable).")


@app.callback()
def _main(quiet: bool = typer.Option(False, "--quiet", "-q", help="Only warnings and results.")) -> None:
    """Show the project's own progress lines (LRA epochs, stages) unless --quiet."""
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("xray_ray").setLevel(logging.WARNING if quiet else logging.INFO)


def run_job(command: str, args: list[str]) -> None:
    """Run one subcommand as `xray-ray <command> <args>` would (the entry point of `jobs/*.py`)."""
    app(args=[command, *args], prog_name=f"jobs/{command}.py")


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print `error: message` and return the Exit to raise (2: something the user can fix)."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def synthetic_note(flag: bool) -> str:
    """The label every printed figure measured on phantoms carries."""
    return f" ({SYNTHETIC_NOTE})" if flag else ""


def read_config(config_file: Path | None, overrides: list[str] | None):
    """The config from the YAML file and `--set` overrides; a bad one is a one-line error (exit 2)."""
    try:
        return load_config(config_file, overrides)
    except (OSError, ValueError) as err:
        raise fail(str(err))


def read_index(path: Path):
    """An index written by `xray-ray index`; an unreadable one is a one-line error (exit 2)."""
    try:
        return load_index(path)
    except (OSError, ValueError) as err:
        raise fail(f"cannot read the index {path}: {err}")
