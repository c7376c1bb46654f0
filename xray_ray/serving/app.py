"""The Ray Serve application: an exported model behind HTTP, with dynamic batching.

One deployment holds one `Classifier` per replica and is also the FastAPI ingress, so the
model sits in memory once per replica; the scoring job's `serve` backend reaches the same
replicas through a deployment handle (`score_arrays`). Every answer carries the model
version, the engine and the image's sha256, never a file name or a DICOM patient field.

Bad input is the client's problem and gets a 4xx with a JSON error code and reason
(`ApiError`), whatever exception it caused; in /predict/batch each file gets its own
answer; the replica keeps serving. Memory is bounded per replica
(`settings.memory_budget_mb`): bodies are read with a size cap and share a byte
budget, and a semaphore lets only as many images decode at once as the replica has CPUs.
No endpoint takes a server-side path. A bearer token (an environment variable or a file)
guards every endpoint but /healthz when it is set. Each replica records Prometheus metrics
(answers by class, OOD flags, rejections by reason, latency, batch sizes; serving/metrics.py).
"""

import asyncio
import hashlib
import hmac
import json
import logging
import time
from collections import Counter
from dataclasses import asdict

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve

from xray_ray.config import SERVE_APP_NAME, SERVE_DEPLOYMENT_NAME
from xray_ray.config_services import ServeConfig
from xray_ray import __version__
from xray_ray.files import sha256_hex
from xray_ray.images.dicom_results import Answer, source_header, structured_report, to_bytes
from xray_ray.loopback import bind_serve_replicas_to_loopback
from xray_ray.model_folder.classifier import Classifier
from xray_ray.processes import process_footprint
from xray_ray.ray_runtime import require_ray
from xray_ray.serving.admission import Admission
from xray_ray.serving.explain import ExplainLimiter, explain_response
from xray_ray.serving.followed_model import FollowedModel
from xray_ray.serving.http import ApiError, BodyBudget, unusable, uploaded_files, wants_dicom
from xray_ray.serving.metrics import replica_metrics
from xray_ray.serving.review_page import review_page
from xray_ray.serving.settings import checked_model, decode_slots, memory_budget_mb, read_token

log = logging.getLogger(__name__)

bind_serve_replicas_to_loopback()  # a replica imports this module before it starts its gRPC server


def sr_bytes(header: str, answer: dict) -> bytes:
    """The DICOM SR of one /predict answer for the upload whose header is `header` (defined above the deployment,
    which Serve ships with the module globals bound so far)."""
    ood = answer["ood_score"]
    return to_bytes(structured_report(header, Answer(
        predicted_label=answer["label"], probabilities=answer["probabilities"],
        ood_score=float("nan") if ood is None else ood, out_of_distribution=answer["out_of_distribution"],
        model_version=answer["model_version"]), __version__))


# No interactive docs: they would be endpoints outside the token's guard (the README lists the API).
api = FastAPI(title="xray-ray", docs_url=None, redoc_url=None, openapi_url=None)


@api.middleware("http")
async def _timed(request: Request, call_next):
    """Every request's latency and status into the replica's metrics (a 500 when the route raised)."""
    started, status = time.perf_counter(), 500
    try:
        response = await call_next(request)
        status = response.status_code
        return response
    finally:
        if metrics := replica_metrics():
            path, root = request.scope.get("path", ""), request.scope.get("root_path", "")
            metrics.request(path[len(root):] if root and path.startswith(root) else path, status,
                            time.perf_counter() - started)


@api.exception_handler(ApiError)
async def _api_error(request: Request, err: ApiError) -> JSONResponse:
    if metrics := replica_metrics():
        metrics.rejected.inc(tags={"reason": err.error})
    return JSONResponse({"error": err.error, "reason": err.reason}, status_code=err.status, headers=err.headers)


