"""Serve follows the registry under load: promotions and rollbacks swap the model with no failed request and
no answer from the old version after its cut-over; a model that fails its checks leaves the old one answering.

Real Serve and real HTTP on loopback, one replica following a registry folder; 8 clients, every loop bounded
in count and time. The second model is a copy of the session's model under another version (same network,
so the gate lets it through; what is tested is the swap).
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.metrics_scrape import scrape_until, total
from tests.helpers import copy_as
from xray_ray.model_folder import registry
from xray_ray.model_folder.card import ModelCard
from xray_ray.processes import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

CLIENTS = 8
SWAPS = 5
LOOP_SECONDS = 240  # a bound on every client loop
APP, PREFIX = "xray-ray-registry", "/registry"


class VersionedLoad:
    """`clients` threads POSTing /predict in a loop; each keeps its own list of (sent, answered, status, version)."""

    def __init__(self, url: str, image: bytes, clients: int = CLIENTS) -> None:
        self.url, self.image = url, image
        self.results: list[list[tuple]] = [[] for _ in range(clients)]
        self.done = threading.Event()
        self.threads = [threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(clients)]
        for thread in self.threads:
            thread.start()

    def _loop(self, client: int) -> None:
        deadline = time.monotonic() + LOOP_SECONDS
        with httpx.Client(timeout=60) as http:
            while not self.done.is_set() and time.monotonic() < deadline:
                sent = time.monotonic()
                try:
                    answer = http.post(f"{self.url}/predict", content=self.image, headers={"Content-Type": "image/png"})
                    status = answer.status_code
                    version = answer.json().get("model_version") if status == 200 else answer.text[:200]
                except httpx.TransportError as err:
                    status, version = type(err).__name__, None
                self.results[client].append((sent, time.monotonic(), status, version))

    def all(self) -> list[tuple]:
        return [result for client in self.results for result in list(client)]

    def first_answer_from(self, version: str, after: float) -> float | None:
        """When the first answer from `version` to a request sent after `after` came back (None: not yet)."""
        times = [answered for sent, answered, status, got in self.all() if got == version and sent >= after]
        return min(times) if times else None

    def stop(self) -> list[list[tuple]]:
        self.done.set()
        for thread in self.threads:
            thread.join(timeout=90)
        return self.results


def wait_until(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (found := check()):
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.1)
    return found


@pytest.fixture(scope="module")
def followed(ray_local, compact_model, phantom_root, tmp_path_factory):
    """A registry with the session's model current, a second version of it ready, and the app following it."""
    from ray import serve

    from xray_ray.config_services import ServeConfig
    from xray_ray.serving import app as serving
    from xray_ray.serving.settings import checked_model

    folder = tmp_path_factory.mktemp("registry")
    reg = folder / "reg"
    registry.promote(reg, compact_model[0], reason="first")
    second = copy_as(compact_model[0], folder / "second", f"{compact_model[2]['version']}-b")
    settings = checked_model(ServeConfig(registry=str(reg), registry_poll_s=0.5, num_cpus=0.5, max_batch_size=8,
                                         batch_wait_timeout_s=0.02))
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(serving.build_app(settings), name=APP, route_prefix=PREFIX)
    image = next((phantom_root / "Normal" / "images").glob("*.png")).read_bytes()
    yield {"url": f"http://127.0.0.1:{port}{PREFIX}", "registry": reg, "second": second, "image": image}
    serve.shutdown()


def attempt_at(url: str, version: str) -> dict | None:
    """/model's last reload when it was the attempt to load `version`, else None."""
    last = httpx.get(f"{url}/model", timeout=30).json()["registry"]["last_reload"]
    return last if last and last["version"] == version else None


