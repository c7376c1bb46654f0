"""Under load and on a stop, nothing accepted is lost: a stop drains (accepted requests answered, new ones 503
`draining`), and overload is shed at once with 503 `overloaded` and a Retry-After instead of an unbounded queue.

Real Serve, real HTTP on loopback; every client loop is bounded in count and time.
"""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from tests.running import Command, user_env
from xray_ray.processes import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

CLIENTS = 16  # four batches' worth at max_batch_size 4: a queue, so a race with the stop cannot pass
LOOP_SECONDS = 120  # a bound on every client loop


def png_of(phantom_root: Path) -> bytes:
    return next((phantom_root / "Normal" / "images").glob("*.png")).read_bytes()


class Load:
    """`clients` threads POSTing one image to /predict in a loop until `stop()` or LOOP_SECONDS; each result is
    (start time, status code or exception name, error code, Retry-After)."""

    def __init__(self, url: str, image: bytes, clients: int) -> None:
        self.url, self.image, self.results, self.lock = url, image, [], threading.Lock()
        self.done = threading.Event()
        self.threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(clients)]
        for thread in self.threads:
            thread.start()

    def _loop(self) -> None:
        deadline = time.monotonic() + LOOP_SECONDS
        with httpx.Client(timeout=60) as client:
            while not self.done.is_set() and time.monotonic() < deadline:
                started = time.monotonic()
                try:
                    answer = client.post(f"{self.url}/predict", content=self.image,
                                         headers={"Content-Type": "image/png"})
                    error = answer.json().get("error") if answer.status_code != 200 else None
                    result = (started, answer.status_code, error, answer.headers.get("retry-after"))
                except httpx.TransportError as err:
                    result = (started, type(err).__name__, None, None)
                    time.sleep(0.05)  # the server is gone: a client backs off
                with self.lock:
                    self.results.append(result)

    def answered(self) -> int:
        with self.lock:
            return sum(1 for result in self.results if result[1] == 200)

    def stop(self) -> list[tuple]:
        self.done.set()
        for thread in self.threads:
            thread.join(90)
        return self.results


def wait_until(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.2)


def test_sigterm_under_load_answers_every_accepted_request_and_refuses_new_ones_with_503(compact_model, phantom_root,
                                                                                        tmp_path):
    port, home = free_port(), tmp_path / "home"
    home.mkdir()
    grace = 10
    server = Command(["serve", "--model", str(compact_model[0]), "--port", str(port), "--num-cpus", "0.5",
                      "--max-batch-size", "4", "--graceful-shutdown-timeout-s", str(grace)],
                     tmp_path / "serve.log", tmp_path, env=user_env(HOME=str(home)))
    url = f"http://127.0.0.1:{port}"
    try:
        server.wait_for(lambda: _healthy(url), 240, "a healthy replica")
        load = Load(url, png_of(phantom_root), CLIENTS)
        wait_until(lambda: load.answered() >= 3 * CLIENTS, 120, "answers under load")
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)  # the command alone, as systemd's KillMode=mixed does
        server.process.wait(grace + 5 + 20)
        exited = time.monotonic() - signalled
        results = load.stop()
    finally:
        server.kill()
    assert server.process.returncode == 0, server.output()[-3000:]
    assert exited <= grace + 5 + 5, f"the stop took {exited:.1f} s"
    before = Counter(status for started, status, _, _ in results if started < signalled)
    assert set(before) == {200}, f"requests sent before the signal were not all answered: {before}"
    refused = [(error, retry) for started, status, error, retry in results if started >= signalled and status == 503]
    assert all(error == "draining" and retry for error, retry in refused), refused
    after = Counter(status for started, status, _, _ in results if started >= signalled)
    assert not set(after) - {200, 503, "ConnectError", "ReadError", "RemoteProtocolError"}, after
    print(f"\nstopped in {exited:.1f} s; before the signal {dict(before)}; after {dict(after)}")


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


def test_overload_is_shed_with_503_overloaded_and_retry_after_and_the_service_recovers(ray_local, compact_model,
                                                                                    phantom_root):
    """40 clients against a replica that holds 4 + 4: the excess is refused at once (JSON 503 `overloaded`, a
    Retry-After), nothing answers 500, accepted requests are answered, and once the load stops all is well."""
    from ray import serve

    from xray_ray.config_services import ServeConfig
    from xray_ray.serving import app as serving
    from xray_ray.serving.settings import checked_model

    settings = checked_model(ServeConfig(model=str(compact_model[0]), num_cpus=0.5, max_batch_size=4,
                                         max_queued_requests=4, max_queue_wait_s=5, retry_after_s=2))
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(serving.build_app(settings), name="xray-ray-overload", route_prefix="/overload")
    url = f"http://127.0.0.1:{port}/overload"
    try:
        load = Load(url, png_of(phantom_root), 40)
        wait_until(lambda: load.answered() >= 40, 120, "answers under overload")
        time.sleep(5)
        results = load.stop()
        statuses = Counter(status for _, status, _, _ in results)
        refusals = {(error, retry) for _, status, error, retry in results if status == 503}
        assert statuses[200] >= 40 and statuses[503] > 0, statuses
        assert set(statuses) <= {200, 503}, statuses  # no 500, no transport error: shed, never dropped
        assert refusals == {("overloaded", "2")}, refusals
        image = png_of(phantom_root)
        after = [httpx.post(f"{url}/predict", content=image, headers={"Content-Type": "image/png"}, timeout=60)
                 for _ in range(5)]
        assert [answer.status_code for answer in after] == [200] * 5
        print(f"\n40 clients on a replica holding 8: {dict(statuses)}")
    finally:
        serve.shutdown()  # the next module starts Serve on a port of its own
