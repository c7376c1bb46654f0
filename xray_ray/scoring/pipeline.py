"""The Ray Data stages of archive scoring: read + decode in tasks, predict in an actor pool.

    file-list chunks -> read_chunks (tasks) -> Scorer actors (map_batches) -> prediction rows

`read_chunks` takes a file-list chunk (a Parquet file of paths written by discovery) and
yields small batches as it goes, so one task's output streams to the actors while it
reads on. `read_and_prepare` reads each file, hashes it, drops it when the ledger already knows it
(before decoding, so a re-run costs only reading and hashing) and decodes and preprocesses
it with `images`, the same code as training. A file that is not a usable image keeps
going as an error row with its reason. Inputs travel as uint8 (size, size) planes, a
twelfth of the float32 (size, size, 3) tensor `images.preprocess` returns, and are
expanded back exactly (`pack` / `unpack`) next to the model.

Two interchangeable scorers turn those batches into prediction rows: `ActorScorer` loads a
`Classifier` in each actor's `__init__` (the model is never pickled), `ServeScorer` sends
the batches to the running Serve application through its deployment handle.
"""

from __future__ import annotations

from datetime import datetime, timezone

import numpy as np

from xray_ray.config import CLASS_NAMES
from xray_ray.files import sha256_hex
from xray_ray.images.decode import ImageDecodeError, read_bytes
from xray_ray.images.preprocess import decode_and_preprocess
from xray_ray.scoring.ledger import row_key

PROBABILITY_COLUMNS = {name: "prob_" + name.replace(" ", "_") for name in CLASS_NAMES}
OOD_COLUMNS = ["ood_score", "out_of_distribution"]
"""The model's out-of-distribution score and flag (a flagged row still has a predicted label)."""
PREDICTION_COLUMNS = ["path", "sha256", "size", "predicted_label", *PROBABILITY_COLUMNS.values(), *OOD_COLUMNS,
                      "model_version", "engine", "scored_at", "status", "error_reason"]
_PASSED_ON = ("path", "sha256", "size", "status", "error_reason")


def pack(model_input: np.ndarray) -> np.ndarray:
    """One channel of `images.preprocess`'s output as uint8: its channels are equal and its values whole 0-255."""
    return model_input[:, :, 0].astype(np.uint8)


def unpack(planes: np.ndarray) -> np.ndarray:
    """A batch of packed planes (N, S, S) back to the model's float32 (N, S, S, 3) input, exactly."""
    return np.repeat(planes[..., np.newaxis], 3, axis=3).astype(np.float32)


def read_and_prepare(batch: dict, image_size: int, known) -> dict:
    """Files (`path`, discovery `error`) -> hashed rows with packed pixels; files in `known` are dropped.

    `known` is a `ledger.KnownKeys`, or an ObjectRef to one (fetched zero-copy from the object store).
    """
    if not hasattr(known, "keys"):
        import ray

        known = ray.get(known)
    rows = {key: [] for key in (*_PASSED_ON, "pixels")}
    blank = np.zeros((image_size, image_size), np.uint8)
    for path, found_error in zip(batch["path"], batch["error"]):
        sha256, size, status, reason, pixels, data = "", -1, "ok", "", blank, b""
        try:
            if found_error:
                raise ImageDecodeError(found_error)
            data = read_bytes(path)
            sha256, size = sha256_hex(data), len(data)
        except ImageDecodeError as err:
            status, reason = "error", err.reason
        if row_key(sha256, path) in known:
            continue
        if status == "ok":
            try:
                pixels = pack(decode_and_preprocess(data, image_size))
            except ImageDecodeError as err:
                status, reason = "error", err.reason
        for key, value in zip(rows, (path, sha256, size, status, reason, pixels)):
            rows[key].append(value)
    out = {key: np.array(values, dtype=object) for key, values in rows.items() if key != "pixels"}
    out["size"] = np.array(rows["size"], dtype=np.int64)
    out["pixels"] = np.stack(rows["pixels"]) if rows["pixels"] else np.zeros((0, image_size, image_size), np.uint8)
    return out


def read_chunks(batch: dict, image_size: int, known, rows_per_batch: int = 16):
    """For each file-list chunk in `batch["chunk"]`, yield `read_and_prepare` batches of `rows_per_batch` files."""
    import pyarrow.parquet as pq

    for chunk in batch["chunk"]:
        for files in pq.ParquetFile(chunk).iter_batches(batch_size=rows_per_batch, columns=["path", "error"]):
            prepared = read_and_prepare({name: files.column(name).to_numpy(zero_copy_only=False)
                                         for name in ("path", "error")}, image_size, known)
            if len(prepared["path"]):  # every file already scored: nothing to send on
                yield prepared


class Scorer:
    """Packed batches -> prediction rows; subclasses say how probabilities are obtained."""

    def predict(self, inputs: np.ndarray) -> dict:
        """For float32 inputs: `probabilities` (N, 4) calibrated, in CLASS_NAMES order, `ood_score` (N,),
        `out_of_distribution` (N,) bool, `model_version`, `engine`."""
        raise NotImplementedError

    def __call__(self, batch: dict) -> dict:
        n = len(batch["path"])
        ok = batch["status"] == "ok"
        probabilities = np.full((n, len(CLASS_NAMES)), np.nan)
        ood_score, flagged = np.full(n, np.nan), np.zeros(n, bool)
        version, engine = self.describe()
        if ok.any():
            answer = self.predict(unpack(batch["pixels"][ok]))
            probabilities[ok], ood_score[ok], flagged[ok] = (answer[key] for key in ("probabilities", *OOD_COLUMNS))
            version, engine = answer["model_version"], answer["engine"]
        out = {key: batch[key] for key in _PASSED_ON}
        out["ood_score"], out["out_of_distribution"] = ood_score, flagged
        labels = np.array(CLASS_NAMES, dtype=object)[np.nan_to_num(probabilities).argmax(axis=1)]
        out["predicted_label"] = np.where(ok, labels, "")
        for i, column in enumerate(PROBABILITY_COLUMNS.values()):
            out[column] = probabilities[:, i]
        out["model_version"] = np.full(n, version, dtype=object)
        out["engine"] = np.full(n, engine, dtype=object)
        out["scored_at"] = np.full(n, np.datetime64(datetime.now(timezone.utc).replace(tzinfo=None), "us"))
        return out

    def describe(self) -> tuple[str, str]:
        """(model version, engine) stamped on rows of a batch with nothing to predict."""
        raise NotImplementedError


class ActorScorer(Scorer):
    """One `Classifier` per actor, loaded here in `__init__` (never pickled)."""

    def __init__(self, model_dir: str, engine: str = "auto", threads: int | None = None):
        from xray_ray.model_folder.classifier import Classifier

        self.classifier = Classifier(model_dir, engine=engine, threads=threads)

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

    def __init__(self):
        self.handle = serve_handle()
        self.info = self.handle.describe.remote().result()

    def predict(self, inputs):
        answer = self.handle.score_arrays.remote(inputs).result()
        if list(answer["classes"]) != list(CLASS_NAMES):
            raise ValueError(f"the served model's classes {answer['classes']} are not {list(CLASS_NAMES)}")
        return {**answer, "probabilities": np.asarray(answer["probabilities"], dtype=np.float64)}

    def describe(self):
        return self.info["model_version"], self.info["engine"]
