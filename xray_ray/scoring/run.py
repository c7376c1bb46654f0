"""Nightly archive scoring: discovery, the Ray Data pipeline, committed parts, ledger, report.

One call of `score` is one run: `<out>/<run>/` (the date by default, `.2`, `.3`... when a
different model version already scored that date) receives `predictions/part-*.parquet`
as results stream in, each part written atomically and recorded in the ledger
(`scoring.ledger`), then `report/`. Files whose content the ledger already holds for this
model version are skipped, so running the same night again scores nothing new, the next
night scores only new files, and a new model version rescores everything. A run killed
half way (driver or actor) is completed by running the same command again: committed
parts stay, their files are skipped, the rest is scored. A lock on `<out>` keeps two
drivers from writing the same output at once. Before anything else a run repairs the
ledger (`ledger.repair`): damaged parts and ledger files left by a power loss are moved to
`<out>/quarantine/` and what they covered is scored again.

While it runs the driver exports live Prometheus metrics through Ray, and at the end the
run's figures go to `<run>/metrics.prom` and `<out>/xray_scoring.prom` for node-exporter
(`scoring.metrics`).

Scoring stays inside the archive folders: symlinks that lead outside them become
`outside_archive` error rows unless `follow_symlinks` is set, and `out` is never walked.

Errors that stop a run before it starts are `ScoreError`s with an exit code: 2 bad
configuration, 3 unusable model (or no running Serve app, or not the version expected),
4 unreachable archive, 5 not enough free space in `out` (`preflight.check_space`), 6 a PACS
that cannot be reached (`scoring.pacs`; a PACS run lists its instances over QIDO-RS instead of
walking folders, and writes DICOM SRs with `scoring.dicom_out`). A disk
that fills up during the run ends it with exit 5 too: the write that failed leaves nothing
behind (temp files are removed, a part whose ledger file could not be written is taken back),
the file list is removed to give space back, and what was committed stays, so running the
same command once there is space completes the run. Anything that goes wrong for one file is
that file's error row; an entry that still cannot be read (`ledger.STILL_FAILING`) is listed
in the night's report without a new row.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import pandas as pd

from xray_ray.files import atomic_path, atomic_write_text, fsync_folder
from xray_ray.config_services import ScoreConfig
from xray_ray.ray_runtime import metrics_collected, metrics_url, require_ray
from xray_ray.reports.tables import write_json
from xray_ray.scoring import ledger
from xray_ray.scoring.dicom_out import DicomResults
from xray_ray.scoring.file_list import write_file_list
from xray_ray.scoring.metrics import LiveRunMetrics, write_textfiles
from xray_ray.scoring.pacs import write_instance_list
from xray_ray.scoring.preflight import (
    ModelInfo,
    RunInputs,
    ScoreError,
    check_run,
    ends_on_full_disk,
    model_info,
)
from xray_ray.scoring.pipeline import (
    PREDICTION_COLUMNS,
    ActorScorer,
    ServeScorer,
    read_chunks,
)
from xray_ray.scoring.pool import PoolPlan, PoolRefused, cluster_totals, plan_pool
from xray_ray.scoring.report import write_report
from xray_ray.scoring.timing import StageTimes

log = logging.getLogger(__name__)

RUN_FILE = "run.json"


@contextlib.contextmanager
def _locked(out: Path):
    """Hold an exclusive lock on `<out>/.lock` (freed by the OS if this process dies)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ScoreError(f"another scoring run is writing to {out}; try again when it has finished", 2) from None
        yield


