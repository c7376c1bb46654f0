"""The Ray Serve application: an exported model behind HTTP, with dynamic batching.

One deployment holds one `Classifier` per replica and is also the FastAPI ingress, so the
model sits in memory once per replica; the scoring job's `serve` backend reaches the same
replicas through a deployment handle (`score_arrays`). Every answer carries the model
version, the engine and the image's sha256, never a file name or a DICOM patient field.

Bad input is the client's problem and gets a 4xx with a JSON reason (`ApiError`); the
replica keeps serving. Bodies are read with a size cap before anything parses them, and
no endpoint takes a server-side path. A bearer token (an environment variable or a file)
guards every endpoint but /healthz when it is set.
"""

import asyncio
import hmac
import logging
import os
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from starlette.formparsers import MultiPartException, MultiPartParser

from xray_ray.export import CARD_FILE
from xray_ray.files import sha256_hex
from xray_ray.imaging import ImageDecodeError
from xray_ray.predict import Classifier, Predictions, process_footprint

log = logging.getLogger(__name__)

APP_NAME = "xray-ray"
DEPLOYMENT_NAME = "XrayClassifier"
TOKEN_ENV = "XRAY_RAY_SERVE_TOKEN"
"""Environment variable holding the bearer token (a token file is the safer choice)."""

RAW_CONTENT_TYPES = frozenset({"image/png", "image/jpeg", "image/tiff", "image/bmp",
                               "application/dicom", "application/octet-stream"})


@dataclass
class ServeSettings:
    """How the application serves; the Serve config YAML's `args` are these fields."""

    model: str
    engine: str = "auto"
    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.02
    max_ongoing_requests: int | None = None  # None: twice max_batch_size, so batches can fill
    num_replicas: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    max_body_mb: float = 64.0
    max_batch_files: int = 32
    token_file: str | None = None

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.max_batch_files < 1 or self.num_replicas < 1:
            raise ValueError("max_batch_size, max_batch_files and num_replicas must be at least 1")
        if self.max_ongoing_requests is None:
            self.max_ongoing_requests = 2 * self.max_batch_size
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(f"max_ongoing_requests ({self.max_ongoing_requests}) below max_batch_size "
                             f"({self.max_batch_size}) would keep every batch from filling")
        if not (Path(self.model) / CARD_FILE).is_file():
            raise ValueError(f"not an exported model folder (no {CARD_FILE}): {self.model}")


class ApiError(Exception):
    """A request the service refuses: HTTP status, a short error code and a readable reason."""

    def __init__(self, status: int, error: str, reason: str) -> None:
        super().__init__(reason)
        self.status, self.error, self.reason = status, error, reason


