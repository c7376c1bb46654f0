"""POST /explain: the answer plus a Grad-CAM heat map, as JSON with a PNG, the PNG itself or an array; bounded."""

from __future__ import annotations

import asyncio
import base64
import io
import threading

import httpx
import numpy as np
import pytest
from PIL import Image

from xray_ray.files import sha256_hex
from xray_ray.model_folder.classifier import Classifier
from xray_ray.model_folder.gradcam import explain
from xray_ray.processes import free_port
from xray_ray.serving import explain as explaining
from xray_ray.serving.explain import ExplainLimiter, _array
from xray_ray.serving.http import ApiError

pytestmark = pytest.mark.timeout(900)


def test_limiter_refuses_beyond_its_slots_and_gives_up_waiting_after_the_timeout():
    release = threading.Event()

    async def scenario():
        limiter = ExplainLimiter(concurrency=1, timeout_s=0.2)
        with pytest.raises(ApiError) as timeout:
            await limiter.run(release.wait)
        with pytest.raises(ApiError) as busy:  # the abandoned thread still holds the slot
            await limiter.run(lambda: "never")
        release.set()
        for _ in range(100):  # the slot comes back once that thread has really finished
            try:
                return timeout.value, busy.value, await limiter.run(lambda: "done")
            except ApiError:
                await asyncio.sleep(0.05)

    timeout, busy, done = asyncio.run(scenario())
    assert (timeout.status, timeout.error) == (504, "explain_timeout")
    assert (busy.status, busy.error) == (503, "busy")
    assert done == "done"


def test_array_is_the_grid_or_at_most_64_px():
    small = _array(np.eye(8, dtype=np.float32))
    assert small["shape"] == [8, 8] and small["resolution"] == "backbone grid" and small["values"][0][0] == 1.0
    large = _array(np.ones((100, 100), np.float32))
    assert large["shape"] == [64, 64] and len(large["values"]) == 64


def test_an_unusable_image_is_a_422_with_its_code_and_never_leaks_an_internal_message(monkeypatch):
    class NoModel:  # a refusal comes before the model is asked
        image_size = 64

    with pytest.raises(ApiError) as refused:
        explaining.explain_bytes(NoModel(), b"not an image at all" * 10, None, "overlay")
    assert (refused.value.status, refused.value.error) == (422, "not_an_image")

    def broken(gray, size):
        raise KeyError("/srv/models/internal/path")

    monkeypatch.setattr(explaining, "preprocess", broken)
    image = io.BytesIO()
    Image.fromarray(np.full((64, 64), 128, np.uint8)).save(image, format="PNG")
    with pytest.raises(ApiError) as failed:
        explaining.explain_bytes(NoModel(), image.getvalue(), None, "overlay")
    assert (failed.value.status, failed.value.error) == (422, "internal_error:KeyError")
    assert "/srv" not in failed.value.reason


@pytest.fixture(scope="module")
def served(ray_local, compact_model):
    from ray import serve

    from xray_ray.config_services import ServeConfig
    from xray_ray.serving import app as serving

    port = free_port()
    serving.start(ServeConfig(model=str(compact_model[0]), num_cpus=0.5, max_body_mb=1.0, host="127.0.0.1", port=port))
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def _png_bytes(phantom_root, name: str = "Lung_Opacity/images/Lung_Opacity-1.png") -> bytes:
    return (phantom_root / name).read_bytes()


def test_explain_answers_like_predict_with_an_overlay_png(served, compact_model, phantom_root):
    data = _png_bytes(phantom_root)
    answer = httpx.post(f"{served}/explain", content=data, headers={"Content-Type": "image/png"}, timeout=60)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    predicted = httpx.post(f"{served}/predict", content=data, headers={"Content-Type": "image/png"}, timeout=60).json()
    assert body["label"] == body["explained_class"] == predicted["label"]
    np.testing.assert_allclose([body["probabilities"][c] for c in predicted["probabilities"]],
                               list(predicted["probabilities"].values()), atol=1e-6)
    assert body["sha256"] == sha256_hex(data) and body["model_version"] == predicted["model_version"]
    with Image.open(io.BytesIO(base64.b64decode(body["overlay_png_base64"]))) as image:
        assert image.format == "PNG" and image.mode == "RGB" and list(image.size) == body["overlay_size"]
        assert max(image.size) <= 256

    as_png = httpx.post(f"{served}/explain", content=data, timeout=60,
                        headers={"Content-Type": "image/png", "Accept": "image/png"})
    assert as_png.headers["content-type"] == "image/png"
    assert as_png.content == base64.b64decode(body["overlay_png_base64"])
    assert as_png.headers["x-xray-label"] == body["label"] and as_png.headers["x-xray-sha256"] == body["sha256"]


def test_explain_array_for_an_asked_class_equals_the_library_map(served, compact_model, phantom_root):
    data = _png_bytes(phantom_root, "Normal/images/Normal-2.png")
    answer = httpx.post(f"{served}/explain?format=array&class=COVID", content=data, timeout=60,
                        headers={"Content-Type": "image/png"})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    classifier = Classifier(compact_model[0])
    expected = explain(classifier, classifier.prepare(data)[np.newaxis], ["COVID"]).grid[0]
    assert body["explained_class"] == "COVID" and "overlay_png_base64" not in body
    assert body["heatmap"]["shape"] == list(expected.shape) and body["heatmap"]["resolution"] == "backbone grid"
    np.testing.assert_allclose(body["heatmap"]["values"], expected, atol=2e-3)


@pytest.mark.parametrize(("query", "body", "status", "error"), [
    ("?format=jpeg", None, 400, "bad_format"),
    ("?class=Pneumothorax", None, 400, "unknown_class"),
    ("", b"", 400, "empty_body"),
    ("", b"not an image at all" * 10, 422, "not_an_image"),
    ("", b"\x89PNG" + b"\0" * (2**20 + 10), 413, "body_too_large"),
])
def test_explain_refuses_bad_requests_with_a_reason_and_keeps_serving(served, phantom_root, query, body, status,
                                                                       error):
    answer = httpx.post(f"{served}/explain{query}", content=_png_bytes(phantom_root) if body is None else body,
                        headers={"Content-Type": "image/png"}, timeout=60)
    assert answer.status_code == status and answer.json()["error"] == error, answer.text
    again = httpx.post(f"{served}/explain", content=_png_bytes(phantom_root), timeout=60,
                       headers={"Content-Type": "image/png"})
    assert again.status_code == 200
