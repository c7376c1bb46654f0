"""The training side's config sections: data, model, LRA, training mechanics and the Tune experiment.

`xray_ray.config.Config` gathers them with the services' sections (`config_services`); the
loader there reads them all the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from xray_ray.config_field import setting

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

    name: str = setting("xray-tune", "Experiment name: its folder under the storage path, reports/tune/NAME and "
                        "models/NAME.")
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
    gpus_per_trial: float | str = setting(0.0, "GPUs per trial, or auto.", words=(AUTO,))
    max_concurrent_trials: int = 0  # 0: as many as the resources allow
    reuse_actors: bool = True  # a finished trial's process runs the next one: TensorFlow is imported once per process
    storage_path: str = setting("tune_results", "Where Tune keeps trials and checkpoints: a local folder (relative: "
                                "under the working folder), a path shared by all nodes, or s3://bucket/prefix.")
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
