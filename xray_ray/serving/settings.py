"""How the Serve application serves: `ServeSettings` (the Serve config's `args`) and the bearer token."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from xray_ray.model_folder.card import CARD_FILE

TOKEN_ENV = "XRAY_RAY_SERVE_TOKEN"
"""Environment variable holding the bearer token (a token file is the safer choice)."""


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


def read_token(token_file: str | None) -> str | None:
    """The bearer token from `token_file`, else from $XRAY_RAY_SERVE_TOKEN; None when neither is set."""
    if token_file:
        token = Path(token_file).read_text().strip()
        if not token:
            raise ValueError(f"token file {token_file} is empty")
        return token
    return os.environ.get(TOKEN_ENV) or None
