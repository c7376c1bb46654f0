"""The one Ray session every command enters, and a local head of our own.

`ray_session` is the only way into Ray: it joins `address` (or RAY_ADDRESS), or starts a
local Ray that keeps Ray's token authentication on, with a fresh random token in a file
only this user can read (mode 0600 in a 0700 folder, removed on exit), and binds every
listener to 127.0.0.1 (xray_ray.loopback). Within the session SIGTERM interrupts as Ctrl-C
does, and on the way out the Ray it started is shut down. Library code never starts Ray:
it calls `require_ray`, which fails with a clear error outside a session, and Ray's own
auto-start (Ray Data or Tune called with no Ray) is switched off when this module is
imported, which `xray_ray/__init__.py` does first.

Joining a cluster follows Ray's own rules: RAY_AUTH_MODE=token and the cluster's token
from RAY_AUTH_TOKEN_PATH, RAY_AUTH_TOKEN or ~/.ray/auth_token. Nothing here turns
authentication off.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from xray_ray.loopback import LOOPBACK, MULTI_HOST_SWITCH, use_address
from xray_ray.processes import free_port, sigterm_as_interrupt, stop_process_group, stop_signals_ignored

TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"
TOKEN_FILE = "auth_token"
METRICS_PORT_ENV = "XRAY_RAY_METRICS_PORT"
"""A fixed metrics export port for a local Ray (for a Prometheus scrape config); a free one otherwise."""
AUTO_CONNECT_ENV = "RAY_ENABLE_AUTO_CONNECT"
"""Ray's switch for starting a default local Ray (token in ~/.ray, mode 0644) when an API is used without one."""

RAY_PROFILES = ("lean", "full")
LEAN_SYSTEM_CONFIG = {
    "enable_metrics_collection": False,  # no metrics from the raylet, GCS and workers (Serve's metrics need them)
    "task_events_report_interval_ms": 0,  # no task events sent to the GCS: what the dashboard's task list shows
    "event_stats": False,  # no timing of every event-loop handler in every Ray process
}
"""What a `lean` local Ray turns off: Ray's own bookkeeping that a batch job's output never reads (docs/scoring.md)."""

log = logging.getLogger(__name__)

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ[AUTO_CONNECT_ENV] = "0"  # read by Ray when imported: only ray_session connects

if "ray" not in sys.modules:  # in a Ray worker Ray is imported already and its node decided this
    use_address(None)


class NoRaySessionError(RuntimeError):
    """A function that needs Ray was called outside `ray_session`."""


def write_token_file(folder: Path) -> Path:
    """A new random token in `folder`/auth_token, created with mode 0600 (never readable by others)."""
    path = folder / TOKEN_FILE
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as sink:
        sink.write(secrets.token_hex(32))
    return path


def _private_token() -> Path:
    """A token for a Ray only this process starts: in a fresh 0700 folder, removed when the process exits
    (after Ray's own exit handler has stopped that Ray)."""
    folder = Path(tempfile.mkdtemp(prefix="xray-ray-auth-"))
    atexit.register(shutil.rmtree, folder, True)
    return write_token_file(folder)


def _check_local_start_is_safe() -> None:
    from ray._private import ray_constants  # Ray is imported by now (_connect)

    if ray_constants.ENABLE_RAY_CLUSTER:
        raise RuntimeError(
            "Ray was imported before xray_ray, so a local Ray would listen on every network interface; "
            f"import xray_ray first, or set {MULTI_HOST_SWITCH}=0 before importing Ray")
    if os.environ.get("RAY_AUTH_MODE", "token").lower() != "token":
        log.warning("RAY_AUTH_MODE=%s turns Ray's token authentication off: any local user can run code "
                    "in this Ray as you", os.environ["RAY_AUTH_MODE"])


_local_ray_started = False
_local_ray_lean = False


def started_local_ray() -> bool:
    """True when this process started its own local Ray (which ends with it); False when it joined one."""
    return _local_ray_started


def metrics_collected() -> bool:
    """False when this process started a lean local Ray, which records no metrics (its own or `ray.util.metrics`)."""
    return not (_local_ray_started and _local_ray_lean)


