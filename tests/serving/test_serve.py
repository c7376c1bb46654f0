"""Ray Serve over real HTTP on loopback: answers equal Classifier's, bad input gets a 4xx, batching, token."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest

from tests.badfiles import SECRET_PATIENT, bad_files, good_files
from tests.helpers import REPO
from tests.metrics_scrape import scrape_until, total
from tests.serving.hostile import black_png
from xray_ray.files import sha256_hex
from xray_ray.model_folder.card import ModelCard
from xray_ray.model_folder.classifier import Classifier
from xray_ray.processes import command_line, free_port, proc_field_mb, process_tree

pytestmark = pytest.mark.timeout(600)

MAX_BODY_MB = 1.0
SECURE_PREFIX = "/secure"
SERVE_CONFIG = REPO / "configs" / "serve.yaml"


def settings_for(model_dir: Path, **changes):
    """The module's `serve:` settings, checked against the model folder as `xray-ray serve` checks them."""
    from xray_ray.config_services import ServeConfig
    from xray_ray.serving.settings import checked_model

    base = dict(model=str(model_dir), max_batch_size=8, batch_wait_timeout_s=0.05, num_cpus=0.5,
                max_body_mb=MAX_BODY_MB, max_batch_files=8)
    return checked_model(ServeConfig(**{**base, **changes}))


@pytest.fixture(scope="module")
def served(ray_local, compact_model):
    """The app on Serve, HTTP on 127.0.0.1 at a free port; Serve shut down after this module."""
    from ray import serve

    from xray_ray.serving import app as serving

    port = free_port()
    serving.start(settings_for(compact_model[0], host="127.0.0.1", port=port))
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture(scope="module")
def reference(compact_model) -> Classifier:
    return Classifier(compact_model[0])


