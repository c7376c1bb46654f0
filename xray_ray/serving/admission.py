"""Which requests a replica takes on: a bounded queue, a bounded wait, and draining before a stop.

A replica works on one batch at a time and lets `max_queued_requests` more wait for the
model; past that a request is shed at once with 503 `overloaded` and a Retry-After, rather
than queued without bound (Triton's queue policy). A request that was taken on but has
waited `max_queue_wait_s` for the model is answered 503 `overloaded` too, so an accepted
request's latency is bounded. When the service is told to stop, the replica drains: it
answers every request it has taken on and refuses new ones with 503 `draining` and a
Retry-After, which a client retries against the service once it is back (or another
replica). Every refusal is an `ApiError`, counted by reason in the replica's metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Iterator
from typing import TypeVar

from xray_ray.serving.http import ApiError

T = TypeVar("T")

DRAIN_POLL_S = 0.05


class Admission:
    """The requests one replica holds: at most `capacity` at once, each waiting at most `wait_s` for the model."""

    def __init__(self, capacity: int, wait_s: float, retry_after_s: int) -> None:
        self.capacity, self.wait_s, self.retry_after_s = capacity, wait_s, retry_after_s
        self.held = 0
        self.draining = False

    def _refuse(self, error: str, reason: str) -> ApiError:
        return ApiError(503, error, reason, headers={"Retry-After": str(self.retry_after_s)})

    @contextlib.contextmanager
    def admit(self) -> Iterator[float]:
        """Hold one place for the block, or refuse at once (503): draining, or every place taken.
        Yields the monotonic deadline by which the request must have its answer."""
        if self.draining:
            raise self._refuse("draining", "the service is stopping; retry in a moment")
        if self.held >= self.capacity:
            raise self._refuse("overloaded", f"the replica holds as many requests as it may ({self.capacity}); "
                                             "retry in a moment")
        self.held += 1
        try:
            yield time.monotonic() + self.wait_s
        finally:
            self.held -= 1

    async def within(self, deadline: float, waiting: Awaitable[T]) -> T:
        """`waiting`'s result, or 503 `overloaded` once `deadline` has passed (the request is given up)."""
        try:
            return await asyncio.wait_for(waiting, timeout=max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            raise self._refuse("overloaded", f"no answer within {self.wait_s:g} s of waiting for the model; "
                                             "retry in a moment") from None

    async def drain(self, timeout_s: float) -> int:
        """Refuse new requests from now on and wait up to `timeout_s` for the held ones to be answered;
        returns how many were still held at the end (0: fully drained)."""
        self.draining = True
        deadline = time.monotonic() + timeout_s
        while self.held and time.monotonic() < deadline:
            await asyncio.sleep(DRAIN_POLL_S)
        return self.held

