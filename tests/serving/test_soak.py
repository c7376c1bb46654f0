"""The soak, 2 minutes of it: 16 clients paced at half the measured capacity, 5 % poison uploads, never a 5xx.

The same code as benchmarks/bench_soak.py (tests/serving/load.py's `soak`), against the app on the
session's Ray over real HTTP on loopback; every request is bounded in time. Behaviour only: every
poison upload gets its own 4xx and reason code, every good one 200, nothing answers 5xx. Latency
and memory over time are the benchmark's figures, not this test's.
"""

from __future__ import annotations

import os
from collections import Counter

import pytest

from tests.serving.load import POISON, PROXY_TITLE, Uploads, phantom_uploads, replica_title, soak, titled
from xray_ray.processes import free_port, process_tree

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

APP = "xray-ray-soak"
CLIENTS = 16
SECONDS = 120
POISON_EVERY = 20  # 5 %


def test_two_minutes_at_half_capacity_with_poison_answers_each_upload_as_it_deserves(ray_local, compact_model,
                                                                                   phantom_root):
    from ray import serve

    from xray_ray.config_services import ServeConfig
    from xray_ray.serving import app as serving
    from xray_ray.serving.settings import checked_model

    settings = checked_model(ServeConfig(model=str(compact_model[0]), num_cpus=0.5))
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(serving.build_app(settings), name=APP, route_prefix="/soak")

    def processes() -> dict[str, int]:
        pids = process_tree(os.getpid())
        return {"replica": titled(pids, replica_title(APP))[0], "proxy": titled(pids, PROXY_TITLE)[0]}

    try:
        soaked = soak(f"http://127.0.0.1:{port}/soak", Uploads(phantom_uploads(phantom_root), POISON_EVERY), CLIENTS,
                      SECONDS, 0.5, processes, capacity_s=10)
    finally:
        serve.shutdown()  # the next module starts Serve on a port of its own
    poison = [a for a in soaked.answers if a.poison is not None]
    good = [a for a in soaked.answers if a.poison is None]
    print(f"\ncapacity {soaked.capacity_rps:.1f} req/s, paced at {soaked.rate_rps:.1f}: "
          f"{dict(Counter(str(a.status) for a in soaked.answers))}")
    assert not [a for a in soaked.answers if a.server_error], Counter(a.status for a in soaked.answers)
    assert {a.poison for a in poison} == set(POISON), "every kind of poison was sent"
    wrong = [(a.poison, a.status, a.error) for a in poison if (a.status, a.error) != POISON[a.poison]]
    assert not wrong, wrong
    assert good and all(a.status == 200 for a in good), Counter(a.status for a in good)
    assert all(sample["replica"]["rss_mb"] and sample["proxy"]["open_files"] for _, sample in soaked.samples)
