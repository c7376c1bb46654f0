"""How many scoring actors, with what, on this cluster: sized from what Ray has, refused when it cannot progress.

Actors that hold every CPU starve the read tasks, and Ray Data then waits forever
("backpressured") without an error. So a plan always leaves room for one read task, and a
request that cannot make progress is refused before anything starts, with the resources
it would need. With no overrides the pool autoscales from one actor up to what fits:
one GPU per actor where there are GPUs; on CPUs, small machines get one actor with every
core but the read task's share, larger ones two-CPU actors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SMALL_MACHINE_CPUS = 4
"""Up to this many CPUs, one actor gets them all but the read share (two-CPU actors would be one actor anyway)."""
CPUS_PER_ACTOR_ON_LARGE = 2.0
CPUS_PER_GPU_ACTOR = 1.0


class PoolRefused(ValueError):
    """A pool that could never make progress on this cluster; the message names what it would need."""


@dataclass(frozen=True)
class PoolPlan:
    """The actor pool: size range and per-actor resources, and the CPUs each read task reserves."""

    min_actors: int
    max_actors: int
    cpus_per_actor: float
    gpus_per_actor: float
    read_cpus: float

    def describe(self) -> str:
        size = str(self.max_actors) if self.min_actors == self.max_actors else f"{self.min_actors}-{self.max_actors}"
        gpus = f", {self.gpus_per_actor:g} GPU" if self.gpus_per_actor else ""
        return f"{size} actor(s) with {self.cpus_per_actor:g} CPU{gpus} each; {self.read_cpus:g} CPU per read task"


def plan_pool(cpus: float, gpus: float, read_cpus: float, actors: int = 0, cpus_per_actor: float = 0.0,
              gpus_per_actor: float | None = None) -> PoolPlan:
    """The pool for a cluster with `cpus` and `gpus` in total; 0 / None arguments mean "choose from the cluster".

    Raises PoolRefused when the request (or the cluster) leaves no CPU for reading, asks for
    more GPUs than there are, or cannot fit even one actor.
    """
    room = cpus - read_cpus  # CPUs the actors may hold while one read task runs
    if room <= 0:
        raise PoolRefused(f"a read task reserves {read_cpus:g} CPU of the cluster's {cpus:g}: none is left for the "
                          "model; lower --read-cpus")
    gpu_each = (1.0 if gpus >= 1 else 0.0) if gpus_per_actor is None else gpus_per_actor
    if gpu_each > gpus:
        raise PoolRefused(f"each actor asks for {gpu_each:g} GPU but the cluster has {gpus:g}")
    if cpus_per_actor:
        cpu_each = cpus_per_actor
    elif gpu_each:
        cpu_each = min(CPUS_PER_GPU_ACTOR, room)
    elif cpus <= SMALL_MACHINE_CPUS:
        cpu_each = room
    else:
        cpu_each = CPUS_PER_ACTOR_ON_LARGE
    fits = min(math.floor(room / cpu_each + 1e-9), math.floor(gpus / gpu_each + 1e-9) if gpu_each else 10**6)
    if actors:
        if actors > fits:
            needed = f"{actors * cpu_each + read_cpus:g} CPU" + (f" and {actors * gpu_each:g} GPU" if gpu_each else "")
            raise PoolRefused(
                f"{actors} actor(s) with {cpu_each:g} CPU{f' and {gpu_each:g} GPU' if gpu_each else ''} each, plus "
                f"{read_cpus:g} CPU for reading, need {needed}; the cluster has {cpus:g} CPU and {gpus:g} GPU. "
                f"At most {fits} such actor(s) fit: lower --actors or --cpus-per-actor")
        return PoolPlan(actors, actors, cpu_each, gpu_each, read_cpus)
    if fits < 1:
        raise PoolRefused(f"one actor with {cpu_each:g} CPU and {read_cpus:g} CPU for reading need "
                          f"{cpu_each + read_cpus:g} CPU; the cluster has {cpus:g}: lower --cpus-per-actor")
    return PoolPlan(1, fits, cpu_each, gpu_each, read_cpus)


def cluster_totals() -> tuple[float, float]:
    """(CPUs, GPUs) of the connected Ray cluster."""
    import ray  # the caller has connected; imported here so planning stays importable without Ray

    resources = ray.cluster_resources()
    return float(resources.get("CPU", 0.0)), float(resources.get("GPU", 0.0))