def sample_images(phantom_root: Path, count: int = 8) -> list[bytes]:
    paths = sorted(phantom_root.glob("*/images/*.png"))
    return [path.read_bytes() for path in paths[:: max(1, len(paths) // count)][:count]]


def assert_answers_match(answers: list[dict], images: list[bytes], reference: Classifier) -> None:
    expected = reference.predict(images)
    for answer, data, probabilities, label, flagged in zip(answers, images, expected.probabilities, expected.labels,
                                                           expected.out_of_distribution):
        got = np.array([answer["probabilities"][c] for c in reference.classes])
        np.testing.assert_allclose(got, probabilities, atol=1e-5)
        assert answer["label"] == label and answer["out_of_distribution"] == bool(flagged)  # flagged, still answered
        assert answer["sha256"] == sha256_hex(data)
        assert (answer["model_version"], answer["engine"]) == (reference.version, reference.engine)


def post_image(url: str, data: bytes, content_type: str = "image/png", headers: dict | None = None) -> httpx.Response:
    return httpx.post(f"{url}/predict", content=data, headers={"Content-Type": content_type, **(headers or {})},
                      timeout=60)


def assert_still_serving(url: str, phantom_root: Path) -> None:
    response = post_image(url, sample_images(phantom_root, 1)[0])
    assert response.status_code == 200, response.text


def test_answers_over_http_equal_classifier_on_phantoms(served, reference, phantom_root):
    images = sample_images(phantom_root)
    answers = [post_image(served, data).json() for data in images]
    assert_answers_match(answers, images, reference)
    assert len({answer["label"] for answer in answers} | {round(a["confidence"], 4) for a in answers}) > 2


def test_answers_over_http_equal_classifier_on_real_xrays(served, reference, real_root):
    paths = pd.read_csv(real_root / "index.csv").groupby("label").head(2)["file_path"]
    images = [(real_root / path).read_bytes() for path in paths]
    answers = []
    for data in images:  # multipart, as a browser or `curl -F` sends them
        response = httpx.post(f"{served}/predict", files={"file": ("x.png", data)}, timeout=60)
        assert response.status_code == 200, response.text
        answers.append(response.json())
    assert_answers_match(answers, images, reference)


@pytest.mark.parametrize("name", ["gray8.png", "gray.jpg", "gray16.tif", "rgb.bmp", "dicom_mono1.dcm"])
def test_raw_body_and_multipart_give_the_same_answer(served, reference, name):
    data = good_files()[name][0]
    content_type = "application/dicom" if name.endswith(".dcm") else "application/octet-stream"
    raw = post_image(served, data, content_type)
    form = httpx.post(f"{served}/predict", files={"file": (name, data)}, timeout=60)
    assert raw.status_code == form.status_code == 200, (raw.text, form.text)
    assert_answers_match([raw.json(), form.json()], [data, data], reference)


def test_a_dicom_upload_asked_for_as_dicom_is_answered_by_its_sr_and_a_png_by_a_406(served, phantom_root, tmp_path):
    from PIL import Image

    from tests.dicom_instances import dx_instance
    from tests.dicom_validation import dciodvfy_errors
    from xray_ray.images.dicom_results import read_answer

    png = sorted(phantom_root.glob("*/images/*.png"))[0]
    pixels = np.asarray(Image.open(png).convert("L"), np.uint16) * 16
    study, sop = "1.2.826.0.1.3680043.10.1419.71", "1.2.826.0.1.3680043.10.1419.73"
    dicom = dx_instance(study, "1.2.826.0.1.3680043.10.1419.72", sop, "20261201", "PA", size=pixels.shape[0],
                        pixels=pixels)
    as_json = post_image(served, dicom, "application/dicom").json()
    for accept in ("application/dicom", "application/json;q=0.5, application/dicom"):
        response = httpx.post(f"{served}/predict", content=dicom, timeout=60,
                              headers={"Content-Type": "application/dicom", "Accept": accept})
        assert response.status_code == 200 and response.headers["content-type"] == "application/dicom"
        answer = read_answer(response.content)
        assert answer["source_sop_instance_uid"] == sop and answer["study_instance_uid"] == study
        assert answer["predicted_label"] == as_json["label"] and answer["model_version"] == as_json["model_version"]
        assert answer["out_of_distribution"] == as_json["out_of_distribution"]
        for name, value in as_json["probabilities"].items():
            assert answer["probabilities"][name] == pytest.approx(value, abs=1e-6)
    (tmp_path / "sr.dcm").write_bytes(response.content)
    assert dciodvfy_errors(tmp_path / "sr.dcm") == []
    refused = httpx.post(f"{served}/predict", content=png.read_bytes(), timeout=60,
                         headers={"Content-Type": "image/png", "Accept": "application/dicom"})
    assert refused.status_code == 406 and refused.json()["error"] == "not_dicom"
    assert "not DICOM" in refused.json()["reason"]
    preferred_json = httpx.post(f"{served}/predict", content=dicom, timeout=60, headers={
        "Content-Type": "application/dicom", "Accept": "application/json, application/dicom;q=0.2"})
    assert preferred_json.status_code == 200 and preferred_json.json()["label"] == as_json["label"]


BAD_IMAGES = ["empty.png", "text.png", "random.jpg", "truncated.png", "truncated.jpg", "truncated.dcm",
              "bomb.png", "tiny.png", "multiframe.dcm", "rgb.dcm", "no_pixels.dcm"]


@pytest.mark.parametrize("name", BAD_IMAGES)
def test_bad_image_gets_a_4xx_with_its_reason_and_the_replica_keeps_serving(served, phantom_root, name):
    data, reason = bad_files()[name]
    response = post_image(served, data, "application/octet-stream")
    expected_status, expected_reason = (400, "empty") if not data else (422, reason)
    assert response.status_code == expected_status, response.text
    assert expected_reason in response.json()["reason"]
    assert SECRET_PATIENT not in response.text
    assert_still_serving(served, phantom_root)


def hostile_uploads() -> dict[str, bytes]:
    """Every broken file of tests/badfiles.py, and PNGs at and past the pixel bounds that compress to a few KB."""
    return {**{name: data for name, (data, _) in bad_files().items()},
            "wide_1000000x32.png": black_png(1_000_000, 32), "tall_32x1000000.png": black_png(32, 1_000_000),
            "black_7000x7000.png": black_png(7000, 7000), "black16_7000x7000.png": black_png(7000, 7000, 16)}


IN_BOUNDS = {"black_7000x7000.png", "black16_7000x7000.png"}
"""Hostile uploads inside every bound (the pixel cap is 50 Mpx): answered, like any usable image."""


def test_every_hostile_upload_is_refused_with_a_reason_code_and_the_replica_keeps_serving(served, phantom_root):
    answers = {}
    for name, data in hostile_uploads().items():
        response = post_image(served, data, "application/octet-stream")
        answers[name] = (response.status_code, response.json())
        assert_still_serving(served, phantom_root)
    for name, (status, answer) in answers.items():
        if name in IN_BOUNDS and status == 200:
            assert answer["label"] and answer["model_version"], (name, answer)
            continue
        assert 400 <= status < 500, (name, status, answer)
        assert answer["error"] and answer["reason"] and SECRET_PATIENT not in json.dumps(answer), (name, answer)
    assert answers["wide_1000000x32.png"][0] == 422 and answers["tall_32x1000000.png"][0] == 422


def test_batch_answers_each_file_whatever_its_neighbours(served, reference, phantom_root):
    images = sample_images(phantom_root, 2)
    hostile = hostile_uploads()
    names = ["wide_1000000x32.png", "bomb.png", "truncated.png", "empty.png", "jpegls.dcm"]
    parts = [("files", ("first.png", images[0]))]
    parts += [("files", (name, hostile[name])) for name in names]
    parts += [("files", ("last.png", images[1]))]
    response = httpx.post(f"{served}/predict/batch", files=parts, timeout=120)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["file"] for r in results] == ["first.png", *names, "last.png"]
    assert [r["status"] for r in results] == ["ok", *["error"] * len(names), "ok"]
    assert all(r["error"] and r["reason"] for r in results[1:-1])
    assert_answers_match([results[0], results[-1]], images, reference)
    assert_still_serving(served, phantom_root)


def replica_pids(app_name: str) -> list[int]:
    """The processes of this session's Ray that run a replica of `app_name`."""
    title = f"ServeReplica:{app_name}:".encode()
    return [pid for pid in process_tree(os.getpid()) if title in command_line(pid)]


def test_32_concurrent_worst_case_uploads_stay_within_the_memory_budget(served, compact_model, phantom_root):
    """The largest accepted body that decodes to the pixel cap (16-bit, 7000 x 7000), 32 at once, on a replica of
    its own: each is answered or refused (429), the replica's peak RSS stays within its stated budget."""
    from ray import serve

    from xray_ray.serving import app as serving
    from xray_ray.serving.settings import memory_budget_mb

    settings = settings_for(compact_model[0], num_cpus=1, max_inflight_mb=8 * MAX_BODY_MB, max_batch_size=16,
                            max_ongoing_requests=32)
    serve.run(serving.build_app(settings), name="xray-ray-budget", route_prefix="/budget")
    url = f"{served}/budget"
    try:
        worst = black_png(7000, 7000, 16, size=int(MAX_BODY_MB * 2**20))
        with httpx.Client(timeout=600) as client, ThreadPoolExecutor(32) as pool:
            responses = list(pool.map(lambda _: client.post(f"{url}/predict", content=worst,
                                                            headers={"Content-Type": "image/png"}), range(32)))
        statuses = [response.status_code for response in responses]
        assert set(statuses) <= {200, 429}, statuses
        assert 200 in statuses and all(r.json().get("error") == "busy" for r in responses if r.status_code == 429)
        budget = httpx.get(f"{url}/model").json()["serving"]["memory_budget_mb"]
        assert budget == memory_budget_mb(settings)
        (replica,) = replica_pids("xray-ray-budget")
        peak = proc_field_mb(replica, "VmHWM")
        print(f"\n32 worst-case uploads: {statuses.count(200)} answered, {statuses.count(429)} refused; "
              f"replica peak RSS {peak:.0f} MB, budget {budget:.0f} MB")
        assert peak <= budget
        assert_still_serving(url, phantom_root)
    finally:
        serve.delete("xray-ray-budget")


@pytest.mark.parametrize("content_type, body, status, error", [
    ("text/plain", b"/etc/passwd", 415, "unsupported_content_type"),  # a server-side path is just bad content
    ("application/json", b'{"path": "/etc/passwd"}', 415, "unsupported_content_type"),
    ("", b"\x89PNG", 415, "unsupported_content_type"),
    ("application/octet-stream", b"/etc/passwd", 422, "not_an_image"),
    ("multipart/form-data; boundary=xyz", b"--xyz\r\nnot a part", 400, "bad_multipart"),
    ("application/octet-stream", b"\0" * int(MAX_BODY_MB * 2**20 + 1), 413, "body_too_large"),
])
def test_bad_request_gets_a_4xx_json_reason(served, phantom_root, content_type, body, status, error):
    response = post_image(served, body, content_type)
    assert response.status_code == status, response.text
    assert response.json()["error"] == error and response.json()["reason"]
    assert_still_serving(served, phantom_root)


def test_chunked_body_over_the_limit_is_refused(served, phantom_root):
    def chunks():
        for _ in range(int(MAX_BODY_MB * 4)):
            yield b"\0" * 2**18 * 2  # no Content-Length: the cap must hold while streaming

    response = httpx.post(f"{served}/predict", content=chunks(), timeout=60,
                          headers={"Content-Type": "application/octet-stream"})
    assert response.status_code == 413, response.text
    assert_still_serving(served, phantom_root)


def test_multipart_without_a_file_and_two_files_are_refused(served):
    form = b'--xyz\r\nContent-Disposition: form-data; name="path"\r\n\r\n/etc/passwd\r\n--xyz--\r\n'
    no_file = post_image(served, form, "multipart/form-data; boundary=xyz")
    assert no_file.status_code == 400 and no_file.json()["error"] == "no_file"
    data = good_files()["gray8.png"][0]
    two = httpx.post(f"{served}/predict", files=[("a", ("a.png", data)), ("b", ("b.png", data))], timeout=60)
    assert two.status_code == 400 and two.json()["error"] == "too_many_files"


def test_batch_endpoint_answers_each_file_in_order(served, reference, phantom_root):
    images = sample_images(phantom_root, 3)
    bad, reason = bad_files()["multiframe.dcm"]
    parts = [("files", ("one.png", images[0])), ("files", ("bad.dcm", bad)), ("files", ("two.png", images[1])),
             ("files", ("three.png", images[2]))]
    response = httpx.post(f"{served}/predict/batch", files=parts, timeout=60)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["file"] for r in results] == ["one.png", "bad.dcm", "two.png", "three.png"]
    assert [r["status"] for r in results] == ["ok", "error", "ok", "ok"]
    assert reason in results[1]["reason"] and SECRET_PATIENT not in response.text
    assert_answers_match([results[0], results[2], results[3]], images, reference)


def test_batch_endpoint_refuses_more_files_than_allowed(served):
    data = good_files()["gray8.png"][0]
    response = httpx.post(f"{served}/predict/batch", files=[("f", (f"{i}.png", data)) for i in range(9)], timeout=60)
    assert response.status_code == 400 and response.json()["error"] == "bad_multipart"


def test_64_requests_from_16_clients_all_succeed_and_are_batched(served, reference, phantom_root):
    images = sample_images(phantom_root, 16) * 4
    before = httpx.get(f"{served}/stats").json()
    with httpx.Client(timeout=120) as client, ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda data: client.post(f"{served}/predict", content=data,
                                                           headers={"Content-Type": "image/png"}), images))
    assert [r.status_code for r in responses] == [200] * 64
    assert_answers_match([r.json() for r in responses], images, reference)
    after = httpx.get(f"{served}/stats").json()
    sizes = {int(size): count - before["batch_sizes"].get(size, 0) for size, count in after["batch_sizes"].items()}
    assert sum(size * count for size, count in sizes.items()) == 64
    assert max(size for size, count in sizes.items() if count) > 1  # requests shared a forward pass
    assert sum(sizes.values()) < 64


