"""Running an `xray-ray` command as a user runs it in a terminal, watching what it starts, and stopping it
the ways a terminal (Ctrl-C: SIGINT to the foreground process group) or systemd (SIGTERM to every
process of the unit) does."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from xray_ray.processes import process_group, process_tree, still_running, tcp_listeners

BIN = Path(sys.executable).parent
RAY_SETTINGS = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH",
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")


def user_env(**extra: str) -> dict[str, str]:
    """A user's shell: no Ray address, auth mode, token or loopback switch inherited from the test process."""
    env = {key: value for key, value in os.environ.items() if key not in RAY_SETTINGS}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", PYTHONUNBUFFERED="1", **extra)
    return env


def healthy(url: str) -> bool:
    """True when the served app at `url` answers /healthz with 200 (a replica is up)."""
    try:
        return httpx.get(f"{url}/healthz", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


def _as_a_terminal_starts_it() -> None:
    """Ctrl-C's SIGINT at its default, as a terminal's shell leaves it: a test run launched in the background
    of a non-interactive shell inherits it ignored, and Python then never raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Command:
    """`xray-ray ARGS` in its own session, so its process group is what a terminal's foreground job would be."""

    def __init__(self, args: list[str], log: Path, cwd: Path, env: dict[str, str] | None = None) -> None:
        self.log = log
        self.sink = open(log, "w")
        self.process = subprocess.Popen([sys.executable, "-m", "xray_ray.cli", *args], cwd=cwd,
                                        env=env or user_env(), stdout=self.sink, stderr=subprocess.STDOUT,
                                        start_new_session=True, preexec_fn=_as_a_terminal_starts_it)
        self.seen: set[int] = set()

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def processes(self) -> list[int]:
        """Its process tree and its process group now; every pid is remembered for `leftovers`."""
        pids = sorted(set(process_tree(self.process.pid)) | set(process_group(self.process.pid)))
        self.seen.update(pids)
        return pids

    def wait_for(self, check: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            self.processes()
            if self.process.poll() is not None:
                if check():  # it exited between the two looks, and its exit is what was awaited
                    return
                raise AssertionError(f"exited ({self.process.returncode}) before {what}:\n{self.output()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} after {timeout} s:\n{self.output()[-3000:]}")
            time.sleep(0.5)

    def listeners(self) -> list[dict]:
        return tcp_listeners(self.processes())

    def stop(self, how: str, timeout: float = 20) -> float:
        """Ctrl-C (`interrupt`: SIGINT to the process group) or systemd's stop (`terminate`: one SIGTERM to
        every process of the group and of the tree, as KillMode=control-group does). Returns the
        seconds until the command and every process it started were gone (the test fails past `timeout`)."""
        pids = self.processes()
        started = time.monotonic()
        if how == "interrupt":
            os.killpg(self.process.pid, signal.SIGINT)
        else:
            for pid in pids:  # once each, as systemd does
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        while time.monotonic() - started < timeout + 40:
            if self.process.poll() is not None and not self.leftovers():
                return time.monotonic() - started
            time.sleep(0.2)
        return time.monotonic() - started

    def leftovers(self) -> list[int]:
        """Processes it started (ever seen in its tree or group) that still run."""
        return still_running(sorted(self.seen | set(process_group(self.process.pid))))

    def kill(self) -> None:
        """The test's own clean-up: SIGKILL whatever is left."""
        for pid in [self.process.pid, *self.leftovers()]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            pass
        self.sink.close()
