"""What a scoring run is asked to do (`ScoreOptions`), checked before any work, and the model that will answer.

`ScoreError` is how a run refuses to start, with the command's exit code: 2 bad
configuration, 3 unusable model (or no running Serve app, or not the version expected),
4 unreachable archive.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from xray_ray.config import CLASS_NAMES
from xray_ray.model_folder.card import ModelCard
from xray_ray.model_folder.classifier import load_detector
from xray_ray.scoring.explain import DEFAULT_EXPLAIN
from xray_ray.scoring.pipeline import serve_handle

BACKENDS = ("actors", "serve")


class ScoreError(RuntimeError):
    """A run that cannot start; `exit_code` 2 configuration, 3 model, 4 archive."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class ScoreOptions:
    """Everything one scoring run needs; `check` validates it before any work starts."""

    archives: list[str]
    out: str
    model: str | None = None  # exported model folder; optional with backend "serve"
    backend: str = "actors"  # actors | serve
    engine: str = "auto"  # auto | onnxruntime | keras (actors backend)
    actors: int = 0  # 0: autoscale from 1 up to what fits the cluster (scoring.pool)
    cpus_per_actor: float = 0.0  # 0: chosen from the cluster (scoring.pool)
    gpus_per_actor: float | None = None  # None: 1 where the cluster has GPUs, else 0
    threads: int = 0  # ONNX Runtime intra-op threads per actor; 0: the CPUs Ray gave the actor
    batch_size: int = 32
    read_cpus: float = 0.5  # CPUs reserved per read/decode task: fractional so actors never starve reading
    labels: str | None = None  # CSV of (path, label) ground truth; class folders are used otherwise
    review_threshold: float = 0.6
    top_n: int = 10
    explain: int = DEFAULT_EXPLAIN  # review images given a heat map in the report (0: none)
    run: str | None = None  # run folder name; default today's date
    commit_rows: int = 1000  # rows per committed predictions part (at least one task's files)
    files_per_task: int = 256  # files per read task; results arrive (and are committed) a task at a time
    object_store_mb: int = 256  # cap on decoded inputs waiting for the model: memory stays flat in archive size
    follow_symlinks: bool = False  # read files that symlinks lead to outside the archive folders
    expect_version: str | None = None  # refuse (exit 3) a model whose card names another version

    def check(self) -> None:
        """Raise ScoreError(exit 2) for a setting that cannot work."""
        problems = []
        if not self.archives:
            problems.append("give at least one --archive")
        if self.backend not in BACKENDS:
            problems.append(f"--backend must be one of {', '.join(BACKENDS)}, not {self.backend!r}")
        if self.backend == "actors" and not self.model:
            problems.append("--model is required with the actors backend")
        if self.engine not in ("auto", "onnxruntime", "keras"):
            problems.append(f"--engine must be auto, onnxruntime or keras, not {self.engine!r}")
        for name in ("batch_size", "top_n", "commit_rows", "files_per_task", "object_store_mb"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be at least 1")
        if min(self.actors, self.threads, self.cpus_per_actor, self.gpus_per_actor or 0) < 0 or self.read_cpus <= 0:
            problems.append("--actors, --threads, --cpus-per-actor and --gpus-per-actor must be >= 0, --read-cpus > 0")
        if self.explain < 0:
            problems.append("--explain must be >= 0")
        if not 0 <= self.review_threshold <= 1:
            problems.append(f"--review-threshold must be between 0 and 1, not {self.review_threshold}")
        if self.labels and not Path(self.labels).is_file():
            problems.append(f"--labels file not found: {self.labels}")
        if self.run is not None and (not self.run or self.run.startswith(".") or os.sep in self.run):
            problems.append(f"--run must be a plain folder name, not {self.run!r}")
        if problems:
            raise ScoreError("; ".join(problems), 2)


@dataclass
class ModelInfo:
    """What will answer: version, engine, input size (from the model card or the Serve app)."""

    version: str
    engine: str
    image_size: int
    classes: list[str] = field(default_factory=lambda: list(CLASS_NAMES))
    baseline: dict = field(default_factory=dict)  # ModelCard.baseline(): what the drift check compares with


def model_info(options: ScoreOptions) -> ModelInfo:
    """Check that the model (or the Serve app) can answer, without loading it here; ScoreError(3) if not."""
    if options.backend == "serve":
        try:
            info = serve_handle().describe.remote().result()
        except Exception as err:  # noqa: BLE001 - any failure means there is no app to send batches to
            raise ScoreError(f"no running Serve application to score with ({type(err).__name__}: {err}); "
                             "start it with `xray-ray serve` or use --backend actors", 3) from None
        found = ModelInfo(info["model_version"], info["engine"], int(info["image_size"]), list(info["classes"]),
                          info.get("baseline", {}))
    else:
        found = _card_info(Path(options.model), options.engine)
    if found.classes != list(CLASS_NAMES):
        raise ScoreError(f"the model's classes {found.classes} are not {list(CLASS_NAMES)}", 3)
    if options.expect_version is not None and found.version != options.expect_version:
        raise ScoreError(f"the model is version {found.version!r}, not the expected {options.expect_version!r}", 3)
    return found


def _card_info(folder: Path, engine: str) -> ModelInfo:
    try:
        card = ModelCard.read(folder)
        load_detector(card)  # an unreadable detector would otherwise fail every actor, after the run began
        chosen, _, _ = card.choose_engine(engine)
        return ModelInfo(card.version, chosen, card.image_size, card.classes, card.baseline())
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as err:
        raise ScoreError(f"cannot use the model in {folder}: {err}", 3) from None
