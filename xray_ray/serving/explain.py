"""`POST /explain`: one image's answer plus its Grad-CAM heat map, bounded in size and time.

Same input rules and limits as /predict (one image, raw body or multipart, the same body
cap and decoder bounds). Query parameters:

* `class=<name>`: explain that class instead of the predicted one;
* `format=overlay` (default): JSON with the answer and `overlay_png_base64`, the heat map
  over the X-ray as a PNG of at most 256 px a side; with `Accept: image/png` the PNG itself
  is the body and the answer travels in `X-Xray-*` headers;
* `format=array`: JSON with the answer and `heatmap`, the map as nested lists in [0, 1] at
  the backbone's grid (for example 8 x 8), or resized to 64 x 64 when that grid is finer.

The map explains the class's pre-softmax score (model_folder.gradcam). The work runs in a
thread: at most EXPLAIN_CONCURRENCY per replica (503 `busy` beyond, a thread is never
abandoned with its slot freed) and EXPLAIN_TIMEOUT_S per request (504 `explain_timeout`).
Explanations do not join /predict's batches: one image, one forward pass.
"""

from __future__ import annotations

import asyncio
import base64
import threading
from collections.abc import Callable

import numpy as np
from fastapi import Request
from fastapi.responses import JSONResponse, Response

from xray_ray.files import sha256_hex
from xray_ray.images.decode import decode
from xray_ray.images.overlay import display_square, heat_map_png
from xray_ray.images.preprocess import preprocess
from xray_ray.model_folder.classifier import Classifier
from xray_ray.model_folder.gradcam import explain, upsample
from xray_ray.serving.http import ApiError, unusable

EXPLAIN_TIMEOUT_S = 10.0
"""Longest one explanation may take before the client gets a 504."""
EXPLAIN_CONCURRENCY = 2
"""Explanations computed at once per replica; more get a 503 rather than queueing without bound."""
ARRAY_MAX_SIDE = 64
"""Largest side of the map returned with format=array."""
METHOD = "Grad-CAM of the class's pre-softmax score over the backbone's last convolutional maps"
FORMATS = ("overlay", "array")


class ExplainLimiter:
    """Runs explanations in threads: a bounded number at once, each awaited for at most `timeout_s`."""

    def __init__(self, concurrency: int = EXPLAIN_CONCURRENCY, timeout_s: float = EXPLAIN_TIMEOUT_S) -> None:
        self._slots = threading.BoundedSemaphore(concurrency)
        self.timeout_s = timeout_s

    def _run_then_release(self, work: Callable, *args):
        try:
            return work(*args)
        finally:
            self._slots.release()  # only when the thread is really done, even after its client gave up

    async def run(self, work: Callable, *args):
        if not self._slots.acquire(blocking=False):
            raise ApiError(503, "busy", "too many explanations are being computed; try again in a moment")
        future = asyncio.get_running_loop().run_in_executor(None, self._run_then_release, work, *args)
        try:
            return await asyncio.wait_for(asyncio.shield(future), self.timeout_s)
        except TimeoutError:
            raise ApiError(504, "explain_timeout",
                           f"the explanation took longer than {self.timeout_s:g} s and was abandoned") from None


def _array(grid: np.ndarray) -> dict:
    """The map for format=array: the backbone's grid, or resized to ARRAY_MAX_SIDE when finer."""
    resolution = "backbone grid"
    if max(grid.shape) > ARRAY_MAX_SIDE:
        grid, resolution = upsample(grid[np.newaxis], ARRAY_MAX_SIDE)[0], f"resized to {ARRAY_MAX_SIDE}"
    return {"shape": list(grid.shape), "resolution": resolution, "values": np.round(grid, 4).tolist()}


def explain_bytes(classifier: Classifier, data: bytes, class_name: str | None, form: str) -> tuple[dict, bytes | None]:
    """The JSON answer for one image and, for the overlay format, the overlay PNG; ApiError for unusable input."""
    try:
        gray = decode(data)
        model_input = preprocess(gray, classifier.image_size)
    except Exception as err:  # this image's problem: a 422 with its reason code, never a 500
        raise unusable(err) from err
    result = explain(classifier, model_input[np.newaxis], [class_name])
    (answer,) = result.predictions.rows()
    answer = {**answer, "sha256": sha256_hex(data), "bytes": len(data), "explained_class": result.explained[0],
              "method": METHOD}
    if form == "array":
        return {**answer, "heatmap": _array(result.grid[0])}, None
    square = display_square(gray)
    return {**answer, "overlay_size": list(square.shape)}, heat_map_png(square, result.heatmaps[0])


async def explain_response(classifier: Classifier, limiter: ExplainLimiter, files: list[tuple[str, bytes]],
                           request: Request) -> Response:
    """The /explain answer for the uploaded `files` (exactly one) as the request's parameters ask."""
    if len(files) > 1:
        raise ApiError(400, "too_many_files", "send one image to /explain")
    data = files[0][1]
    if not data:
        raise ApiError(400, "empty_body", "the image is empty (0 bytes)")
    form = request.query_params.get("format", "overlay")
    if form not in FORMATS:
        raise ApiError(400, "bad_format", f"format must be one of {', '.join(FORMATS)}, not {form!r}")
    class_name = request.query_params.get("class") or None
    if class_name is not None and class_name not in classifier.classes:
        raise ApiError(400, "unknown_class", f"class must be one of {', '.join(classifier.classes)}")
    answer, image = await limiter.run(explain_bytes, classifier, data, class_name, form)
    if image is None:
        return JSONResponse(answer)
    if "image/png" in request.headers.get("accept", ""):
        return Response(image, media_type="image/png", headers={
            "X-Xray-Label": answer["label"], "X-Xray-Confidence": f"{answer['confidence']:.6f}",
            "X-Xray-Explained-Class": answer["explained_class"], "X-Xray-Model-Version": answer["model_version"],
            "X-Xray-Sha256": answer["sha256"]})
    return JSONResponse({**answer, "overlay_png_base64": base64.b64encode(image).decode("ascii")})