def _connect(num_cpus: int | None, address: str | None, log_to_driver: bool, temp_dir: str | None,
             profile: str) -> None:
    """Join `address` (else RAY_ADDRESS), else start a local Ray on loopback with token authentication
    (`temp_dir`: its session folder; `profile` lean: without LEAN_SYSTEM_CONFIG's services).

    `ray.init` installs a SIGTERM handler that aborts the process; the handler that was
    there before is put back, so the session's clean-up still runs on `kill`.
    """
    import ray  # heavy, and it must read the environment set above when first imported

    global _local_ray_started, _local_ray_lean
    on_sigterm = signal.getsignal(signal.SIGTERM)
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=log_to_driver)
    else:
        _check_local_start_is_safe()
        if not (os.environ.get(TOKEN_PATH_ENV) or os.environ.get("RAY_AUTH_TOKEN")):
            # Without this, Ray would write ~/.ray/auth_token with the umask's permissions.
            os.environ[TOKEN_PATH_ENV] = str(_private_token())
        # Ray turns token auth on for a new local Ray and says so; this module's docstring says it too.
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        metrics_port = int(os.environ[METRICS_PORT_ENV]) if os.environ.get(METRICS_PORT_ENV) else None
        ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address=LOOPBACK, _temp_dir=temp_dir,
                 log_to_driver=log_to_driver, _metrics_export_port=metrics_port,
                 _system_config=LEAN_SYSTEM_CONFIG if profile == "lean" else None)
        _local_ray_started, _local_ray_lean = True, profile == "lean"
    if on_sigterm is not None:
        signal.signal(signal.SIGTERM, on_sigterm)


def local_ray_stopping() -> bool:
    """True when this process started its Ray and one of that Ray's own processes (GCS, raylet, agents) has
    exited: it was told to stop too (systemd's control-group stop signals every process), so nothing in it
    can still answer, and waiting on it would only delay the stop. False for a joined cluster."""
    if not _local_ray_started:
        return False
    from ray._private import worker  # Ray's node object knows the processes it started (Ray is pinned)

    node = getattr(worker, "_global_node", None)
    return bool(node is not None and node.dead_processes())


def ray_connected() -> bool:
    """True when this process is connected to a Ray (a session's, or the Ray of the worker it runs in)."""
    ray = sys.modules.get("ray")  # never imported: never connected, and no reason to import it here
    return ray is not None and ray.is_initialized()


def require_ray(what: str) -> None:
    """Fail with NoRaySessionError unless Ray is connected: the check library code makes instead of starting one."""
    if not ray_connected():
        raise NoRaySessionError(
            f"{what} needs Ray, and no Ray session is open: call it inside xray_ray.ray_runtime.ray_session() "
            "(every xray-ray command opens one); library code never starts Ray")


@contextlib.contextmanager
def ray_session(address: str | None = None, *, head: LocalHead | None = None, num_cpus: int | None = None,
                log_to_driver: bool = True, temp_dir: str | None = None, profile: str = "full") -> Iterator[None]:
    """The one way a command gets Ray, around its whole run.

    It joins `address` (else RAY_ADDRESS), starts `head` and joins it, or else starts a local
    Ray of `num_cpus` CPUs (`temp_dir`: its session folder), with every Ray service (`profile`
    full) or without the bookkeeping a batch job never reads (lean: LEAN_SYSTEM_CONFIG; a Ray
    that is joined keeps its own). Within the block SIGTERM raises
    KeyboardInterrupt as Ctrl-C does; on the way out this process leaves Ray, a Ray it started
    is shut down and `head` is stopped, without a second signal cutting that short. Entered
    while already connected (the demo's stages, a test session's Ray), it uses that Ray and
    leaves it running: the outer session owns it.
    """
    global _local_ray_started
    if profile not in RAY_PROFILES:
        raise ValueError(f"Ray profile must be one of {', '.join(RAY_PROFILES)}, not {profile!r}")
    if ray_connected():
        if head is not None:
            raise RuntimeError("a Ray session is open already: a head cannot be started and joined inside it")
        yield
        return
    with sigterm_as_interrupt():
        try:
            if head is not None:
                head.start()
                os.environ.update(head.client_env())  # for this driver and the `ray job submit`s it runs
                address = head.gcs
            use_address(address)  # before Ray is imported
            _connect(num_cpus, address, log_to_driver, temp_dir, profile)
            yield
        finally:
            with stop_signals_ignored():
                if ray_connected():
                    sys.modules["ray"].shutdown()
                if head is not None:
                    head.stop()
                _local_ray_started = False


