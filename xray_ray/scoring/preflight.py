"""What a scoring run checks before any work: its `score:` settings, archives, labels, and the model that will answer.

`ScoreError` is how a run refuses to start, with the command's exit code: 2 bad
configuration, 3 unusable model (or no running Serve app, or not the version expected),
4 unreachable archive. Everything here but the Serve backend's model runs before Ray
starts, so a refused run costs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from xray_ray.config import CLASS_NAMES
from xray_ray.config_services import ScoreConfig
from xray_ray.model_folder.card import ModelCard
from xray_ray.model_folder.classifier import load_detector
from xray_ray.scoring import archive
from xray_ray.scoring.pipeline import serve_handle


class ScoreError(RuntimeError):
    """A run that cannot start; `exit_code` 2 configuration, 3 model, 4 archive."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class ModelInfo:
    """What will answer: version, engine, input size (from the model card or the Serve app)."""

    version: str
    engine: str
    image_size: int
    classes: list[str] = field(default_factory=lambda: list(CLASS_NAMES))
    baseline: dict = field(default_factory=dict)  # ModelCard.baseline(): what the drift check compares with


def model_info(options: ScoreConfig) -> ModelInfo:
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


@dataclass
class RunInputs:
    """What a run's checks found: the archive roots, the true labels (if given), the model (None until Ray
    is up for the Serve backend, whose model is asked through Ray)."""

    roots: list[Path]
    truth: dict | None
    info: ModelInfo | None


def check_run(options: ScoreConfig) -> RunInputs:
    """Every check that needs no Ray, in the order of the exit codes: settings (2), archives (4), labels (2),
    the model folder (3)."""
    if missing := options.missing():
        raise ScoreError("; ".join(missing), 2)
    try:
        roots = [archive.check_root(root) for root in options.archives]
    except archive.ArchiveError as err:
        raise ScoreError(str(err), 4) from None
    if options.labels and not Path(options.labels).is_file():
        raise ScoreError(f"--labels file not found: {options.labels}", 2)
    try:
        truth = archive.read_labels(options.labels) if options.labels else None
    except (OSError, ValueError) as err:
        raise ScoreError(f"cannot read --labels: {err}", 2) from None
    return RunInputs(roots, truth, None if options.backend == "serve" else model_info(options))
