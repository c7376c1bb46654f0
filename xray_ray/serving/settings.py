"""What Serve checks and derives from its `serve:` settings (`config_services.ServeConfig`, also a Serve
config's `args`): the model folder (or the registry's current one) before any replica starts, a replica's memory budget, the bearer
token, and the refusal to expose an unguarded endpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from pathlib import Path

from xray_ray.config_services import ServeConfig
from xray_ray.images.bounds import LIMITS
from xray_ray.loopback import is_loopback_host
from xray_ray.model_folder.card import ModelCard
from xray_ray.model_folder.classifier import check_before_workers, load_detector
from xray_ray.model_folder.registry import current_folder

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


def model_folder(settings: ServeConfig) -> Path:
    """The folder to serve now: `serve.model`, or the current model of `serve.registry`."""
    if settings.registry:
        return current_folder(settings.registry)
    if not settings.model:
        raise ValueError("give the model folder (--model, serve.model) or a registry (--registry, serve.registry)")
    return Path(settings.model)


def checked_model(settings: ServeConfig) -> ServeConfig:
    """`settings` with the model folder (or registry) and token file as absolute paths (replicas may run
    elsewhere), once the model's card and out-of-distribution detector are read and its version is the
    expected one.

    ValueError when there is no model, or it cannot be used; checked once, before any replica starts."""
    try:
        folder = model_folder(settings)
        card = ModelCard.read(folder)
        load_detector(card)
        check_before_workers(card)
    except OSError as err:
        raise ValueError(str(err)) from None
    if settings.expect_version is not None and card.version != settings.expect_version:
        raise ValueError(f"{folder} holds model {card.version}, not the expected {settings.expect_version}")
    absolute = {name: str(Path(value).resolve()) for name in ("model", "registry", "token_file")
                if (value := getattr(settings, name))}
    return dataclasses.replace(settings, **absolute)


def decode_slots(settings: ServeConfig) -> int:
    """Images one replica decodes at once: its whole CPUs, at least one."""
    return max(1, math.floor(settings.num_cpus))


def memory_budget_mb(settings: ServeConfig) -> float:
    """The most resident memory one replica may reach, whatever the uploads: the runtime, the bodies it
    may hold, and the images it may decode at once at the pixel cap."""
    decode_mb = LIMITS.max_pixels * DECODE_BYTES_PER_PIXEL / 2**20
    return RUNTIME_MB + BODY_COPIES * settings.max_inflight_mb + decode_slots(settings) * decode_mb


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
