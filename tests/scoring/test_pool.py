"""Sizing the scoring actor pool from the cluster, and refusing pools that could never make progress."""

from __future__ import annotations

import pytest

from xray_ray.scoring.pool import PoolPlan, PoolRefused, plan_pool


@pytest.mark.parametrize(("cpus", "gpus", "expected"), [
    (2, 0, PoolPlan(1, 1, 1.5, 0.0, 0.5)),  # a small machine: one actor with all but the read task's share
    (4, 0, PoolPlan(1, 1, 3.5, 0.0, 0.5)),
    (16, 0, PoolPlan(1, 7, 2.0, 0.0, 0.5)),  # two-CPU actors, autoscaling up to what leaves a read task room
    (16, 4, PoolPlan(1, 4, 1.0, 1.0, 0.5)),  # one GPU per actor
    (2, 1, PoolPlan(1, 1, 1.0, 1.0, 0.5)),
])
def test_default_pool_follows_the_cluster(cpus, gpus, expected):
    assert plan_pool(cpus, gpus, read_cpus=0.5) == expected


@pytest.mark.parametrize(("cpus", "gpus", "request_", "expected"), [
    (2, 0, {"actors": 1, "cpus_per_actor": 1.0}, PoolPlan(1, 1, 1.0, 0.0, 0.5)),
    (8, 0, {"actors": 3}, PoolPlan(3, 3, 2.0, 0.0, 0.5)),
    (8, 0, {"cpus_per_actor": 1.0}, PoolPlan(1, 7, 1.0, 0.0, 0.5)),
    (8, 2, {"gpus_per_actor": 0.5}, PoolPlan(1, 4, 1.0, 0.5, 0.5)),  # fractions share a GPU
    (8, 2, {"gpus_per_actor": 0.0}, PoolPlan(1, 3, 2.0, 0.0, 0.5)),  # GPUs declined: CPU actors
])
def test_overrides_are_kept_when_they_fit(cpus, gpus, request_, expected):
    assert plan_pool(cpus, gpus, read_cpus=0.5, **request_) == expected


@pytest.mark.parametrize(("cpus", "gpus", "read_cpus", "request_", "message"), [
    (2, 0, 0.5, {"actors": 2, "cpus_per_actor": 1.0}, "need 2.5 CPU; the cluster has 2 CPU"),  # the measured hang
    (2, 0, 0.5, {"actors": 2}, "At most 1 such actor(s) fit"),
    (2, 0, 0.5, {"cpus_per_actor": 2.0}, "need 2.5 CPU; the cluster has 2"),
    (4, 0, 0.5, {"gpus_per_actor": 1.0}, "asks for 1 GPU but the cluster has 0"),
    (4, 2, 0.5, {"actors": 3, "gpus_per_actor": 1.0}, "and 3 GPU"),
    (2, 0, 2.0, {}, "none is left for the model"),
])
def test_pools_that_cannot_progress_are_refused_with_what_they_need(cpus, gpus, read_cpus, request_, message):
    with pytest.raises(PoolRefused, match=message.replace("(", r"\(").replace(")", r"\)")):
        plan_pool(cpus, gpus, read_cpus=read_cpus, **request_)