def read_token(token_file: str | None) -> str | None:
    """The bearer token from `token_file`, else from $XRAY_RAY_SERVE_TOKEN; None when neither is set."""
    if token_file:
        token = Path(token_file).read_text().strip()
        if not token:
            raise ValueError(f"token file {token_file} is empty")
        return token
    return os.environ.get(TOKEN_ENV) or None


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit` bytes (declared or streamed)."""
    too_large = ApiError(413, "body_too_large", f"the request body exceeds the limit of {limit} bytes")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def _once(body: bytes) -> AsyncIterator[bytes]:
    yield body


async def uploaded_files(request: Request, limit: int, max_files: int) -> list[tuple[str, bytes]]:
    """(name, bytes) of each upload, in order: multipart file fields, or one raw image body."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = await read_body(request, limit)
    if content_type in RAW_CONTENT_TYPES:
        return [("body", body)]
    if content_type != "multipart/form-data":
        accepted = ", ".join(sorted(RAW_CONTENT_TYPES | {"multipart/form-data"}))
        raise ApiError(415, "unsupported_content_type",
                       f"content type {content_type or '(none)'!r} is not accepted; send one of: {accepted}")
    try:
        form = await MultiPartParser(request.headers, _once(body), max_files=max_files,
                                     max_part_size=limit).parse()
    except MultiPartException as err:
        raise ApiError(400, "bad_multipart", f"the multipart body cannot be parsed: {err.message}") from err
    files = [(value.filename or key, await value.read()) for key, value in form.multi_items()
             if not isinstance(value, str)]
    if not files:
        raise ApiError(400, "no_file", "the multipart form holds no file field")
    return files


# No interactive docs: they would be endpoints outside the token's guard (the README lists the API).
api = FastAPI(title="xray-ray", docs_url=None, redoc_url=None, openapi_url=None)


@api.exception_handler(ApiError)
async def _api_error(request: Request, err: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return JSONResponse({"error": err.error, "reason": err.reason}, status_code=err.status, headers=headers)


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress(api)
class XrayClassifier:
    """One replica: the model loaded once, HTTP routes, and batched inference behind them."""

    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self.classifier = Classifier(settings.model, engine=settings.engine)
        self.token = read_token(settings.token_file)
        self.limit = int(settings.max_body_mb * 2**20)
        self.infer.set_max_batch_size(settings.max_batch_size)
        self.infer.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)
        self.batch_sizes: Counter[int] = Counter()
        log.info("serving %s on %s; batches up to %d; token %s", self.classifier.version,
                 self.classifier.engine, settings.max_batch_size, "required" if self.token else "off")

    def _authorize(self, request: Request) -> None:
        if self.token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token.encode()):
            raise ApiError(401, "unauthorized", "a valid 'Authorization: Bearer <token>' header is required")

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.02)
    async def infer(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Requests that arrive together share one forward pass (sizes kept for /stats)."""
        self.batch_sizes[len(images)] += 1
        predictions = await asyncio.to_thread(self.classifier.predict_arrays, np.stack(images))
        return list(predictions.probabilities)

    async def _answer(self, data: bytes) -> dict:
        """The JSON answer for one image's bytes; ApiError when they cannot be used."""
        if not data:
            raise ApiError(400, "empty_body", "the image is empty (0 bytes)")
        try:
            image = await asyncio.to_thread(self.classifier.prepare, data)
        except ImageDecodeError as err:
            raise ApiError(422, "unusable_image", err.reason) from err
        probabilities = await self.infer(image)
        (answer,) = Predictions(probabilities[np.newaxis], self.classifier.classes, self.classifier.version,
                                self.classifier.engine).rows()
        return {**answer, "sha256": sha256_hex(data), "bytes": len(data)}

    @api.post("/predict")
    async def predict(self, request: Request) -> dict:
        """One image: a multipart upload or the raw body (PNG, JPEG, TIFF, BMP, DICOM)."""
        self._authorize(request)
        files = await uploaded_files(request, self.limit, max_files=self.settings.max_batch_files)
        if len(files) > 1:
            raise ApiError(400, "too_many_files", "send one image here, or several to /predict/batch")
        return await self._answer(files[0][1])

    @api.post("/predict/batch")
    async def predict_batch(self, request: Request) -> dict:
        """Several uploads in one multipart request: one result or one error per file, in order."""
        self._authorize(request)
        files = await uploaded_files(request, self.limit, max_files=self.settings.max_batch_files)

        async def one(name: str, data: bytes) -> dict:
            try:
                return {"file": name, "status": "ok", **await self._answer(data)}
            except ApiError as err:
                return {"file": name, "status": "error", "error": err.error, "reason": err.reason}

        results = await asyncio.gather(*(one(name, data) for name, data in files))
        return {"results": list(results), "model_version": self.classifier.version}

    @api.get("/healthz")
    def healthz(self) -> dict:
        """200 once this replica has loaded its model (Serve routes nothing to it before)."""
        return {"status": "ok", "model_version": self.classifier.version}

    @api.get("/model")
    def model(self, request: Request) -> dict:
        """The model card, the engine answering, and how this replica serves."""
        self._authorize(request)
        serving = {key: value for key, value in asdict(self.settings).items() if key != "token_file"}
        return {"card": self.classifier.card, "runtime": {**self.classifier.describe(), **process_footprint()},
                "serving": serving}

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
        """Probabilities for an already-preprocessed batch (the scoring job's serve backend)."""
        predictions = self.classifier.predict_arrays(batch)
        return {"probabilities": predictions.probabilities, "classes": predictions.classes,
                "model_version": predictions.model_version, "engine": predictions.engine}


def build_app(settings: ServeSettings):
    """The Serve application for `settings`, with replicas, CPUs, GPUs and concurrency applied."""
    return XrayClassifier.options(
        num_replicas=settings.num_replicas,
        max_ongoing_requests=settings.max_ongoing_requests,
        ray_actor_options={"num_cpus": settings.num_cpus, "num_gpus": settings.num_gpus},
    ).bind(settings)


def app_builder(args: dict):
    """Entry point for `serve run` / `serve deploy` of a Serve config: `args` are ServeSettings fields."""
    return build_app(ServeSettings(**args))


def start(settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000, name: str = APP_NAME,
          route_prefix: str = "/"):
    """Start Serve's HTTP proxy on host:port (loopback unless told otherwise) and deploy the app.

    Returns the app's deployment handle once its replicas are up. A Serve instance already
    running keeps its own host and port.
    """
    serve.start(http_options={"host": host, "port": port})
    return serve.run(build_app(settings), name=name, route_prefix=route_prefix)
