"""The Ray Data stages of archive scoring: read + decode in tasks, predict in an actor pool.

    file-list chunks -> read_chunks (tasks) -> Scorer actors (map_batches) -> prediction rows

`read_chunks` takes a file-list chunk (a Parquet file of paths written by discovery) and
yields small batches as it goes, so one task's output streams to the actors while it
reads on. `read_and_prepare` reads each file, hashes it, drops it when the ledger already knows it
(before decoding, so a re-run costs only reading and hashing; an entry that still cannot be read
is marked `ledger.STILL_FAILING` instead) and decodes and preprocesses
it with `images`, the same code as training. Any failure for one file (reading, hashing,
decoding, preprocessing, whatever the exception) makes that file an error row with a code
and a reason (`images.decode.describe_failure`: the decoder's code, or `internal_error:<type>`),
never a failed block. A model call that fails is retried once; if it fails again its files become `model_failed`
rows and the run goes on. Inputs travel as uint8 (size, size) planes, a
twelfth of the float32 (size, size, 3) tensor `images.preprocess` returns, and are
expanded back exactly (`pack` / `unpack`) next to the model.

Two interchangeable scorers turn those batches into prediction rows: `ActorScorer` loads a
`Classifier` in each actor's `__init__` (the model is never pickled), `ServeScorer` sends
the batches to the running Serve application through its deployment handle.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timezone

import numpy as np

from xray_ray.config import CLASS_NAMES
from xray_ray.files import sha256_hex
from xray_ray.images.bounds import LIMITS, DecodeLimits, ImageDecodeError
from xray_ray.images.decode import describe_failure, read_bytes
from xray_ray.images.dicom_results import source_header
from xray_ray.images.preprocess import decode_and_preprocess
from xray_ray.scoring.ledger import MODEL_FAILED, SKIPPED_CODES, STILL_FAILING, row_key

log = logging.getLogger(__name__)

PROBABILITY_COLUMNS = {name: "prob_" + name.replace(" ", "_") for name in CLASS_NAMES}
OOD_COLUMNS = ["ood_score", "out_of_distribution"]
"""The model's out-of-distribution score and flag (a flagged row still has a predicted label)."""
PREDICTION_COLUMNS = ["path", "sha256", "size", "predicted_label", *PROBABILITY_COLUMNS.values(), *OOD_COLUMNS,
                      "model_version", "engine", "scored_at", "status", "error_code", "error_reason"]
_PASSED_ON = ("path", "sha256", "size", "status", "error_code", "error_reason", "dicom_header")
"""Columns a scorer passes on as they came; `dicom_header` (`images.dicom_results.source_header`) reaches the driver,
which writes the DICOM results from it, and is not stored with the predictions."""
TIMING_PREFIX = "t_"
READ_STAGES = ("read", "hash", "decode_preprocess")
WORKER_STAGES = (*READ_STAGES, "queueing", "model", "model_load")
"""Stages whose seconds the pipeline's tasks and actors measure (summed over rows by the driver)."""


def pack(model_input: np.ndarray) -> np.ndarray:
    """One channel of `images.preprocess`'s output as uint8: its channels are equal and its values whole 0-255."""
    return model_input[:, :, 0].astype(np.uint8)


def unpack(planes: np.ndarray) -> np.ndarray:
    """A batch of packed planes (N, S, S) back to the model's float32 (N, S, S, 3) input, exactly."""
    return np.repeat(planes[..., np.newaxis], 3, axis=3).astype(np.float32)


def _read(path: str, limits: DecodeLimits, pacs) -> bytes:
    """The bytes of one entry: a file of the archive, or (`pacs` given) the PACS instance its URL names, fetched
    with WADO-RS (a PACS failure becomes this entry's `ImageDecodeError` with the PACS's code)."""
    if pacs is None:
        return read_bytes(path, limits)
    from xray_ray.scoring.dicomweb import PacsError, parse_instance_url

    try:
        return pacs.retrieve(*parse_instance_url(path), max_bytes=limits.max_file_bytes)
    except PacsError as err:
        raise ImageDecodeError(str(err), err.code) from None


