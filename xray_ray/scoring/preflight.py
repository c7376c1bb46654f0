"""What a scoring run checks before any work: its `score:` settings, archives, labels, the model that will answer,
and the free space its outputs need.

`ScoreError` is how a run refuses to start, with the command's exit code: 2 bad
configuration, 3 unusable model (or no running Serve app, or not the version expected),
4 unreachable archive, 5 (`DISK_FULL`) not enough free space in the output folder (also the
code of a run that a full disk ends half way), 6 a PACS that cannot be reached or refuses the
credentials (`scoring.pacs`). Everything here but the Serve backend's model runs before Ray
starts, so a refused run costs nothing. A PACS run's space estimate counts no rows: its
instances are only known once QIDO-RS has listed them.

The space estimate (`space_needed`): the rows the run will write are the archive's entries (one
more walk, as discovery makes it: names, and the first bytes of files without an extension) less
the keys the ledger already holds for this model version (the Serve backend's version is not
known before Ray: all entries). Each row is counted at `ROW_BYTES` (its predictions and ledger
rows, its line in the file list and in the report's CSVs: 0.8 KB measured with 85-character
paths, so 1.5 KB leaves room for paths twice as long), each committed part at `PART_BYTES` (the
Parquet footers of a part and its ledger file, 17 KB measured, and block rounding), plus
`REPORT_BYTES` for the report page, figures and JSON files (0.2 MB measured) and
`HEAT_MAP_BYTES` per heat map `--explain` allows (a 256 px thumbnail and its overlay); the sum
is doubled (`SPACE_MARGIN`), since other writers share the disk. An archive that lost files
since the ledger was written can make the estimate short; a disk that fills during the run is
caught there (`ends_on_full_disk`) with the same code.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

from xray_ray.config import CLASS_NAMES
from xray_ray.config_services import ScoreConfig
from xray_ray.model_folder.card import ModelCard
from xray_ray.model_folder.classifier import check_before_workers, load_detector
from xray_ray.model_folder.registry import current_folder
from xray_ray.scoring import archive, ledger
from xray_ray.scoring.pipeline import serve_handle

log = logging.getLogger(__name__)

DISK_FULL = 5
"""Exit code of a run refused, or ended half way, for want of free space in its output folder."""
ROW_BYTES = 1536
PART_BYTES = 32 * 1024
REPORT_BYTES = 2**20
HEAT_MAP_BYTES = 256 * 1024
SPACE_MARGIN = 2


class ScoreError(RuntimeError):
    """A run that cannot start (or, for `DISK_FULL`, go on); `exit_code` 2 configuration, 3 model, 4 archive,
    5 free space."""

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
    """Check that the model (or the Serve app) can answer: its card, detector and golden set
    (`check_before_workers`), without starting Ray; ScoreError(3) if not."""
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
        check_before_workers(card)  # and so would a folder that no longer answers its golden set
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
    rows: int = 0  # the rows the run is expected to write (the space estimate's)
    options: ScoreConfig | None = None  # the settings checked, `score.registry`'s current model as `score.model`
    pacs: object | None = None  # the `dicomweb.PacsClient` of a run that scores a PACS, once it has answered


def check_run(options: ScoreConfig) -> RunInputs:
    """Every check that needs no Ray, in the order of the exit codes: settings (2), archives (4) or the PACS (6),
    labels (2), the model folder (3), then free space (5), which needs the archives and the model version."""
    if missing := options.missing():
        raise ScoreError("; ".join(missing), 2)
    if options.sr_heatmaps and not (options.model or options.registry):
        raise ScoreError("score.sr_heatmaps draws heat maps with the model folder: give --model or --registry", 2)
    try:
        roots = [archive.check_root(root) for root in options.archives]
    except archive.ArchiveError as err:
        raise ScoreError(str(err), 4) from None
    pacs = None
    if options.pacs:  # the PACS stands where the archives do: reachable with these credentials, or exit 6
        from xray_ray.scoring.pacs import connect

        pacs = connect(options)
    options = registry_model(options)
    if options.labels and not Path(options.labels).is_file():
        raise ScoreError(f"--labels file not found: {options.labels}", 2)
    try:
        truth = archive.read_labels(options.labels) if options.labels else None
    except (OSError, ValueError) as err:
        raise ScoreError(f"cannot read --labels: {err}", 2) from None
    info = None if options.backend == "serve" else model_info(options)
    return RunInputs(roots, truth, info, check_space(options, roots, info), options, pacs)


def registry_model(options: ScoreConfig) -> ScoreConfig:
    """`options` scoring with `score.registry`'s current model folder (read once: a promotion during the run
    does not change the model of its rows); ScoreError(3) when the registry has none."""
    if not options.registry:
        return options
    try:
        folder = current_folder(options.registry)
    except (OSError, ValueError, KeyError) as err:
        raise ScoreError(f"cannot use the registry {options.registry}: {err}", 3) from None
    log.info("scoring with %s, the current model of the registry %s", folder.name, options.registry)
    return replace(options, model=str(folder.resolve()), registry=None)


def space_needed(rows: int, options: ScoreConfig) -> int:
    """Bytes a run that writes `rows` rows needs in its output folder, margin included (the module's estimate)."""
    parts = -(-rows // options.commit_rows)
    return SPACE_MARGIN * (rows * ROW_BYTES + parts * PART_BYTES + REPORT_BYTES + options.explain * HEAT_MAP_BYTES)


def free_space(out: str | Path) -> int:
    """Bytes this user may still write on the filesystem that holds (or will hold) `out`."""
    folder = Path(out).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def is_disk_full(err: BaseException) -> bool:
    """True for a write refused for want of space (no space left on the device, or the user's quota used up)."""
    return isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)


def no_space(out: str | Path, rows: int, options: ScoreConfig, cause: OSError | None = None) -> ScoreError:
    """The `DISK_FULL` error naming the folder, the bytes needed for `rows` more rows and the bytes free: before
    the run, or (`cause`: the failed write) when the disk filled up during it."""
    needed, free = space_needed(rows, options), free_space(out)
    if cause is None:
        what, then = f"not enough free space for this run in {out}", "free some space or choose another --out"
    else:
        failed = f"{cause.strerror or cause}" + (f": {cause.filename}" if cause.filename else "")
        what = f"the disk holding {out} is full ({failed})"
        then = "the parts committed so far are kept; free some space and run the same command again to finish"
    return ScoreError(f"{what}: about {needed:,} bytes needed ({needed / 2**20:.1f} MB), {free:,} bytes free "
                      f"({free / 2**20:.1f} MB); {then}", DISK_FULL)


def check_space(options: ScoreConfig, roots: list[Path], info: ModelInfo | None) -> int:
    """The rows the run is expected to write; `no_space` (exit 5) when the output folder's filesystem lacks the
    space they need (the module's estimate)."""
    out = Path(options.out).resolve()
    entries = sum(1 for _ in archive.walk_all(roots, out, options.follow_symlinks))
    rows = max(entries - (len(ledger.known_keys(out, info.version)) if info is not None else 0), 0)
    if space_needed(rows, options) > free_space(out):
        raise no_space(out, rows, options)
    return rows


@contextlib.contextmanager
def ends_on_full_disk(out: Path, options: ScoreConfig, rows: int, state: dict):
    """Turn a write refused for want of space during a run into `no_space` (exit 5) for the `rows` expected less
    `state["scored_now"]` committed, after removing the file lists under `out` (the caller holds its lock: they
    are left over, and their space comes back at once)."""
    try:
        yield
    except OSError as err:
        if not is_disk_full(err):
            raise
        for work in out.glob("*/.work"):
            shutil.rmtree(work, ignore_errors=True)
        log.error("disk full after %d rows committed: %s", state["scored_now"], err)
        raise no_space(out, max(rows - state["scored_now"], 0), options, err) from None
