"""How `xray-ray serve` runs until stopped, and drains on the way out.

On SIGTERM or Ctrl-C every replica is told to drain in place (`reconfigure`: new requests get
503 `draining`, accepted ones are answered), bounded by the graceful timeout plus a margin; when
Ray's own processes were signalled too, nothing is left to drain and the stop goes on at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from ray import serve

from xray_ray.config import SERVE_APP_NAME
from xray_ray.config_services import ServeConfig
from xray_ray.processes import stop_signals_ignored
from xray_ray.ray_runtime import local_ray_stopping, started_local_ray
from xray_ray.serving.app import build_app, start

log = logging.getLogger(__name__)

DRAIN_MARGIN_S = 3.0
"""Beyond the graceful timeout, how long a stop waits for Serve to report the replicas drained."""
DRAIN_POLL_S = 0.2
"""How often a draining stop checks whether Ray itself is stopping too."""


def _update_in_place(client, built) -> None:
    """The drain's update, on its own thread: deploy `built` through `client` and wait until every replica has
    applied it; when Ray goes away under it, the stop goes on."""
    try:
        client.deploy_applications([built], wait_for_ingress_deployment_creation=True,
                                   wait_for_applications_running=True)
    except Exception as err:  # noqa: BLE001 - Ray stopped under the update: nothing is left to drain
        log.info("the drain's update ended early: %s", err)


def drain(settings: ServeConfig, name: str = SERVE_APP_NAME, route_prefix: str = "/") -> None:
    """Before a stop: every replica refuses new requests (503 `draining`) and answers those it accepted.

    An in-place update of the app's user_config (`reconfigure`, no restart), which Serve applies
    to each replica and reports done once every replica has drained; bounded by the graceful
    timeout plus a margin, so a stuck update cannot hold the stop."""
    log.info("stopping: answering the requests already accepted (at most %g s), refusing new ones",
             settings.graceful_shutdown_timeout_s)
    if local_ray_stopping():  # Ray itself was signalled too: nothing is left to drain
        log.info("Ray is stopping as well: no drain")
        return
    import ray
    from ray.serve._private.build_app import build_app as build_serve_app  # Ray is pinned
    from ray.serve.context import _get_global_client

    # Built and connected here; the thread only sends the update through this client, whose calls fail once Ray
    # is gone. (serve.run on the thread would start a new local Ray, with its dashboard and a token in ~/.ray, if
    # it found this one shut down by then.)
    built = build_serve_app(build_app(settings, draining=True), name=name, route_prefix=route_prefix,
                            default_runtime_env=ray.get_runtime_context().runtime_env)
    update = threading.Thread(target=_update_in_place, args=(_get_global_client(), built), daemon=True)
    update.start()
    deadline = time.monotonic() + settings.graceful_shutdown_timeout_s + DRAIN_MARGIN_S
    while update.is_alive() and time.monotonic() < deadline and not local_ray_stopping():
        update.join(DRAIN_POLL_S)


def serve_until_stopped(settings: ServeConfig, started: Callable[[], None]) -> None:
    """`xray-ray serve`, inside its Ray session: deploy, call `started`, then serve until Ctrl-C or SIGTERM
    (which the session turns into KeyboardInterrupt).

    On the way out a Ray the session started goes with everything in it when the session ends
    (Serve's controller, proxy and replicas: asking a controller that may already have received
    the same signal to delete the app first could wait forever); on a cluster the app is
    deleted here and the cluster keeps running.
    """
    try:
        start(settings)
        started()
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        drain(settings)
    finally:
        if not started_local_ray():
            with stop_signals_ignored():
                serve.delete(SERVE_APP_NAME)
