"""The services' config sections: `score:` (one nightly scoring run) and `serve:` (the Ray Serve application).

Each field is the one definition of a setting: `xray-ray score` and `xray-ray serve` build
their options from these fields, a YAML file (`--config`) and `--set score.batch_size=16`
fill the same fields, and a Serve config's `args` (configs/serve.yaml, KubeRay's
serveConfigV2) are `serve:` fields. Checks here need no files; the model folder itself is
checked by the job that uses it, before it starts.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import datetime

from xray_ray.config_field import setting
from xray_ray.ray_runtime import RAY_PROFILES

ENGINES = ("auto", "onnxruntime", "keras")
BACKENDS = ("actors", "serve")


def _problems_of_counts(section: str, values: dict[str, float], at_least: float) -> list[str]:
    return [f"{section}.{name} must be at least {at_least:g}, got {value}" for name, value in values.items()
            if value is not None and value < at_least]


def is_date_range(text: str) -> bool:
    """True for a DICOM date YYYYMMDD or a range YYYYMMDD-YYYYMMDD of real dates, the first not after the second."""
    days = text.split("-")
    if len(days) > 2 or not all(re.fullmatch(r"\d{8}", day) for day in days):
        return False
    try:
        parsed = [datetime.strptime(day, "%Y%m%d") for day in days]
    except ValueError:
        return False
    return parsed == sorted(parsed)


@dataclass
class ScoreConfig:
    """The `score:` section: what one scoring run reads, with which model, how big its pool is, what it writes."""

    # What is read
    archives: list = setting(list, "Archive folder to score, any depth and layout (repeatable). PNG, JPEG, TIFF, "
                                   "BMP, .dcm, and DICOM files without extension.")
    labels: str | None = setting(None, "CSV with columns path (or file_path, relative to the CSV) and label: the "
                                       "true classes, for accuracy. Class folders are used otherwise.")
    follow_symlinks: bool = setting(False, "Read files and folders that symlinks lead to outside the archive "
                                           "folders (default: outside_archive error rows).")

    # Or a PACS over DICOMweb (QIDO-RS finds, WADO-RS fetches, STOW-RS stores)
    pacs: str | None = setting(None, "DICOMweb root URL of a PACS to score instead of archive folders, e.g. "
                                     "https://pacs.example.org/dicom-web (needs score.study_date).")
    study_date: str | None = setting(None, "Studies to take from the PACS: a study date YYYYMMDD or a range "
                                           "YYYYMMDD-YYYYMMDD.")
    pacs_credentials: str | None = setting(None, "File holding the PACS credentials, readable by its owner only: "
                                                 "JSON {\"basic\": {\"user\": ..., \"password\": ...}} or "
                                                 "{\"bearer\": TOKEN} (never given on the command line).")
    pacs_skip_tls_verify: bool = setting(False, "Do not verify the PACS's TLS certificate (a test PACS with a "
                                                "self-signed one; the default verifies it).")
    pacs_timeout_s: float = setting(30.0, "Seconds one PACS request may take before it counts as a time-out.")
    pacs_modalities: list = setting(lambda: ["CR", "DX", "DR"], "Series modalities scored from the PACS "
                                                                "(others: not_radiograph rows).")
    pacs_body_parts: list = setting(lambda: ["CHEST", ""], "BodyPartExamined values scored ('' accepts an "
                                                           "absent one; others: not_chest rows).")
    pacs_views: list = setting(lambda: ["PA", "AP", ""], "ViewPosition values scored ('' accepts an absent one; "
                                                         "lateral views: lateral_view rows, others other_view).")
    pacs_store: bool = setting(False, "Send each SR (and heat-map capture) back to the PACS with STOW-RS, into "
                                      "the study it describes.")

    # DICOM results
    sr_out: str | None = setting(None, "Folder receiving one DICOM Structured Report per scored DICOM input "
                                       "(<study UID>/<SR UID>.dcm; PNG and other inputs get none).")
    sr_heatmaps: bool = setting(False, "Also write each answer's Grad-CAM overlay as a DICOM Secondary Capture "
                                       "(none for out-of-distribution images; needs a model folder).")

    # What answers
    model: str | None = setting(None, "Exported model folder, e.g. models/NAME (required with the actors backend, "
                                      "unless score.registry names the model).")
    registry: str | None = setting(None, "Model registry folder: score with its current model (instead of "
                                         "score.model).")
    backend: str = setting("actors", "actors: the job's own Classifier actors; serve: the running Serve "
                                     "application's replicas.")
    engine: str = setting("auto", "auto (ONNX Runtime when model.onnx is usable), onnxruntime or keras (actors "
                                  "backend).")
    expect_version: str | None = setting(None, "Refuse (exit 3) a model whose card names another version.")

    # Where the answers go
    out: str | None = setting(None, "Output folder: one dated run folder per night, plus the ledger.")
    run: str | None = setting(None, "Run folder name (default: today's date).")
    commit_rows: int = setting(1000, "Rows per committed predictions part.")

    # The pool on the cluster
    actors: int = setting(0, "Scoring actors (each holds one copy of the model); 0: from 1 up to what fits the "
                             "cluster, leaving room for reading.")
    threads: int = setting(0, "ONNX Runtime threads per actor; 0: the CPUs Ray gave the actor.")
    cpus_per_actor: float = setting(0.0, "CPUs Ray reserves per actor; 0: chosen from the cluster.")
    gpus_per_actor: float | None = setting(None, "GPUs per actor (fractions share a GPU); unset: 1 where the "
                                                 "cluster has GPUs, else 0.")
    read_cpus: float = setting(0.5, "CPUs Ray reserves per read/decode task: a fraction, so actors never starve "
                                    "reading.")
    batch_size: int = setting(32, "Images per model call.")
    files_per_task: int = setting(256, "Files per read task: the unit in which results arrive and are committed.")
    object_store_mb: int = setting(256, "Object-store budget (MB) for decoded images waiting for the model; keeps "
                                        "memory flat in archive size.")
    ray_profile: str = setting("lean", "The Ray the run starts for itself when it joins none: lean (without the "
                                       "metrics, task events and event statistics a batch run never reads) or "
                                       "full (every Ray service). A Ray that is joined keeps its own.")

    # The report
    review_threshold: float = setting(0.6, "Answers less confident than this are listed for review.")
    top_n: int = setting(10, "Most confident images listed per class.")
    explain: int = setting(24, "Images to review shown with a Grad-CAM heat map in the report, at most (needs a "
                               "model folder; 0: none).")

    def __post_init__(self) -> None:
        if isinstance(self.archives, str):
            self.archives = [self.archives]
        self.archives = [str(path) for path in self.archives]
        problems = _problems_of_counts("score", {name: getattr(self, name) for name in (
            "batch_size", "top_n", "commit_rows", "files_per_task", "object_store_mb")}, 1)
        problems += _problems_of_counts("score", {name: getattr(self, name) for name in (
            "actors", "threads", "cpus_per_actor", "gpus_per_actor", "explain")}, 0)
        if self.backend not in BACKENDS:
            problems.append(f"score.backend must be one of {', '.join(BACKENDS)}, not {self.backend!r}")
        if self.engine not in ENGINES:
            problems.append(f"score.engine must be one of {', '.join(ENGINES)}, not {self.engine!r}")
        if self.ray_profile not in RAY_PROFILES:
            problems.append(f"score.ray_profile must be one of {', '.join(RAY_PROFILES)}, not {self.ray_profile!r}")
        if self.read_cpus <= 0:
            problems.append(f"score.read_cpus must be above 0, got {self.read_cpus}")
        if not 0 <= self.review_threshold <= 1:
            problems.append(f"score.review_threshold must be between 0 and 1, not {self.review_threshold}")
        if self.model and self.registry:
            problems.append("give score.model or score.registry, not both")
        if self.pacs and self.archives:
            problems.append("give score.archives or score.pacs, not both")
        if self.pacs and not self.study_date:
            problems.append("score.pacs needs score.study_date (YYYYMMDD or YYYYMMDD-YYYYMMDD)")
        if self.study_date and not is_date_range(self.study_date):
            problems.append(f"score.study_date must be a date YYYYMMDD or a range YYYYMMDD-YYYYMMDD of real dates "
                            f"in order, not {self.study_date!r}")
        if self.pacs_store and not self.pacs:
            problems.append("score.pacs_store sends results to score.pacs: give that too")
        if self.pacs_timeout_s <= 0:
            problems.append(f"score.pacs_timeout_s must be above 0, got {self.pacs_timeout_s}")
        if self.run is not None and (not self.run or self.run.startswith(".") or os.sep in self.run):
            problems.append(f"score.run must be a plain folder name, not {self.run!r}")
        if problems:
            raise ValueError("; ".join(problems))

    def missing(self) -> list[str]:
        """What a run needs that this section does not name yet (its archives, output folder, model)."""
        needs = []
        if not self.archives and not self.pacs:
            needs.append("give at least one archive (--archive, score.archives) or a PACS (--pacs, score.pacs)")
        if not self.out:
            needs.append("give the output folder (--out, score.out)")
        if self.backend == "actors" and not (self.model or self.registry):
            needs.append("a model folder (--model, score.model) or a registry (--registry, score.registry) is "
                         "required with the actors backend")
        return needs


@dataclass
class ServeConfig:
    """The `serve:` section: where the endpoint listens, which model, and how each replica batches and bounds work."""

    # The endpoint
    host: str = setting("127.0.0.1", "Interface to listen on; anything but loopback exposes the endpoint to the "
                                     "network and needs a token (--token-file), and a firewall.")
    port: int = setting(8000, "HTTP port.")
    token_file: str | None = setting(None, "File holding a bearer token required on every endpoint but /healthz "
                                           "and the review page / (or set $XRAY_RAY_SERVE_TOKEN where the "
                                           "replicas run).")
    insecure_no_token: bool = setting(False, "Serve on a non-loopback host without a token (refused otherwise).")

    # The model
    model: str | None = setting(None, "Exported model folder (model.keras, model.onnx, model_card.json).")
    registry: str | None = setting(None, "Model registry folder (instead of serve.model): serve its current model "
                                         "and follow it when a promotion or rollback moves it.")
    registry_poll_s: float = setting(2.0, "How often each replica looks at the registry's current model, in "
                                          "seconds.")
    engine: str = setting("auto", "auto (ONNX Runtime when model.onnx is usable), onnxruntime or keras.")
    expect_version: str | None = setting(None, "Refuse to serve unless the model card names this version.")

    # The replicas
    num_replicas: int = setting(1, "Replicas, each with its own copy of the model.")
    num_cpus: float = setting(1.0, "CPUs per replica (ONNX Runtime uses that many threads).")
    num_gpus: float = setting(0.0, "GPUs per replica.")

    # Batching
    max_batch_size: int = setting(16, "Largest dynamic batch.")
    batch_wait_timeout_s: float = setting(0.02, "How long a batch waits to fill, in seconds.")
    max_ongoing_requests: int | None = setting(None, "Requests Serve sends one replica at once; unset: four "
                                                     "times what the replica holds (max_batch_size + "
                                                     "max_queued_requests), so it sheds the excess itself.")

    # Overload and stopping
    max_queued_requests: int = setting(16, "Requests a replica lets wait beyond one batch; past it, 503 "
                                           "`overloaded` with Retry-After instead of an ever longer queue.")
    max_queue_wait_s: float = setting(10.0, "Longest an accepted request waits for the model before it is "
                                            "answered 503 `overloaded` (bounds an accepted request's latency).")
    retry_after_s: int = setting(1, "Seconds a refused client is told to wait (Retry-After) before retrying.")
    graceful_shutdown_timeout_s: float = setting(10.0, "On a stop, how long the replicas have to answer the "
                                                       "requests they accepted (new ones get 503 `draining`).")
    health_check_period_s: float = setting(2.0, "How often Serve's controller checks each replica, in seconds: "
                                                "a replica that died is noticed and replaced this much sooner "
                                                "(Serve's default is 10).")

    # Bounds on what a replica holds
    max_body_mb: float = setting(64.0, "Largest request body accepted, in MB (413 beyond).")
    max_inflight_mb: float = setting(256.0, "Request bodies one replica holds at once, in MB (429 beyond): with "
                                            "the pixel cap, this bounds a replica's memory.")
    max_batch_files: int = setting(32, "Most files in one /predict/batch request.")

    def __post_init__(self) -> None:
        problems = _problems_of_counts("serve", {name: getattr(self, name) for name in (
            "max_batch_size", "max_batch_files", "num_replicas", "port")}, 1)
        problems += _problems_of_counts("serve", {name: getattr(self, name) for name in (
            "batch_wait_timeout_s", "num_cpus", "num_gpus", "max_queued_requests", "graceful_shutdown_timeout_s")}, 0)
        problems += _problems_of_counts("serve", {"registry_poll_s": self.registry_poll_s,
                                                  "health_check_period_s": self.health_check_period_s}, 0.1)
        if self.model and self.registry:
            problems.append("give serve.model or serve.registry, not both")
        problems += _problems_of_counts("serve", {"max_queue_wait_s": self.max_queue_wait_s,
                                                  "retry_after_s": self.retry_after_s}, 0.001)
        if self.engine not in ENGINES:
            problems.append(f"serve.engine must be one of {', '.join(ENGINES)}, not {self.engine!r}")
        if self.max_ongoing_requests is not None and self.max_ongoing_requests < self.max_batch_size:
            problems.append(f"serve.max_ongoing_requests ({self.max_ongoing_requests}) below max_batch_size "
                            f"({self.max_batch_size}) would keep every batch from filling")
        if self.max_body_mb <= 0 or self.max_inflight_mb < self.max_body_mb:
            problems.append(f"serve.max_inflight_mb ({self.max_inflight_mb}) below max_body_mb ({self.max_body_mb}) "
                            "would refuse the largest accepted body (and max_body_mb must be above 0)")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def ongoing_requests(self) -> int:
        """Requests Serve sends one replica at once: `max_ongoing_requests`, else four times what the replica
        holds (a batch and the queue behind it), so the excess reaches the replica, which answers it with its
        JSON 503 in a moment (refusing costs no decoding), instead of waiting in Serve's queue."""
        return self.max_ongoing_requests or 4 * self.holds

    @property
    def holds(self) -> int:
        """Requests one replica takes on at once: a batch being answered and the queue behind it."""
        return self.max_batch_size + self.max_queued_requests
