"""Connecting to Ray: the cluster named by RAY_ADDRESS, or a new local one; or a local head of our own.

Local first: a Ray started here binds its dashboard to 127.0.0.1 and sends no usage
statistics, so nothing listens on a hospital network unless a cluster is configured.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from xray_ray.processes import free_port, stop_process_group

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Without an explicit mode, Ray turns token authentication on once ~/.ray/auth_token exists,
# and `ray job submit` then fails; a cluster that wants tokens sets RAY_AUTH_MODE=token.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def ensure_ray(num_cpus: int | None = None, address: str | None = None, log_to_driver: bool = True) -> None:
    """Connect to Ray once per process, the one way every command does: `address`, else RAY_ADDRESS,
    else a new local Ray on this machine. Later calls do nothing.

    `ray.init` installs a SIGTERM handler that aborts the process; the handler that was
    there before is put back, so a command's own clean-up still runs on `kill`.
    """
    import ray  # heavy, and it reads the environment set above when first imported

    if ray.is_initialized():
        return
    on_sigterm = signal.getsignal(signal.SIGTERM)
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=log_to_driver)
    else:
        ray.init(num_cpus=num_cpus, dashboard_host="127.0.0.1", include_dashboard=False, log_to_driver=log_to_driver)
    if on_sigterm is not None:
        signal.signal(signal.SIGTERM, on_sigterm)


@dataclass
class LocalHead:
    """A Ray head started as a user starts one (`ray start --head --block`), owned by this process.

    Free ports, its own temp dir, dashboard (and job API) on 127.0.0.1. `stop()` ends exactly
    the processes it started (its own process group), never another Ray on the machine,
    which `ray stop` would.
    """

    num_cpus: int = 2
    temp_dir: Path | None = None
    gcs: str = ""
    dashboard: str = ""
    process: subprocess.Popen | None = field(default=None, repr=False)

    def start(self, timeout: float = 180) -> LocalHead:
        # Ray's Unix socket paths must stay short, so the temp dir lives directly under /tmp.
        self.temp_dir = self.temp_dir or Path(tempfile.mkdtemp(prefix="xrh", dir="/tmp"))
        port, dashboard_port = free_port(), free_port()
        ray_cli = Path(sys.executable).with_name("ray")
        command = [str(ray_cli), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
                   "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
                   f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
                   f"--temp-dir={self.temp_dir}", "--disable-usage-stats", f"--num-cpus={self.num_cpus}",
                   "--num-gpus=0", "--include-dashboard=true"]
        env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
        # Ray on Linux swaps 127.0.0.1 for the machine's address unless this is "0"; a driver
        # connecting to this head needs the same setting before it imports Ray.
        env.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        # Jobs submitted here run `python ...`: this interpreter's, with this project installed.
        env["PATH"] = os.pathsep.join([str(ray_cli.parent), env.get("PATH", "")])
        log = open(self.temp_dir / "head.log", "w")
        self.process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        self.gcs, self.dashboard = f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard_port}"
        deadline = time.monotonic() + timeout
        while not self._ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the Ray head did not start; see {self.temp_dir / 'head.log'}")
            time.sleep(0.5)
        return self

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.dashboard}/api/version", timeout=5) as answer:
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
