"""A replica's death under load loses at most what that replica held: 2 replicas, 8 clients, one SIGKILLed.

Serve does not retry a request that was running on a replica that died, so those fail; every
other request is answered (a new one Serve routed to the dead replica before it knew is routed
again), the full count is back within the issue's 30 s, and everything after that is answered
200. Then the retrying client of docs/serving.md, copied as a user would, goes through a second
kill with no request lost. Real Serve on the session's Ray, real HTTP on loopback; every request
is bounded in time. The figures (how many, how long) are the benchmark's: benchmarks/bench_replica_death.py.
"""

from __future__ import annotations

import re
import threading
from collections import Counter

import pytest

from tests.helpers import REPO
from tests.serving.load import (
    Uploads,
    kill_one_replica,
    phantom_uploads,
    replica_death,
    replica_title,
    running_replicas,
    titled,
    wait_until,
)
from xray_ray.model_folder.card import ModelCard
from xray_ray.processes import free_port, process_tree

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

APP = "xray-ray-death"
CLIENTS = 8
REPLICAS = 2
RECOVERY_S = 30  # the goal, a bound here: the benchmark measures it


def test_sigkill_of_one_of_two_replicas_fails_at_most_its_own_requests_and_the_count_comes_back(
        ray_local, compact_model, phantom_root):
    import os

    from ray import serve

    from xray_ray.config_services import ServeConfig
    from xray_ray.serving import app as serving
    from xray_ray.serving.settings import checked_model

    settings = checked_model(ServeConfig(model=str(compact_model[0]), num_replicas=REPLICAS, num_cpus=0.5,
                                         max_batch_size=4))
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(serving.build_app(settings), name=APP, route_prefix="/death")
    try:
        def replica_pids() -> list[int]:
            return titled(process_tree(os.getpid()), replica_title(APP))

        def running() -> int:
            return running_replicas(APP)

        wait_until(lambda: len(replica_pids()) == REPLICAS and running() == REPLICAS, 120, "both replicas running")
        url, images = f"http://127.0.0.1:{port}/death", phantom_uploads(phantom_root)
        death = replica_death(url, Uploads(images), CLIENTS, replica_pids, running, REPLICAS, after_s=3,
                              timeout=RECOVERY_S)
        retried = documented_client_through_a_death(url, images, replica_pids, running)
    finally:
        serve.shutdown()  # the next module starts Serve on a port of its own
    failed, after = death.failed(), death.after_recovery()
    how = Counter(str(answer.status) for answer in failed)
    print(f"\n{len(death.answers)} requests; {len(death.in_flight())} in flight at the kill, {dict(how) or 0} failed; "
          f"replacement started after {death.replaced_s:.1f} s, {REPLICAS} running after {death.recovered_s:.1f} s")
    # what one replica can hold from these clients: each has one request at a time, and a replica holds settings.holds
    assert len(failed) <= min(CLIENTS, settings.holds), how
    assert all(answer.started <= death.killed_at for answer in failed), "a request sent after the kill failed"
    assert after and all(answer.status == 200 for answer in after), Counter(answer.status for answer in after)
    assert not retried["failed"], retried["failed"]  # the docs' client retried what the death failed
    assert retried["answered"] >= 3 * CLIENTS and retried["versions"] == {ModelCard.read(compact_model[0]).version}


def documented_client():
    """The retrying client of docs/serving.md, run as a user would copy it."""
    text = (REPO / "docs" / "serving.md").read_text()
    block = next(code for code in re.findall(r"```python\n(.*?)```", text, re.S) if "RETRY" in code)
    namespace: dict = {}
    exec(compile(block, "docs/serving.md", "exec"), namespace)
    return namespace["predict"]


def documented_client_through_a_death(url: str, images: list[bytes], replica_pids, running) -> dict:
    """CLIENTS threads calling the docs' `predict` in a loop while one replica is SIGKILLed: what each got."""
    predict, stop, lock = documented_client(), threading.Event(), threading.Lock()
    got: dict = {"answered": 0, "failed": [], "versions": set()}

    def loop(k: int) -> None:
        while not stop.is_set():
            try:
                answer = predict(url, images[k % len(images)])
            except Exception as err:  # noqa: BLE001 - recorded, asserted on by the test
                with lock:
                    got["failed"].append(repr(err))
                continue
            with lock:
                got["answered"] += 1
                got["versions"].add(answer["model_version"])

    threads = [threading.Thread(target=loop, args=(k,), daemon=True) for k in range(CLIENTS)]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: got["answered"] >= CLIENTS, 60, "answers before the second kill")
        kill_one_replica(replica_pids, running, REPLICAS, RECOVERY_S)
        wait_until(lambda: got["answered"] >= 3 * CLIENTS, 60, "answers after the second kill")
    finally:
        stop.set()
        for thread in threads:
            thread.join(90)
    return got