@serve.deployment(name=SERVE_DEPLOYMENT_NAME)
@serve.ingress(api)
class XrayClassifier:
    """One replica: the model loaded once, HTTP routes, and batched inference behind them."""

    def __init__(self, settings: ServeConfig) -> None:
        self.settings = settings
        self.followed = FollowedModel(settings, self._reloaded)  # one folder, or the registry's current model
        self.token = read_token(settings.token_file)
        self.limit = int(settings.max_body_mb * 2**20)
        self.bodies = BodyBudget(int(settings.max_inflight_mb * 2**20))
        self.decoding = asyncio.Semaphore(decode_slots(settings))
        self.admission = Admission(settings.holds, settings.max_queue_wait_s, settings.retry_after_s)
        self.infer.set_max_batch_size(settings.max_batch_size)
        self.infer.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)
        self.batch_sizes: Counter[int] = Counter()
        self.explainer = ExplainLimiter()
        self.metrics = replica_metrics(serve.get_replica_context().app_name, self.classifier.version,
                                       self.classifier.engine)
        log.info("serving %s on %s; batches up to %d; %d image(s) decoded at once; memory budget %.0f MB; token %s",
                 self.classifier.version, self.classifier.engine, settings.max_batch_size, decode_slots(settings),
                 memory_budget_mb(settings), "required" if self.token else "off")

    @property
    def classifier(self) -> Classifier:
        """The model answering now (a request takes it once, so it is answered by the model that prepared it)."""
        return self.followed.classifier

    def _reloaded(self, outcome: str) -> None:
        self.metrics.serving(self.classifier.version, self.classifier.engine)
        self.metrics.reloads.inc(tags={"outcome": outcome})

    def _authorize(self, request: Request) -> None:
        if self.token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token.encode()):
            raise ApiError(401, "unauthorized", "a valid 'Authorization: Bearer <token>' header is required")

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.02)
    async def infer(self, items: list[tuple[Classifier, np.ndarray]]) -> list[dict]:
        """Requests that arrive together share one forward pass per model (one, but for a batch that straddles a
        registry swap), each answered by the model that prepared its image; sizes kept for /stats."""
        self.batch_sizes[len(items)] += 1
        self.metrics.batch_size.observe(len(items))
        rows: list[dict] = [{}] * len(items)
        for classifier in {id(model): model for model, _ in items}.values():
            picked = [i for i, (model, _) in enumerate(items) if model is classifier]
            predictions = await asyncio.to_thread(classifier.predict_arrays, np.stack([items[i][1] for i in picked]))
            self.metrics.answered(predictions, "http")
            for i, row in zip(picked, predictions.rows()):
                rows[i] = row
        return rows

    async def reconfigure(self, user_config: dict) -> None:
        """Serve's in-place update of this replica. `{"draining": true}`, sent when the service is told to stop,
        makes it refuse new requests (503 `draining`) and returns once those it accepted are answered, or
        after the graceful timeout."""
        if user_config.get("draining") and not self.admission.draining:
            left = await self.admission.drain(self.settings.graceful_shutdown_timeout_s)
            log.info("drained: %s", f"{left} request(s) still unanswered at the timeout" if left else "all answered")

    async def _answer(self, data: bytes) -> dict:
        """The JSON answer for one image's bytes; ApiError when they cannot be used."""
        if not data:
            raise ApiError(400, "empty_body", "the image is empty (0 bytes)")
        classifier = self.classifier
        async with self.decoding:
            try:
                image = await asyncio.to_thread(classifier.prepare, data)
            except Exception as err:  # any failure on these bytes is this image's problem: a 422, never a 500
                log.warning("an upload failed to decode: %s", type(err).__name__)
                raise unusable(err) from err
        answer = await self.infer((classifier, image))  # Predictions.rows(): calibrated confidence and the OOD flag
        return {**answer, "sha256": sha256_hex(data), "bytes": len(data)}

    @api.post("/predict")
    async def predict(self, request: Request):
        """One image: a multipart upload or the raw body (PNG, JPEG, TIFF, BMP, DICOM). With `Accept:
        application/dicom` a DICOM upload is answered by its DICOM SR (`images.dicom_results`), the same object
        the scoring job writes; anything else asked for as DICOM gets a 406 with the reason."""
        self._authorize(request)
        as_dicom = wants_dicom(request)
        with self.admission.admit() as deadline, self.bodies.request() as share:
            files = await uploaded_files(request, self.limit, self.settings.max_batch_files, share)
            if len(files) > 1:
                raise ApiError(400, "too_many_files", "send one image here, or several to /predict/batch")
            header = source_header(files[0][1]) if as_dicom else ""
            if as_dicom and not header:
                raise ApiError(406, "not_dicom", "a DICOM SR answers a DICOM upload only, and this upload is not "
                                                 "DICOM: ask for application/json instead")
            answer = await self.admission.within(deadline, self._answer(files[0][1]))
        if not as_dicom:
            return answer
        report = await asyncio.to_thread(sr_bytes, header, answer)
        return Response(report, media_type="application/dicom",
                        headers={"Content-Disposition": 'attachment; filename="xray-ray-sr.dcm"',
                                 "X-Model-Version": answer["model_version"]})

    @api.post("/predict/batch")
    async def predict_batch(self, request: Request) -> dict:
        """Several uploads in one multipart request: one result or one error per file, in order."""
        self._authorize(request)
        with self.admission.admit() as deadline, self.bodies.request() as share:
            files = await uploaded_files(request, self.limit, self.settings.max_batch_files, share)
            answers = asyncio.gather(*(self._one_of_batch(name, data) for name, data in files))
            results = await self.admission.within(deadline, answers)
        return {"results": list(results), "model_version": self.classifier.version}

    @api.post("/explain")
    async def explain(self, request: Request):
        """One image's answer plus its Grad-CAM heat map (overlay PNG or array; serving/explain.py)."""
        self._authorize(request)
        with self.admission.admit() as deadline, self.bodies.request() as share:
            files = await uploaded_files(request, self.limit, self.settings.max_batch_files, share)
            async with self.decoding:  # an explanation decodes too: it counts against the same memory budget
                return await self.admission.within(
                    deadline, explain_response(self.classifier, self.explainer, files, request))

    async def _one_of_batch(self, name: str, data: bytes) -> dict:
        """One file of /predict/batch: its answer, or its error, never its neighbours'."""
        try:
            return {"file": name, "status": "ok", **await self._answer(data)}
        except ApiError as err:
            self.metrics.rejected.inc(tags={"reason": err.error})
            return {"file": name, "status": "error", "error": err.error, "reason": err.reason}

    @api.get("/", response_class=HTMLResponse)
    def page(self) -> HTMLResponse:
        """The review page (serving/review_page.py): static, carries no data, so it needs no token."""
        return review_page()

    @api.get("/healthz")
    def healthz(self) -> dict:
        """200 once this replica has loaded its model (Serve routes nothing to it before)."""
        return {"status": "ok", "model_version": self.classifier.version}

    @api.get("/model")
    def model(self, request: Request) -> dict:
        """The model's public card (version, classes, metrics, settings; no paths), the engine, how this replica serves."""
        self._authorize(request)
        private = ("token_file", "insecure_no_token", "model", "registry")
        serving = {key: value for key, value in asdict(self.settings).items() if key not in private}
        serving.update(max_ongoing_requests=self.settings.ongoing_requests, decode_slots=decode_slots(self.settings),
                       memory_budget_mb=memory_budget_mb(self.settings))
        classifier = self.classifier
        return {"card": classifier.card.public(), "runtime": {**classifier.describe(), **process_footprint()},
                "serving": serving, "registry": self.followed.describe()}

    @api.get("/stats")
    def stats(self, request: Request) -> dict:
        """Batch sizes this replica has run: evidence that requests were batched together."""
        self._authorize(request)
        batches = sum(self.batch_sizes.values())
        images = sum(size * count for size, count in self.batch_sizes.items())
        return {"batches": batches, "images": images, "mean_batch_size": images / batches if batches else 0.0,
                "batch_sizes": {str(size): count for size, count in sorted(self.batch_sizes.items())}}

    def describe(self) -> dict:
        """Model version, engine, classes and input size (for the scoring job's serve backend)."""
        return self.classifier.describe()

    def score_arrays(self, batch: np.ndarray) -> dict:
        """Calibrated probabilities and the OOD score and flag for an already-preprocessed batch (the scoring
        job's serve backend)."""
        predictions = self.classifier.predict_arrays(batch)
        self.metrics.answered(predictions, "scoring")
        return {"probabilities": predictions.probabilities, "classes": predictions.classes,
                "ood_score": predictions.ood_score, "out_of_distribution": predictions.out_of_distribution,
                "model_version": predictions.model_version, "engine": predictions.engine}