def _run_version(folder: Path) -> str | None:
    """The model version of the run in `folder` (run.json, or its parts if run.json is damaged); None if empty."""
    try:
        return json.loads((folder / RUN_FILE).read_text())["model_version"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        versions = read_predictions(folder)["model_version"].dropna().unique()
        log.warning("%s is damaged; the run's model version is taken from its predictions (%s)",
                    folder / RUN_FILE, ", ".join(versions) or "none yet")
        return versions[0] if len(versions) else None


def run_folder(out: Path, name: str | None, version: str) -> Path:
    """`<out>/<name>`, or `<name>.2`, `.3`... when that folder holds another model version's run."""
    base = name or time.strftime("%Y-%m-%d")
    for n in range(1, 1000):
        folder = out / (base if n == 1 else f"{base}.{n}")
        if _run_version(folder) in (None, version):
            return folder
    raise ScoreError(f"too many runs named {base} in {out}", 2)


def _as_rows(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """The pipeline's batches as prediction rows, typed as parts store them (size unknown: null; times in UTC)."""
    frame = pd.concat(frames, ignore_index=True)[PREDICTION_COLUMNS]
    frame["size"] = frame["size"].astype("Int64").mask(frame["size"] < 0)
    frame["scored_at"] = pd.to_datetime(frame["scored_at"]).dt.tz_localize("UTC")
    return frame


def _write_part(folder: Path, out: Path, frames: list[pd.DataFrame]) -> int:
    """Commit rows as the next predictions part, then its ledger file; returns the rows written.

    A part counts only with its ledger file: when that cannot be written (a full disk) the part is removed again
    before the error goes on, so the ledger and the parts agree (`scoring.ledger`).
    """
    if not frames:
        return 0
    frame = _as_rows(frames)
    parts = folder / ledger.PARTS_DIR
    number = 1 + max((int(p.stem.split("-")[1]) for p in parts.glob("part-*.parquet")), default=0)
    part = parts / f"part-{number:05d}.parquet"
    with atomic_path(part) as tmp:
        frame.to_parquet(tmp, index=False)
    try:
        ledger.record(out, folder.name, part, frame)
    except BaseException:
        part.unlink(missing_ok=True)
        fsync_folder(parts)
        raise
    return len(frame)


def read_predictions(folder: str | Path) -> pd.DataFrame:
    """The committed prediction rows of one run folder: the latest row of each file.

    A file has more than one row only when an earlier attempt failed in a way worth retrying
    (`ledger.RETRIED_CODES`) and the same run was run again; the later answer counts.
    """
    parts = sorted((Path(folder) / ledger.PARTS_DIR).glob("part-*.parquet"))
    if not parts:
        return pd.DataFrame(columns=PREDICTION_COLUMNS)
    frame = pd.concat([pd.read_parquet(p).reindex(columns=PREDICTION_COLUMNS) for p in parts], ignore_index=True)
    frame["error_code"] = frame["error_code"].fillna("")
    return frame.drop_duplicates(subset="path", keep="last").reset_index(drop=True)


def _night_rows(folder: Path, still: pd.DataFrame) -> pd.DataFrame:
    """What the night's report shows: the run's committed rows, and the entries still failing since an earlier
    night (`ledger.STILL_FAILING`), which have no row in this run."""
    committed = read_predictions(folder)
    frames = [frame for frame in (committed, still[~still["path"].isin(committed["path"])]) if len(frame)]
    return pd.concat(frames, ignore_index=True) if frames else committed


def plan(options: ScoreConfig) -> PoolPlan:
    """The actor pool for this run on the connected cluster; ScoreError(2) for one that could never progress."""
    cpus, gpus = cluster_totals()
    try:
        if options.backend == "serve":  # these actors only wait on the Serve replicas, which hold the model
            return plan_pool(cpus, 0.0, options.read_cpus, options.actors or 1, 0.1, 0.0)
        return plan_pool(cpus, gpus, options.read_cpus, options.actors, options.cpus_per_actor, options.gpus_per_actor)
    except PoolRefused as err:
        raise ScoreError(f"this scoring pool cannot make progress: {err}", 2) from None


def _scorer(options: ScoreConfig) -> tuple[type, dict]:
    """The scorer class and its constructor arguments (the inputs go on to the driver for SR heat maps)."""
    if options.backend == "serve":
        return ServeScorer, {"keep_pixels": options.sr_heatmaps}
    threads = options.threads or None  # None: engines.onnx_threads, the CPUs Ray assigned (as in Serve)
    return ActorScorer, {"model_dir": str(Path(options.model).resolve()), "engine": options.engine, "threads": threads,
                         "keep_pixels": options.sr_heatmaps}


def scoring_dataset(files: Path, image_size: int, known, scorer: tuple[type, dict], pool: PoolPlan,
                    options: ScoreConfig, pacs=None):
    """The pipeline as a Ray Dataset: the file list's chunks (`scoring.file_list`) read (from `pacs`, a
    `dicomweb.PacsClient`, when the list holds its instances), hashed, decoded and preprocessed by read tasks,
    then scored by a pool of `scorer` actors (a `pipeline.Scorer` class and its constructor arguments), under
    the run's object-store budget."""
    import ray  # heavy: imported where the pipeline is built

    scorer_class, kwargs = scorer
    chunks = [{"chunk": str(path)} for path in sorted(files.glob("files-*.parquet"))]
    ds = ray.data.from_items(chunks, override_num_blocks=len(chunks))
    ds = ds.map_batches(read_chunks, fn_kwargs={"image_size": image_size, "known": ray.put(known), "pacs": pacs},
                        batch_size=1, batch_format="numpy", num_cpus=pool.read_cpus)
    ds = ds.map_batches(scorer_class, fn_constructor_kwargs=kwargs, batch_size=options.batch_size,
                        batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(min_size=pool.min_actors, max_size=pool.max_actors),
                        num_cpus=pool.cpus_per_actor, num_gpus=pool.gpus_per_actor)
    # Reading outruns inference: uncapped, decoded inputs would pile up in the object store in
    # proportion to the archive. A fixed budget makes the reads wait instead.
    execution = ds.context.execution_options
    execution.resource_limits = execution.resource_limits.copy(object_store_memory=options.object_store_mb * 2**20)
    # Blocks of about one model batch of packed inputs: Ray Data otherwise gathers a read task's whole
    # output (files_per_task images) into one block, so the actors wait for a whole task's reading and the
    # first rows wait for a whole task's predictions.
    ds.context.target_max_block_size = max(options.batch_size * image_size**2, 2**16)
    return ds


def _score_files(options: ScoreConfig, pool: PoolPlan, files: Path, info: ModelInfo, known, folder: Path,
                 out: Path, times: StageTimes, live: LiveRunMetrics, state: dict, results: DicomResults,
                 pacs=None) -> pd.DataFrame:
    """Run the pipeline over the file list, writing the DICOM results of the answers (`results`) and committing
    parts as rows arrive (`state["scored_now"]` counts their rows); returns the still-failing entries' rows,
    which are reported, not committed."""
    ds = scoring_dataset(files, info.image_size, known, _scorer(options), pool, options, pacs)
    pending, rows, still = [], 0, []
    for batch in ds.iter_batches(batch_size=None, batch_format="pandas"):
        times.mark("first_result_s")
        repeated = batch["status"] == ledger.STILL_FAILING
        batch.loc[repeated, "status"] = "error"
        times.add_rows(batch)
        live.add(batch)
        if repeated.any():
            still.append(batch[repeated])
            batch = batch[~repeated]
        if results.active:
            with times.measure("dicom_results"):
                batch = results.add(batch)
        if len(batch):
            pending.append(batch)
            rows += len(batch)
        if rows >= options.commit_rows:
            with times.measure("write"):
                state["scored_now"] += _write_part(folder, out, pending)
            log.info("%d rows committed", state["scored_now"])
            pending, rows = [], 0
    with times.measure("write"):
        state["scored_now"] += _write_part(folder, out, pending)
    return _as_rows(still) if still else pd.DataFrame(columns=PREDICTION_COLUMNS)


def score(options: ScoreConfig, checked: RunInputs | None = None) -> dict:
    """Run (or complete) one scoring run inside the caller's Ray session and write its report; returns the
    report's summary. `checked`: `preflight.check_run`'s findings when the caller checked before Ray started."""
    checked = checked or check_run(options)
    options = checked.options or options
    require_ray("scoring")
    roots, truth = checked.roots, checked.truth
    out = Path(options.out).resolve()
    times = StageTimes()
    info = checked.info or model_info(options)  # the Serve backend's model is asked through Ray
    pool = plan(options)
    log.info("scoring pool: %s", pool.describe())
    state = {"scored_now": 0}
    with _locked(out), ends_on_full_disk(out, options, checked.rows, state):
        ledger.repair(out)  # first: everything after reads parts and ledger files
        folder = run_folder(out, options.run, info.version)
        ledger.repair(out, read_in_full=folder)  # the parts the report will read, checked in full
        started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        state.update({"run": folder.name, "model_version": info.version, "engine": info.engine, "started_at": started,
                      "status": "running", "archives": [str(r) for r in roots] or [options.pacs], "options": asdict(options),
                      "baseline": info.baseline})
        atomic_write_text(folder / RUN_FILE, json.dumps(state, indent=2))
        known = ledger.known_keys(out, info.version)
        files = folder / ".work" / "files"
        with times.measure("discovery"):
            if checked.pacs is not None:
                state["pacs"] = write_instance_list(checked.pacs, options, files)
                counts = {"files": state["pacs"]["instances"], "walk_errors": 0}
            else:
                counts = write_file_list(roots, files, exclude=out, chunk_rows=options.files_per_task,
                                         follow_symlinks=options.follow_symlinks)
        log.info("%d files found (%d walk errors); %d already scored by %s", counts["files"], counts["walk_errors"],
                 len(known), info.version)
        live = LiveRunMetrics(folder.name, info.version)
        if metrics_collected():
            log.info("run %s: live metrics at %s", folder.name, metrics_url())
        else:
            log.info("run %s: no live metrics from a lean local Ray (score.ray_profile full keeps them); the run's "
                     "figures go to metrics.prom at its end", folder.name)
        results = DicomResults(options, checked.pacs)
        still = _score_files(options, pool, files, info, known, folder, out, times, live, state, results,
                             checked.pacs) if counts["files"] else pd.DataFrame(columns=PREDICTION_COLUMNS)
        if results.active:
            state["dicom_results"] = results.summary()
        shutil.rmtree(folder / ".work", ignore_errors=True)
        written = state["scored_now"]
        state.update(status="complete", finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"), found=counts["files"],
                     still_failing=len(still), skipped_already_scored=counts["files"] - written - len(still),
                     pool=asdict(pool))
        with times.measure("report"):
            summary = write_report(folder, _night_rows(folder, still), state, roots, truth,
                                   threshold=options.review_threshold, top_n=options.top_n,
                                   explain=0 if checked.pacs else options.explain,  # the images stay in the PACS
                                   model=options.model, engine=options.engine)
        summary["still_failing"] = len(still)
        state["timing"] = summary["timing"] = times.as_dict(written)
        atomic_write_text(folder / RUN_FILE, json.dumps(state, indent=2))
        write_json(folder / "report" / "summary.json", summary)
        write_textfiles(folder, summary)
        return summary
