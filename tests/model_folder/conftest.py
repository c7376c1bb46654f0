"""Models shared by the model-folder tests: trained once per session (graph building costs about a minute)."""

from __future__ import annotations

import pytest

from tests.helpers import Exported, train_and_export

SIZE = 64
"""Input size of the shared models."""


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Exported]:
    """A compact CNN (2 epochs) and the origin's EfficientNetB1 (from scratch, 1 epoch on 24 phantoms), at 64 px."""
    root = tmp_path_factory.mktemp("onnx_models")
    return {
        "compact": train_and_export(root / "compact", SIZE, "compact", epochs=2, per_class=12),
        "effb1": train_and_export(root / "effb1", SIZE, "efficientnetb1", epochs=1, per_class=6),
    }