def assert_no_flip_back(results: list[list[tuple]], sequence: list[str]) -> None:
    """Every answer 200, and each client saw the versions in the order they were made current, never back."""
    for client in results:
        assert client, "a client got no answer"
        assert {status for _, _, status, _ in client} == {200}, [r for r in client if r[2] != 200][:3]
        runs = [version for i, (_, _, _, version) in enumerate(client) if i == 0 or client[i - 1][3] != version]
        position = sequence.index(runs[0])
        assert runs == sequence[position:position + len(runs)], (runs, sequence)


def test_promotions_and_rollbacks_under_load_fail_no_request(followed, compact_model):
    first, second = compact_model[2]["version"], ModelCard.read(followed["second"]).version
    load = VersionedLoad(followed["url"], followed["image"])
    sequence, cut_overs = [first], []
    try:
        wait_until(lambda: load.first_answer_from(first, 0), 120, "first answer")
        for swap in range(SWAPS):
            if swap % 2 == 0:
                target = registry.promote(followed["registry"], followed["second"], reason=f"swap {swap}")["to"]
            else:
                target = registry.rollback(followed["registry"], reason=f"swap {swap}")["to"]
            moved = time.monotonic()
            answered = wait_until(lambda: load.first_answer_from(target, moved), 60, f"answer from {target}")
            cut_overs.append(answered - moved)
            sequence.append(target)
            time.sleep(1.0)  # load on the new model before the next swap
            late = [r for r in load.all() if r[0] >= answered and r[3] != target]
            assert not late, f"sent after the cut-over to {target}, answered by another version: {late[:3]}"
    finally:
        results = load.stop()
    assert_no_flip_back(results, sequence)
    answers = sum(len(client) for client in results)
    print(f"\n{answers} answers, 0 failed, {SWAPS} swaps; pointer move to first new answer: "
          f"{min(cut_overs):.2f}-{max(cut_overs):.2f} s (poll every 0.5 s)")
    assert sequence[-1] == second


def test_a_model_that_fails_its_checks_under_load_leaves_the_old_one_answering(followed, compact_model):
    from xray_ray.ray_runtime import metrics_url

    reg, url = followed["registry"], followed["url"]
    serving_now = registry.current_version(reg)
    truncated = copy_as(compact_model[0], reg.parent / "truncated", "truncated")
    onnx = truncated / "model.onnx"
    onnx.write_bytes(onnx.read_bytes()[: onnx.stat().st_size // 2])
    # A bad model cannot pass the gate, even forced; one copied in by hand and pointed at is refused by Serve.
    bad = copy_as(compact_model[0], reg / registry.MODELS_FOLDER / "bad-golden", "bad-golden")
    card = ModelCard.read(bad)
    card.data["golden"]["images"][0]["probabilities"] = [0.97, 0.01, 0.01, 0.01]
    card.write()
    pointer = (reg / registry.CURRENT_FILE).read_text()
    load = VersionedLoad(url, followed["image"])
    try:
        wait_until(lambda: load.first_answer_from(serving_now, 0), 60, "an answer")
        with pytest.raises(registry.PromotionRefused):
            registry.promote(reg, truncated, force=True)
        (reg / registry.CURRENT_FILE).write_text(json.dumps({"version": "bad-golden", "folder": "models/bad-golden"}))
        reload = wait_until(lambda: attempt_at(url, "bad-golden"), 60, "a reload attempt")
        time.sleep(2.0)
    finally:
        results = load.stop()
        (reg / registry.CURRENT_FILE).write_text(pointer)
    assert {status for client in results for _, _, status, _ in client} == {200}
    assert {version for client in results for _, _, _, version in client} == {serving_now}
    assert reload["version"] == "bad-golden" and reload["outcome"] == "failed"
    assert "golden image" in reload["error"], reload
    assert httpx.get(f"{url}/model", timeout=30).json()["card"]["version"] == serving_now
    found = scrape_until(metrics_url(), lambda found: total(found, "ray_xray_serve_model_reloads_total",
                                                            outcome="failed", application=APP) >= 1)
    assert total(found, "ray_xray_serve_model_reloads_total", outcome="failed", application=APP) >= 1
    shutil.rmtree(bad)