def build_app(settings: ServeConfig, draining: bool = False):
    """The Serve application for `settings` (checked: `settings.checked_model`), with replicas, CPUs, GPUs,
    concurrency and the stop's grace applied; `draining` is the replicas' in-place state (`reconfigure`).

    Serve sends each replica up to `ongoing_requests`, beyond the replica's own bound, so the replica
    itself sheds the excess with a JSON 503. The version is the settings' digest: without one Serve
    gives each `serve.run` a random version and replaces the replicas; with it a change of `draining`
    alone is applied in place (`reconfigure`). (`version` is behind `_internal`; Ray is pinned.)"""
    version = hashlib.sha256(json.dumps(asdict(settings), sort_keys=True).encode()).hexdigest()[:16]
    return XrayClassifier.options(
        version=version, _internal=True,
        num_replicas=settings.num_replicas,
        max_ongoing_requests=settings.ongoing_requests,
        max_queued_requests=-1,  # unbounded in front: the replicas shed the excess themselves, in a moment
        graceful_shutdown_timeout_s=settings.graceful_shutdown_timeout_s,
        health_check_period_s=settings.health_check_period_s,
        user_config={"draining": draining},
        ray_actor_options={"num_cpus": settings.num_cpus, "num_gpus": settings.num_gpus},
    ).bind(settings)


def app_builder(args: dict):
    """Entry point for `serve run` / `serve deploy` of a Serve config: `args` are `serve:` settings."""
    return build_app(checked_model(ServeConfig(**args)))


def start(settings: ServeConfig, name: str = SERVE_APP_NAME, route_prefix: str = "/"):
    """Start Serve's HTTP proxy on the settings' host and port and deploy the app, inside the caller's Ray session.

    Returns the app's deployment handle once its replicas are up. A Serve instance already
    running keeps its own host and port.
    """
    require_ray("serving")
    serve.start(http_options={"host": settings.host, "port": settings.port})
    return serve.run(build_app(checked_model(settings)), name=name, route_prefix=route_prefix)
