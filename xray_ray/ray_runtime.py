"""Connecting to Ray: the cluster named by RAY_ADDRESS, a running local one, or a new local one.

Local first: a Ray started here binds its dashboard to 127.0.0.1 and sends no usage
statistics, so nothing listens on a hospital network unless a cluster is configured.
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Without an explicit mode, Ray turns token authentication on once ~/.ray/auth_token exists,
# and `ray job submit` then fails; a cluster that wants tokens sets RAY_AUTH_MODE=token.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def ensure_ray(num_cpus: int | None = None) -> None:
    """Connect to (or start) Ray once per process; later calls do nothing."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    ray.init(num_cpus=num_cpus, dashboard_host="127.0.0.1", include_dashboard=False, log_to_driver=True)
