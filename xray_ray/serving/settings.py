"""How the Serve application serves: `ServeSettings` (the Serve config's `args`), its memory budget,
the bearer token, and the refusal to expose an unguarded endpoint.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

from xray_ray.images.bounds import LIMITS
from xray_ray.model_folder.card import ModelCard
from xray_ray.model_folder.classifier import load_detector
from xray_ray.ray_runtime import is_loopback_host

TOKEN_ENV = "XRAY_RAY_SERVE_TOKEN"
"""Environment variable holding the bearer token (a token file is the safer choice)."""

RUNTIME_MB = 1024
"""A replica before any request: Ray worker, FastAPI, ONNX Runtime or Keras, the model (measured: about
500 MB on ONNX Runtime; TensorFlow adds several hundred)."""

BODY_COPIES = 3
"""Copies of a body a request may hold at once: the streamed chunks, the joined body, a multipart part."""

DECODE_BYTES_PER_PIXEL = 16
"""Peak bytes per pixel while one image at the pixel cap is decoded and preprocessed (16-bit source,
8-bit copy, float32 working arrays)."""

log = logging.getLogger(__name__)


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
    max_inflight_mb: float = 256.0  # request bodies one replica holds at once; 503 beyond
    max_batch_files: int = 32
    token_file: str | None = None
    expect_version: str | None = None

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.max_batch_files < 1 or self.num_replicas < 1:
            raise ValueError("max_batch_size, max_batch_files and num_replicas must be at least 1")
        if self.max_ongoing_requests is None:
            self.max_ongoing_requests = 2 * self.max_batch_size
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(f"max_ongoing_requests ({self.max_ongoing_requests}) below max_batch_size "
                             f"({self.max_batch_size}) would keep every batch from filling")
        if self.max_inflight_mb < self.max_body_mb:
            raise ValueError(f"max_inflight_mb ({self.max_inflight_mb}) below max_body_mb ({self.max_body_mb}) "
                             "would refuse the largest accepted body")
        try:
            card = ModelCard.read(self.model)  # the card and its detector checked once, before any replica starts
            load_detector(card)
        except OSError as err:
            raise ValueError(str(err)) from None
        version = card.version
        if self.expect_version is not None and version != self.expect_version:
            raise ValueError(f"{self.model} holds model {version}, not the expected {self.expect_version}")

    @property
    def decode_slots(self) -> int:
        """Images one replica decodes at once: its whole CPUs, at least one."""
        return max(1, math.floor(self.num_cpus))

    def memory_budget_mb(self) -> float:
        """The most resident memory one replica may reach, whatever the uploads: the runtime, the bodies it
        may hold, and the images it may decode at once at the pixel cap."""
        decode_mb = LIMITS.max_pixels * DECODE_BYTES_PER_PIXEL / 2**20
        return RUNTIME_MB + BODY_COPIES * self.max_inflight_mb + self.decode_slots * decode_mb


def read_token(token_file: str | None) -> str | None:
    """The bearer token from `token_file`, else from $XRAY_RAY_SERVE_TOKEN; None when neither is set."""
    if token_file:
        token = Path(token_file).read_text().strip()
        if not token:
            raise ValueError(f"token file {token_file} is empty")
        return token
    return os.environ.get(TOKEN_ENV) or None


def check_exposure(host: str, token: str | None, insecure_no_token: bool) -> None:
    """Refuse to listen beyond loopback without a token (ValueError), unless told to, and then say so loudly."""
    if token or is_loopback_host(host):
        return
    if not insecure_no_token:
        raise ValueError(f"--host {host} exposes the endpoint to the network: give --token-file (or set "
                         f"${TOKEN_ENV}), or pass --insecure-no-token to serve without one")
    log.warning("=" * 72)
    log.warning("INSECURE: serving on %s WITHOUT A TOKEN. Anyone who can reach this host can send images "
                "and read the model card. Use --token-file.", host)
    log.warning("=" * 72)
