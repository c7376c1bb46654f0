"""Class names and the one typed configuration of every job, loaded from YAML with dotted overrides.

`Config` has one section per concern: data, model, lra, train and tune
(`config_training`), score and serve (`config_services`). Every command reads its
settings through `load_config`: the fields' defaults, then a YAML file, then
`--set section.key=value` overrides, then the command's own flags, resolve the same way
everywhere.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from xray_ray.config_services import ScoreConfig, ServeConfig
from xray_ray.config_training import DataConfig, LRAConfig, ModelConfig, TrainConfig, TuneConfig

CLASS_NAMES: tuple[str, ...] = ("COVID", "Lung_Opacity", "Normal", "Viral Pneumonia")
"""The four labels, in the model's output order."""

SERVE_APP_NAME = "xray-ray"
SERVE_DEPLOYMENT_NAME = "XrayClassifier"
"""The Serve application and deployment: named here because Serve deploys them and scoring's serve backend finds them."""


def _fold(name: str) -> str:
    return re.sub(r"[\s_\-]+", "", name).lower()


_FOLDED = {_fold(name): name for name in CLASS_NAMES}


def canonical_label(name: str) -> str | None:
    """Map a folder name such as `viral_pneumonia` or `LUNG OPACITY` to its class, or None."""
    return _FOLDED.get(_fold(name))


@dataclass
class Config:
    """All settings of every job, one section per concern."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lra: LRAConfig = field(default_factory=LRAConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)


def _coerce(value: str) -> Any:
    """Parse an override's value as JSON, else as YAML (numbers, booleans, lists, bare words)."""
    try:
        return json.loads(value)
    except ValueError:
        return yaml.safe_load(value)


def _typed(default: Any, value: Any, name: str, words: tuple = ()) -> Any:
    """`value` converted to the type of the setting's default (YAML reads `1e-5` as text);
    `words` are the setting's accepted non-numbers (such as `auto`), kept as they are."""
    if value in words or isinstance(default, bool) or default is None or isinstance(value, type(default)):
        return value
    if isinstance(default, (int, float)) and not isinstance(value, bool):
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a number, got {value!r}") from None
        if isinstance(default, int) and not number.is_integer():
            raise ValueError(f"{name} must be a whole number, got {value!r}")
        return type(default)(number)
    return value


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {dotted!r}: {key!r} is not a section")
    node[leaf] = value


def _build(cls: type, values: dict, where: str) -> Any:
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"unknown setting(s) in {where or 'config'}: {', '.join(unknown)}")
    kwargs = {}
    for name, value in values.items():
        spec = known[name]
        default = spec.default_factory() if spec.default_factory is not dataclasses.MISSING else spec.default
        if dataclasses.is_dataclass(default):
            if not isinstance(value, dict):
                raise ValueError(f"{where}{name} must be a section, got {value!r}")
            kwargs[name] = _build(type(default), value, f"{where}{name}.")
        else:
            kwargs[name] = _typed(default, value, f"{where}{name}", spec.metadata.get("words", ()))
    return cls(**kwargs)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                values: Mapping[str, Any] | None = None) -> Config:
    """Defaults, then the YAML file (if any), then `section.key=value` overrides, then `values`
    (dotted keys: a command's flags), all checked once, together."""
    tree: dict = {}
    if path is not None:
        text = Path(path).read_text()
        tree = yaml.safe_load(text) or {}
        if not isinstance(tree, dict):
            raise ValueError(f"{path}: the config must be a mapping of sections")
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} must look like section.key=value")
        _set_dotted(tree, key.strip(), _coerce(value))
    for key, value in (values or {}).items():
        _set_dotted(tree, key, value)
    return _build(Config, tree, "")


def config_to_dict(config: Config) -> dict:
    """A plain, JSON-ready dict of a config (for model cards and reports)."""
    return dataclasses.asdict(config)


def flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    """Nested sections as dotted keys: {"model": {"dropout": 0.3}} -> {"model.dropout": 0.3} (empty sections kept)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def flat_config(config: Config) -> dict[str, Any]:
    """The config as dotted keys (`model.dropout`), as overrides and search spaces name them."""
    return flatten(config_to_dict(config))


def config_from_dict(saved: Mapping) -> Config:
    """A Config back from `config_to_dict` output (e.g. saved with an experiment); unknown sections are ignored."""
    sections = {f.name for f in dataclasses.fields(Config)}
    return with_overrides(Config(), flatten({key: value for key, value in saved.items() if key in sections}))


def with_overrides(config: Config, values: dict[str, Any]) -> Config:
    """A validated copy of `config` with dotted keys replaced, e.g. {"model.dropout": 0.3}."""
    tree = config_to_dict(config)
    for key, value in values.items():
        _set_dotted(tree, key, value)
    return _build(Config, tree, "")