def _prepare_file(path: str, found_error: str, found_code: str, image_size: int, known,
                  limits: DecodeLimits, seconds: dict[str, float], pacs=None) -> tuple | None:
    """(path, sha256, size, status, code, reason, DICOM header, pixels) of one entry, or None when the ledger knows
    it already.

    An entry that cannot be read is looked at every run: when the ledger holds its path and error code already
    its status is `STILL_FAILING` (listed in the night's report, not committed again; `scoring.ledger`'s rule).
    An entry the PACS selection rules left out (`SKIPPED_CODES`) is a `skipped` row, once. A PACS instance the
    ledger holds for this model is dropped before it is fetched. The DICOM header travels on for the results
    written from the answer (`images.dicom_results`). Seconds spent reading, hashing and decoding go to `seconds`.
    """
    sha256, size, data = "", -1, b""
    if found_code in SKIPPED_CODES:
        return None if row_key("", path, found_code) in known else (
            path, "", -1, "skipped", found_code, found_error, "", None)
    if pacs is not None and not found_error and row_key("", path) in known:
        return None
    try:
        if found_error:
            raise ImageDecodeError(found_error, found_code or "unreadable")
        started = time.perf_counter()
        data = _read(path, limits, pacs)
        read = time.perf_counter()
        sha256, size = sha256_hex(data), len(data)
        seconds["read"] += read - started
        seconds["hash"] += time.perf_counter() - read
    except Exception as exc:  # noqa: BLE001 - one file's problem stays that file's row
        code, reason = describe_failure(exc)
        status = STILL_FAILING if row_key("", path, code) in known else "error"
        return path, sha256, size, status, code, reason, "", None
    if row_key(sha256, path) in known:
        return None
    started = time.perf_counter()
    try:
        pixels = pack(decode_and_preprocess(data, image_size, limits))
        return path, sha256, size, "ok", "", "", source_header(data), pixels
    except Exception as exc:  # noqa: BLE001 - one file's problem stays that file's row
        return path, sha256, size, "error", *describe_failure(exc), "", None
    finally:
        seconds["decode_preprocess"] += time.perf_counter() - started


def read_and_prepare(batch: dict, image_size: int, known, limits: DecodeLimits = LIMITS, pacs=None) -> dict:
    """Files (`path`, discovery `error` and `code`) -> hashed rows with packed pixels; files in `known` are dropped.

    `known` is a `ledger.KnownKeys`, or an ObjectRef to one (fetched zero-copy from the object store); `pacs`, a
    `dicomweb.PacsClient` when the paths are its instance URLs.
    """
    if not hasattr(known, "keys"):
        import ray

        known = ray.get(known)
    rows = {key: [] for key in (*_PASSED_ON, "pixels")}
    blank = np.zeros((image_size, image_size), np.uint8)
    codes = batch.get("code", [""] * len(batch["path"]))
    seconds = dict.fromkeys(READ_STAGES, 0.0)
    for path, found_error, found_code in zip(batch["path"], batch["error"], codes):
        prepared = _prepare_file(path, found_error, found_code, image_size, known, limits, seconds, pacs)
        if prepared is None:
            continue
        for key, value in zip(rows, prepared):
            rows[key].append(blank if key == "pixels" and value is None else value)
    out = {key: np.array(values, dtype=object) for key, values in rows.items() if key != "pixels"}
    out["size"] = np.array(rows["size"], dtype=np.int64)
    out["pixels"] = np.stack(rows["pixels"]) if rows["pixels"] else np.zeros((0, image_size, image_size), np.uint8)
    n = len(out["path"])
    for stage, spent in seconds.items():  # each row carries its share of the batch's time: sums add up
        out[f"{TIMING_PREFIX}{stage}"] = np.full(n, spent / n if n else 0.0)
    out["read_done_at"] = np.full(n, time.time())
    return out


def read_chunks(batch: dict, image_size: int, known, rows_per_batch: int = 16, limits: DecodeLimits = LIMITS,
                pacs=None):
    """For each file-list chunk in `batch["chunk"]`, yield `read_and_prepare` batches of `rows_per_batch` files
    (or PACS instances: one read task fetches its instances one at a time, so the PACS sees at most as many
    requests at once as there are read tasks)."""
    import pyarrow.parquet as pq

    for chunk in batch["chunk"]:
        for files in pq.ParquetFile(chunk).iter_batches(batch_size=rows_per_batch, columns=["path", "error", "code"]):
            prepared = read_and_prepare({name: files.column(name).to_numpy(zero_copy_only=False)
                                         for name in ("path", "error", "code")}, image_size, known, limits, pacs)
            if len(prepared["path"]):  # every file already scored: nothing to send on
                yield prepared