def test_health_and_model_info(served, reference, compact_model):
    health = httpx.get(f"{served}/healthz")
    assert health.status_code == 200 and health.json()["model_version"] == reference.version
    answer = httpx.get(f"{served}/model")
    info = answer.json()
    assert info["card"] == ModelCard.read(compact_model[0]).public() and info["card"]["version"] == reference.version
    assert info["card"]["metrics"]["test"]["accuracy"] > 0.25 and info["card"]["classes"] == reference.classes
    # No filesystem path of the server reaches a client: not the model folder, not the training data.
    assert str(compact_model[0].parent) not in answer.text and "/tmp" not in answer.text and "config" not in info["card"]
    assert info["runtime"]["engine"] == "onnxruntime"
    assert info["runtime"]["tensorflow_imported"] is False  # the ONNX Runtime replica never loads TensorFlow
    assert info["serving"]["max_ongoing_requests"] >= info["serving"]["max_batch_size"]


def test_deployment_handle_scores_preprocessed_batches_like_classifier(served, reference, phantom_root):
    from ray import serve

    from xray_ray.config import SERVE_APP_NAME, SERVE_DEPLOYMENT_NAME

    batch = np.stack([reference.prepare(data) for data in sample_images(phantom_root, 4)])
    handle = serve.get_deployment_handle(SERVE_DEPLOYMENT_NAME, app_name=SERVE_APP_NAME)
    answer = handle.score_arrays.remote(batch).result()
    np.testing.assert_allclose(answer["probabilities"], reference.predict_arrays(batch).probabilities, atol=1e-5)
    assert answer["model_version"] == reference.version
    assert handle.describe.remote().result()["image_size"] == reference.image_size


