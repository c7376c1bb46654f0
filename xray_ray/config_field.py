"""A setting's one definition: its default and its help, on the dataclass field that holds it.

The config sections (`config_training`, `config_services`) declare their settings with
`setting`; the command line builds each option from the same field (`cli.app.option`), so
a default or a help text is written once and `--help`, YAML files and `--set` agree.
"""

from __future__ import annotations

import dataclasses
from typing import Any


def setting(default: Any, help: str, *, words: tuple = ()) -> Any:
    """A dataclass field with its help text; `default` may be a callable for a mutable default (e.g. `list`).

    `words` are accepted non-numbers of a numeric setting (such as `auto`), kept as they are when loaded.
    """
    metadata = {"help": help, "words": words}
    if callable(default):
        return dataclasses.field(default_factory=default, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def field_of(cls: type, name: str) -> dataclasses.Field:
    """The dataclass field `name` of `cls` (KeyError naming the class when there is none)."""
    try:
        return {spec.name: spec for spec in dataclasses.fields(cls)}[name]
    except KeyError:
        raise KeyError(f"{cls.__name__} has no setting {name!r}") from None


def default_of(spec: dataclasses.Field) -> Any:
    """A field's default value (a fresh one for a factory default)."""
    return spec.default_factory() if spec.default_factory is not dataclasses.MISSING else spec.default


def help_of(spec: dataclasses.Field) -> str:
    """A field's help text; every setting a command exposes has one."""
    if "help" not in spec.metadata:
        raise KeyError(f"setting {spec.name!r} has no help text: declare it with config_field.setting")
    return spec.metadata["help"]