def metrics_url() -> str | None:
    """Where Prometheus scrapes this process's node: `http://<node address>:<metrics export port>/metrics`
    (loopback on a Ray started here; it needs no token, so it must never be exposed). None if unknown."""
    import ray  # connected by ray_session

    node_id = ray.get_runtime_context().get_node_id()
    for node in ray.nodes():
        if node.get("NodeID") == node_id and node.get("MetricsExportPort"):
            return f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    return None


@dataclass
class LocalHead:
    """A Ray head started as a user starts one (`ray start --head --block`), owned by this process.

    Free ports, its own temp dir, every listener on 127.0.0.1, token authentication with a
    token file (mode 0600) in that temp dir. `client_env()` is what a driver or
    `ray job submit` needs to reach it. `stop()` ends exactly the processes it started (its
    own process group), never another Ray on the machine, which `ray stop` would.
    """

    num_cpus: int = 2
    temp_dir: Path | None = None
    gcs: str = ""
    dashboard: str = ""
    token_file: Path | None = None
    process: subprocess.Popen | None = field(default=None, repr=False)

    def client_env(self) -> dict[str, str]:
        """Environment variables a client of this head needs: its token, and Ray's loopback mode."""
        return {"RAY_AUTH_MODE": "token", TOKEN_PATH_ENV: str(self.token_file), MULTI_HOST_SWITCH: "0"}

    def start(self, timeout: float = 180) -> LocalHead:
        # Ray's Unix socket paths must stay short, so the temp dir lives directly under /tmp (mode 0700).
        self.temp_dir = self.temp_dir or Path(tempfile.mkdtemp(prefix="xrh", dir="/tmp"))
        self.token_file = write_token_file(self.temp_dir)
        port, dashboard_port = free_port(), free_port()
        ray_cli = Path(sys.executable).with_name("ray")
        command = [str(ray_cli), "start", "--head", "--block", f"--node-ip-address={LOOPBACK}", f"--port={port}",
                   f"--dashboard-host={LOOPBACK}", f"--dashboard-port={dashboard_port}",
                   f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
                   f"--temp-dir={self.temp_dir}", "--disable-usage-stats", f"--num-cpus={self.num_cpus}",
                   "--num-gpus=0", "--include-dashboard=true"]
        env = {key: value for key, value in os.environ.items() if key not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
        env.update(self.client_env())
        # Jobs submitted here run `python ...`: this interpreter's, with this project installed.
        env["PATH"] = os.pathsep.join([str(ray_cli.parent), env.get("PATH", "")])
        log_file = open(self.temp_dir / "head.log", "w")
        self.process = subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        self.gcs, self.dashboard = f"{LOOPBACK}:{port}", f"http://{LOOPBACK}:{dashboard_port}"
        deadline = time.monotonic() + timeout
        while not self._ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the Ray head did not start; see {self.temp_dir / 'head.log'}")
            time.sleep(0.5)
        return self

    def _ready(self) -> bool:
        request = urllib.request.Request(f"{self.dashboard}/api/version",
                                         headers={"Authorization": f"Bearer {self.token_file.read_text()}"})
        try:
            with urllib.request.urlopen(request, timeout=5) as answer:
                return answer.status == 200
        except OSError:
            return False

    def stop(self, grace: float = 5) -> None:
        """SIGTERM the head, then SIGKILL whatever of its process group is left."""
        if self.process is not None:
            stop_process_group(self.process, grace)
            self.process = None

    def __enter__(self) -> LocalHead:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