def test_bearer_token_guards_every_endpoint_but_health(served, compact_model, phantom_root, tmp_path):
    from ray import serve

    from xray_ray.serving import app as serving

    token = "s3cret-" + "x" * 24
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    serve.run(serving.build_app(settings_for(compact_model[0], token_file=str(token_file))),
              name="xray-ray-secure", route_prefix=SECURE_PREFIX)
    try:
        url = served + SECURE_PREFIX
        image = sample_images(phantom_root, 1)[0]
        assert httpx.get(f"{url}/healthz").status_code == 200
        for auth in (None, "Bearer wrong", token, f"Basic {token}"):
            headers = {"Authorization": auth} if auth else {}
            assert post_image(url, image, headers=headers).status_code == 401
            assert httpx.get(f"{url}/model", headers=headers).status_code == 401
            assert httpx.get(f"{url}/stats", headers=headers).status_code == 401
        good = {"Authorization": f"Bearer {token}"}
        assert post_image(url, image, headers=good).status_code == 200
        assert httpx.get(f"{url}/model", headers=good).status_code == 200
        assert token_file.name not in httpx.get(f"{url}/model", headers=good).text
        (readme_token_curl,) = [c for c in readme_curl_commands() if "Authorization" in c]
        command = readme_token_curl.replace("/etc/xray-ray/token", str(token_file)).replace(
            "http://127.0.0.1:8000", url)
        done = subprocess.run(["bash", "-c", command + " --fail-with-body --silent"], capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0 and json.loads(done.stdout)["card"]["version"], done.stdout
    finally:
        serve.delete("xray-ray-secure")
    assert not logs_containing(token)


def test_metrics_count_known_requests_by_class_reason_route_and_batch(served, reference, compact_model, phantom_root):
    """An application of its own (its `application` tag sets its series apart): a few known requests, then the
    node's Prometheus endpoint is scraped until the counters reach exactly what was sent."""
    from ray import serve

    from xray_ray.ray_runtime import metrics_url
    from xray_ray.serving import app as serving

    name, prefix = "xray-ray-metered", "/metered"
    serve.run(serving.build_app(settings_for(compact_model[0])), name=name, route_prefix=prefix)
    try:
        url = served + prefix
        images = sample_images(phantom_root, 5)
        for data in images[:3]:
            assert post_image(url, data).status_code == 200
        assert post_image(url, b"").status_code == 400
        batch = [("file", (f"{i}.png", data)) for i, data in enumerate(images[3:])] + [("file", ("x.png", b"text"))]
        assert httpx.post(f"{url}/predict/batch", files=batch, timeout=60).status_code == 200
        assert httpx.get(f"{url}/healthz").status_code == 200
        tags = {"application": name, "model_version": reference.version, "engine": reference.engine}
        found = scrape_until(metrics_url(), lambda found: (  # the replica lives on until its last export is in
            total(found, "ray_xray_serve_request_seconds_count", **tags),
            total(found, "ray_xray_serve_predictions_total", **tags),
            total(found, "ray_xray_serve_batch_size_count", **tags) >= 4) == (6, 5, True))
    finally:
        serve.delete(name)
    expected = reference.predict(images)
    by_class = {label: expected.labels.count(label) for label in set(expected.labels)}
    assert {label: total(found, "ray_xray_serve_predictions_total", predicted_class=label, source="http", **tags)
            for label in by_class} == by_class
    assert total(found, "ray_xray_serve_out_of_distribution_total", **tags) == expected.out_of_distribution.sum()
    assert total(found, "ray_xray_serve_rejected_total", reason="empty_body", **tags) == 1
    assert total(found, "ray_xray_serve_rejected_total", **tags) == 2  # the empty body and the batch's text file
    seconds = "ray_xray_serve_request_seconds_count"
    assert total(found, seconds, route="/predict", status="200", **tags) == 3
    assert total(found, seconds, route="/predict", status="400", **tags) == 1
    assert total(found, seconds, route="/predict/batch", **tags) == total(found, seconds, route="/healthz", **tags) == 1
    # three single requests, then the batch request's two images in one or two passes (Ray 2.60 reports a
    # histogram's _sum from bucket midpoints, so passes are counted, not images summed)
    assert total(found, "ray_xray_serve_batch_size_bucket", le="1.0", **tags) in (3, 5)
    assert total(found, "ray_xray_serve_batch_size_count", **tags) in (4, 5)


def logs_containing(secret: str) -> list[str]:
    """Ray session log files (driver, Serve proxy and replicas) that contain `secret`."""
    import ray

    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    return [str(path) for path in logs.rglob("*") if path.is_file() and secret.encode() in path.read_bytes()]


def test_logs_carry_no_patient_fields(served):
    for name in ("dicom_mono1.dcm", "dicom_mono2.dcm"):
        assert post_image(served, good_files()[name][0], "application/dicom").status_code == 200
    for name in ("multiframe.dcm", "rgb.dcm"):
        assert post_image(served, bad_files()[name][0], "application/dicom").status_code == 422
    assert not logs_containing(SECRET_PATIENT)


def test_settings_refuse_batches_that_cannot_fill(compact_model, tmp_path):
    with pytest.raises(ValueError, match="max_ongoing_requests"):
        settings_for(compact_model[0], max_batch_size=16, max_ongoing_requests=5)
    with pytest.raises(ValueError, match="model_card.json"):
        settings_for(tmp_path)
    assert settings_for(compact_model[0], max_batch_size=16, max_queued_requests=8).ongoing_requests == 4 * 24


def test_serve_config_yaml_is_valid_and_builds_the_app(compact_model):
    import yaml
    from ray.serve import Application
    from ray.serve.schema import ServeDeploySchema

    from xray_ray.config import SERVE_APP_NAME
    from xray_ray.config_services import ServeConfig
    from xray_ray.serving.app import app_builder

    config = ServeDeploySchema.model_validate(yaml.safe_load(SERVE_CONFIG.read_text()))
    assert config.http_options.host == "127.0.0.1"
    (app,) = config.applications
    assert (app.name, app.import_path) == (SERVE_APP_NAME, "xray_ray.serving.app:app_builder")
    args = {**app.args, "model": str(compact_model[0])}  # every key must be a `serve:` setting
    assert ServeConfig(**args).ongoing_requests >= ServeConfig(**args).max_batch_size
    assert isinstance(app_builder(args), Application)


def test_cli_serve_answers_with_its_token_and_stops_cleanly_on_sigterm(compact_model, phantom_root, tmp_path):
    port = free_port()
    token_file = tmp_path / "token"
    token_file.write_text("cli-token-123456\n")
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    command = [sys.executable, "-m", "xray_ray.cli", "serve", "--model", str(compact_model[0]), "--port", str(port),
               "--num-cpus", "0.5", "--token-file", str(token_file)]
    server = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and server.poll() is None:
            try:
                if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(2)
        image = sample_images(phantom_root, 1)[0]
        assert post_image(url, image).status_code == 401
        answer = post_image(url, image, headers={"Authorization": "Bearer cli-token-123456"})
        assert answer.status_code == 200, answer.text
        server.send_signal(signal.SIGTERM)
        output, _ = server.communicate(timeout=120)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
    assert server.returncode == 0, output[-3000:]
    assert "cli-token-123456" not in output
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/healthz", timeout=5)


@pytest.mark.parametrize("args, message", [
    (["--model", "/nonexistent"], "model_card.json"),
    (["--max-batch-size", "8", "--token-file", "/nonexistent/token"], "No such file"),
])
def test_cli_serve_refuses_bad_settings_before_starting_ray(compact_model, args, message):
    from typer.testing import CliRunner

    from xray_ray.cli import app

    if "--model" not in args:
        args = ["--model", str(compact_model[0]), *args]
    result = CliRunner().invoke(app, ["serve", *args])
    assert result.exit_code == 2 and message in result.output


def test_scoring_through_serve_gives_the_actor_backends_predictions(served, compact_model, phantom_root, tmp_path):
    """The scoring job's `serve` backend reaches this app's replicas and answers as its own actors do."""
    from xray_ray.config_services import ScoreConfig
    from xray_ray.scoring.pipeline import PROBABILITY_COLUMNS
    from xray_ray.scoring.run import read_predictions, score

    frames = {}
    for backend in ("actors", "serve"):
        out = tmp_path / backend
        summary = score(ScoreConfig(archives=[str(phantom_root)], out=str(out), backend=backend,
                                     model=str(compact_model[0]) if backend == "actors" else None,
                                     cpus_per_actor=0.5, batch_size=8))
        frames[backend] = read_predictions(out / summary["run"]).sort_values("path", ignore_index=True)
    actors, served_rows = frames["actors"], frames["serve"]
    assert len(actors) == len(served_rows) == 4 * 12 and (actors["status"] == "ok").all()
    assert list(actors["path"]) == list(served_rows["path"])
    assert list(actors["predicted_label"]) == list(served_rows["predicted_label"])
    probability_columns = list(PROBABILITY_COLUMNS.values())
    np.testing.assert_allclose(served_rows[probability_columns].to_numpy(float),
                               actors[probability_columns].to_numpy(float), atol=1e-5)
    assert set(served_rows["model_version"]) == set(actors["model_version"])
    np.testing.assert_allclose(served_rows["ood_score"].to_numpy(float), actors["ood_score"].to_numpy(float), rtol=1e-4)
    assert list(served_rows["out_of_distribution"]) == list(actors["out_of_distribution"])


def readme_curl_commands() -> list[str]:
    """The curl examples for the Serve endpoints, as printed in the serving docs."""
    readme = (REPO / "docs" / "serving.md").read_text()
    section = readme[readme.index("## Serving single studies"):]
    return [line for line in section.split("```")[3].splitlines() if line.startswith("curl ")]


def test_readme_curl_examples_work_literally(served, tmp_path):
    """Each curl line of the README, run by a shell against this app (only host, port and files swapped in)."""
    import shutil

    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    files = {"chest.png": good_files()["gray8.png"][0], "study.dcm": good_files()["dicom_mono2.dcm"][0],
             "a.png": good_files()["gray.jpg"][0], "b.dcm": good_files()["dicom_mono1.dcm"][0]}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    commands = readme_curl_commands()
    assert len(commands) >= 4
    for command in commands:
        if "Authorization" in command:
            continue  # the token example: the token test covers the header against a guarded app
        command = command.replace("http://127.0.0.1:8000", served)
        done = subprocess.run(["bash", "-c", command + " --fail-with-body --silent --show-error"], cwd=tmp_path,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, (command, done.stdout, done.stderr)
        answer = json.loads(done.stdout)
        assert "label" in answer or "results" in answer or answer.get("status") == "ok", answer
