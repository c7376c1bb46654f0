"""The `xray-ray` Typer app and what its commands share: logging, one-line errors, settings and index reading.

A command's options that set a config field are built from that field (`option`, or one
per field with `settings_options`): its default and help are the field's, and `read_config`
applies only the flags the user gave, after the YAML file (`--config`) and the `--set`
overrides. Commands that need Ray run inside `ray_runtime.ray_session(address)`, with
`--address` from `ADDRESS_OPTION`.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from xray_ray.config import Config, load_config
from xray_ray.config_field import default_of, field_of, help_of
from xray_ray.images.index import load_index
from xray_ray.images.synth import SYNTHETIC_NOTE

app = typer.Typer(help="Tune, serve and batch-score a chest X-ray classifier on Ray.", no_args_is_help=True)

CONFIG_OPTION = typer.Option(None, "--config", help="YAML config file with any of the sections data, model, lra, "
                             "train, tune, score, serve (see docs/configuration.md).")
SET_OPTION = typer.Option(None, "--set", help="Override a setting, e.g. --set model.backbone=compact (repeatable).")
ADDRESS_OPTION = typer.Option(None, "--address", help="Ray cluster to run on (default RAY_ADDRESS, which `ray job "
                              "submit` sets; otherwise a local Ray on 127.0.0.1 is started and stopped with the "
                              "command).")
GIVEN = ("COMMANDLINE", "ENVIRONMENT")
"""Where a flag's value came from when the user gave it (Typer bundles its own click, so compared by name)."""


@app.callback()
def _main(quiet: bool = typer.Option(False, "--quiet", "-q", help="Only warnings and results.")) -> None:
    """Show the project's own progress lines (LRA epochs, stages) unless --quiet."""
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("xray_ray").setLevel(logging.WARNING if quiet else logging.INFO)


def option(section: type, name: str, *flags: str) -> Any:
    """The Typer option for the setting `name` of the dataclass `section`: the field's default and help.

    A list setting (e.g. score.archives) is a repeatable option whose default is the field's (empty)."""
    spec = field_of(section, name)
    default = default_of(spec)
    return typer.Option(None if isinstance(default, list) else default, *flags, help=help_of(spec))


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


def _plain(value: Any) -> Any:
    """A flag's value as a config field holds it (paths as text)."""
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return str(value) if isinstance(value, Path) else value


def _option_type(hint: Any) -> Any:
    """The type Typer parses a setting's flag as: a list setting is a repeatable text option."""
    return list[str] if hint is list else hint


def settings_options(section: type, flags: dict[str, str] | None = None, only: tuple[str, ...] = ()) -> Callable:
    """A command decorator: one option per field of the dataclass `section` (or of the fields `only`), named
    `--field-name` unless `flags` renames it, each with the field's default and help. The command is called
    with `given`: the fields whose flags the user gave, and their values (the rest keep the config's or the
    dataclass's value)."""
    flags = flags or {}
    hints = typing.get_type_hints(section)

    def decorate(command: Callable) -> Callable:
        names = list(only) or [spec.name for spec in dataclasses.fields(section)]
        added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=_option_type(hints[name]),
                                   default=option(section, name, flags.get(name, f"--{name.replace('_', '-')}")))
                 for name in names]
        context = inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)
        own = [param.replace(kind=inspect.Parameter.KEYWORD_ONLY)
               for param in inspect.signature(command).parameters.values() if param.name != "given"]

        @functools.wraps(command)
        def with_settings(ctx: typer.Context, **values: Any) -> Any:
            given = {name: _plain(values.pop(name)) for name in names
                     if ctx.get_parameter_source(name).name in GIVEN}
            for name in names:
                values.pop(name, None)
            return command(given=given, **values)

        with_settings.__signature__ = inspect.Signature([context, *added, *own])
        return with_settings

    return decorate


def config_options(section: str, flags: dict[str, str] | None = None) -> Callable:
    """A command decorator: `settings_options` for every field of the config section `section`, plus
    `--config` and `--set`. The command is called with `config`: the whole config from the defaults, the
    YAML file, the `--set` overrides and then the flags given, checked once (exit 2 when it is bad)."""
    def decorate(command: Callable) -> Callable:
        own = [param.replace(kind=inspect.Parameter.KEYWORD_ONLY)
               for param in inspect.signature(command).parameters.values() if param.name != "config"]

        @functools.wraps(command)
        def with_config(given: dict, config_file: Path | None, overrides: list[str] | None, **values: Any) -> Any:
            return command(config=read_config(config_file, overrides, section, given), **values)

        keyword = inspect.Parameter.KEYWORD_ONLY
        with_config.__signature__ = inspect.Signature([
            inspect.Parameter("given", keyword, annotation=dict),
            inspect.Parameter("config_file", keyword, annotation=Path, default=CONFIG_OPTION),
            inspect.Parameter("overrides", keyword, annotation=list[str], default=SET_OPTION), *own])
        return settings_options(type(default_of(field_of(Config, section))), flags)(with_config)

    return decorate


def read_config(config_file: Path | None, overrides: list[str] | None, section: str | None = None,
                given: dict[str, Any] | None = None) -> Config:
    """The config from the YAML file, `--set` overrides and the flags `given` for fields of `section` (in that
    order of precedence, lowest first); a bad one is a one-line error (exit 2)."""
    flags = {f"{section}.{name}": value for name, value in (given or {}).items()}
    try:
        return load_config(config_file, overrides, flags)
    except (OSError, ValueError) as err:
        raise fail(str(err))


def read_index(path: Path):
    """An index written by `xray-ray index`; an unreadable one is a one-line error (exit 2)."""
    try:
        return load_index(path)
    except (OSError, ValueError) as err:
        raise fail(f"cannot read the index {path}: {err}")
