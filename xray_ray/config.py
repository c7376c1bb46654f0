"""Class names, defaults and typed configuration, loaded from YAML with dotted overrides.

Every job reads its settings through `load_config`, so a YAML file, a command-line
override (`data.image_size=64`) and the defaults below resolve the same way everywhere.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

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
class DataConfig:
    """How the index becomes training, validation and test batches."""

    image_size: int = 240
    split: tuple[float, float, float] = (0.9, 0.05, 0.05)
    seed: int = 123
    balance: str = "undersample"  # undersample | class_weights | none
    batch_size: int = 32

    def __post_init__(self) -> None:
        self.split = tuple(float(f) for f in self.split)
        if len(self.split) != 3 or abs(sum(self.split) - 1.0) > 1e-6 or min(self.split) < 0:
            raise ValueError(f"data.split must be three non-negative fractions summing to 1, got {self.split}")
        if self.balance not in ("undersample", "class_weights", "none"):
            raise ValueError(f"data.balance must be undersample, class_weights or none, got {self.balance!r}")
        if self.image_size < 32:
            raise ValueError(f"data.image_size must be at least 32, got {self.image_size}")


BACKBONES = ("efficientnetb1", "compact")


@dataclass
class ModelConfig:
    """The network: backbone, its weights and trainability, and the origin's head."""

    backbone: str = "efficientnetb1"  # efficientnetb1 (the origin's) | compact (CPU demos/tests)
    weights: str = "imagenet"  # imagenet | none | path to a local weights file
    trainable: str = "all"  # all | head | a backbone layer name to unfreeze from, e.g. block6a
    units: int = 256
    l2: float = 0.016
    l1: float = 0.006
    dropout: float = 0.45
    learning_rate: float = 0.001
    bn_momentum: float = 0.99

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"model.backbone must be one of {', '.join(BACKBONES)}, got {self.backbone!r}")
        if not 0 <= self.dropout < 1 or not 0 < self.bn_momentum < 1 or self.learning_rate <= 0:
            raise ValueError("model.dropout must be in [0, 1), model.bn_momentum in (0, 1), learning_rate > 0")


@dataclass
class LRAConfig:
    """The LRA callback; `epochs` bounds training where the origin asked interactively."""

    epochs: int = 40
    patience: int = 1
    stop_patience: int = 3
    threshold: float = 0.9
    factor: float = 0.5
    dwell: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.patience < 1 or self.stop_patience < 1 or not 0 < self.factor < 1:
            raise ValueError("lra.epochs, patience and stop_patience must be >= 1 and lra.factor in (0, 1)")


@dataclass
class TrainConfig:
    """Training mechanics that are not hyperparameters of the network."""

    bn_refresh_batches: int = 50  # batches to re-estimate BatchNorm statistics after training from scratch
    # Images per refresh batch. Averaging per-batch variances underestimates the population's,
    # and more so for small batches, so the refresh uses batches of at least this size.
    bn_refresh_batch_size: int = 64
    # Batches to re-estimate BatchNorm statistics on before each validation pass when training from
    # scratch, so validation scores what would be exported (0: Keras's moving averages, which lag).
    validation_bn_refresh_batches: int = 4
    verbose: int = 0  # Keras fit verbosity; the LRA prints its own line per epoch


AUTO = "auto"  # a setting resolved when the job starts (tune.gpus_per_trial)

METRICS = {"val_accuracy": "max", "val_loss": "min"}

# The searched hyperparameters: setting name in the `tune:` section -> the dotted config key it sets.
SEARCHED = {"dropout": "model.dropout", "l2": "model.l2", "lra_factor": "lra.factor", "lra_patience": "lra.patience"}
LOG_SCALE = {"l2"}
INTEGER = {"lra_patience"}


@dataclass
class TuneConfig:
    """The `tune:` section: the Ray Tune + Optuna experiment (xray_ray.tune).

    Each searched hyperparameter is a [low, high] pair (inclusive); low == high fixes it.
    """

    name: str = "xray-tune"  # experiment name: its folder under storage_path, reports/tune/<name>, models/<name>
    num_samples: int = 12  # trials in the experiment (the first one is the base config's point)
    metric: str = "val_accuracy"  # val_accuracy (maximised) | val_loss (minimised)
    seed: int = 123  # Optuna TPE sampler seed
    startup_trials: int = 4  # TPE samples at random for this many trials before modelling
    dropout: list = field(default_factory=lambda: [0.2, 0.6])  # uniform
    l2: list = field(default_factory=lambda: [1e-4, 5e-2])  # log-uniform
    lra_factor: list = field(default_factory=lambda: [0.2, 0.8])  # uniform
    lra_patience: list = field(default_factory=lambda: [1, 3])  # integer
    start_from_base: bool = True  # evaluate the base config's values (the origin's defaults) first
    scheduler: str = "asha"  # asha | none
    grace_period: int = 2  # ASHA: epochs every trial gets before it can be stopped
    reduction_factor: int = 2  # ASHA: keep the best 1/reduction_factor at each rung
    cpus_per_trial: float = 1.0
    # A number, or `auto`: 1 when the Ray cluster has GPUs when the experiment starts, else 0 (CPU only;
    # logged). An autoscaling cluster whose GPU nodes start on demand needs an explicit 1.
    gpus_per_trial: float | str = field(default=0.0, metadata={"words": (AUTO,)})
    max_concurrent_trials: int = 0  # 0: as many as the resources allow
    reuse_actors: bool = True  # a finished trial's process runs the next one: TensorFlow is imported once per process
    storage_path: str = "tune_results"  # local folder (relative: under the working folder), shared path or s3://
    keep_checkpoints: int = 1  # per trial, best by best_<metric>; the latest is always kept too
    max_failures: int = 2  # retries of a failed trial (from its last checkpoint)

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"tune.metric must be one of {', '.join(METRICS)}, got {self.metric!r}")
        if self.scheduler not in ("asha", "none"):
            raise ValueError(f"tune.scheduler must be asha or none, got {self.scheduler!r}")
        for key in SEARCHED:
            bounds = getattr(self, key)
            if not isinstance(bounds, (list, tuple)) or len(bounds) != 2:
                raise ValueError(f"tune.{key} must be [low, high], got {bounds!r}")
            low, high = (int(b) for b in bounds) if key in INTEGER else (float(b) for b in bounds)  # YAML reads 1e-4 as text
            if low > high or (key in LOG_SCALE and low <= 0):
                raise ValueError(f"tune.{key}: need {'0 < ' if key in LOG_SCALE else ''}low <= high, got {bounds!r}")
            setattr(self, key, [low, high])
        if self.num_samples < 1 or self.keep_checkpoints < 1 or self.max_failures < 0 or self.cpus_per_trial <= 0:
            raise ValueError("tune.num_samples and keep_checkpoints must be >= 1, max_failures >= 0, cpus_per_trial > 0")
        if self.gpus_per_trial != AUTO and self.gpus_per_trial < 0 or self.max_concurrent_trials < 0 or self.grace_period < 1 or self.reduction_factor < 2:
            raise ValueError("tune.gpus_per_trial (or auto) and max_concurrent_trials must be >= 0, grace_period >= 1, "
                             "reduction_factor >= 2")

    @property
    def mode(self) -> str:
        return METRICS[self.metric]

    @property
    def score(self) -> str:
        """The reported metric that ranks trials: `metric` at the epoch whose weights the trial keeps."""
        return f"best_{self.metric}"



@dataclass
class Config:
    """All settings of a job; sections are added as the jobs that use them are."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lra: LRAConfig = field(default_factory=LRAConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)


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


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file (if any), then `section.key=value` overrides."""
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