class Scorer:
    """Packed batches -> prediction rows; subclasses say how probabilities are obtained.

    Rows also carry `t_<stage>` columns: each row's share of the seconds its batch spent
    reading, hashing, decoding, waiting for an actor and in the model, and the actor's model
    load time once; the driver sums them into the run's stage breakdown.
    """

    load_seconds = 0.0
    keep_pixels = False
    """Pass the packed inputs on to the driver too (for the heat maps it writes as DICOM Secondary Captures)."""

    def predict(self, inputs: np.ndarray) -> dict:
        """For float32 inputs: `probabilities` (N, 4) calibrated, in CLASS_NAMES order, `ood_score` (N,),
        `out_of_distribution` (N,) bool, `model_version`, `engine`."""
        raise NotImplementedError

    def _predict_with_retry(self, inputs: np.ndarray):
        """`predict`, tried a second time if the first call fails; the second failure is raised."""
        try:
            return self.predict(inputs)
        except Exception as exc:  # noqa: BLE001 - any model failure gets one more try
            log.warning("model call for %d images failed (%s); retrying once", len(inputs), describe_failure(exc)[1])
        return self.predict(inputs)

    def __call__(self, batch: dict) -> dict:
        n = len(batch["path"])
        started = time.time()
        out = {key: np.array(batch[key], dtype=object) for key in _PASSED_ON}
        for stage in READ_STAGES:
            out[f"{TIMING_PREFIX}{stage}"] = batch[f"{TIMING_PREFIX}{stage}"]
        out[f"{TIMING_PREFIX}queueing"] = np.maximum(0.0, started - batch["read_done_at"])
        out["size"] = batch["size"]
        if self.keep_pixels:
            out["pixels"] = batch["pixels"]
        ok = out["status"] == "ok"
        probabilities = np.full((n, len(CLASS_NAMES)), np.nan)
        ood_score, flagged = np.full(n, np.nan), np.zeros(n, bool)
        version, engine = self.describe()
        if ok.any():
            try:
                answer = self._predict_with_retry(unpack(batch["pixels"][ok]))
                probabilities[ok], ood_score[ok], flagged[ok] = (answer[key] for key in ("probabilities", *OOD_COLUMNS))
                version, engine = answer["model_version"], answer["engine"]
            except Exception as exc:  # noqa: BLE001 - the batch's files become error rows, the run goes on
                _, reason = describe_failure(exc)
                log.error("model call for %d images failed twice (%s); they become error rows", ok.sum(), reason)
                out["status"][ok], out["error_code"][ok] = "error", MODEL_FAILED
                out["error_reason"][ok] = f"the model failed on this batch twice ({reason})"
                ok[:] = False
        out["ood_score"], out["out_of_distribution"] = ood_score, flagged
        labels = np.array(CLASS_NAMES, dtype=object)[np.nan_to_num(probabilities).argmax(axis=1)]
        out["predicted_label"] = np.where(ok, labels, "")
        for i, column in enumerate(PROBABILITY_COLUMNS.values()):
            out[column] = probabilities[:, i]
        out["model_version"] = np.full(n, version, dtype=object)
        out["engine"] = np.full(n, engine, dtype=object)
        out["scored_at"] = np.full(n, np.datetime64(datetime.now(timezone.utc).replace(tzinfo=None), "us"))
        out[f"{TIMING_PREFIX}model"] = np.full(n, (time.time() - started) / n if n else 0.0)
        out[f"{TIMING_PREFIX}model_load"] = np.zeros(n)
        if n and self.load_seconds:  # reported once, with this actor's first batch
            out[f"{TIMING_PREFIX}model_load"][0], self.load_seconds = self.load_seconds, 0.0
        return out

    def describe(self) -> tuple[str, str]:
        """(model version, engine) stamped on rows of a batch with nothing to predict."""
        raise NotImplementedError


class ActorScorer(Scorer):
    """One `Classifier` per actor, loaded here in `__init__` (never pickled)."""

    def __init__(self, model_dir: str, engine: str = "auto", threads: int | None = None, keep_pixels: bool = False):
        from xray_ray.model_folder.classifier import Classifier

        self.keep_pixels = keep_pixels
        started = time.perf_counter()
        self.classifier = Classifier(model_dir, engine=engine, threads=threads)
        self.load_seconds = time.perf_counter() - started

    def predict(self, inputs):
        answer = self.classifier.predict_arrays(inputs)
        return {"probabilities": answer.probabilities, "ood_score": answer.ood_score,
                "out_of_distribution": answer.out_of_distribution, "model_version": answer.model_version,
                "engine": answer.engine}

    def describe(self):
        return self.classifier.version, self.classifier.engine


def serve_handle():
    """The deployment handle of the running Serve application (xray_ray.serving)."""
    from ray import serve

    from xray_ray.config import SERVE_APP_NAME, SERVE_DEPLOYMENT_NAME

    return serve.get_deployment_handle(SERVE_DEPLOYMENT_NAME, app_name=SERVE_APP_NAME)


class ServeScorer(Scorer):
    """Batches go to the Serve replicas' model: no second copy of it in (GPU) memory."""

    def __init__(self, keep_pixels: bool = False):
        self.keep_pixels = keep_pixels
        self.handle = serve_handle()
        self.info = self.handle.describe.remote().result()

    def predict(self, inputs):
        answer = self.handle.score_arrays.remote(inputs).result()
        if list(answer["classes"]) != list(CLASS_NAMES):
            raise ValueError(f"the served model's classes {answer['classes']} are not {list(CLASS_NAMES)}")
        return {**answer, "probabilities": np.asarray(answer["probabilities"], dtype=np.float64)}

    def describe(self):
        return self.info["model_version"], self.info["engine"]
