"""Client load on a served app, shared by the replica-death and soak tests and benchmarks: one loop, one record.

`Clients` runs N client threads POSTing to /predict, closed loop (a new request as soon as the
last is answered) or paced (each client sends at fixed times, open loop at a chosen rate);
every request becomes an `Answer`. `Uploads` decides what each request sends: a good phantom,
or now and then a poison upload (a broken PNG of tests/badfiles.py) whose 4xx code is known.
`kill_one_replica` SIGKILLs a replica under load and times the recovery; `soak` runs paced
load for a while and samples the replica's and proxy's /proc readings. `ServedCommand` starts
`xray-ray serve` as a user does, for the benchmarks. Every request is bounded in time.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.badfiles import BAD_CODES, bad_files
from tests.running import Command, healthy, user_env
from xray_ray.config import SERVE_DEPLOYMENT_NAME
from xray_ray.processes import command_line, proc_field_mb, still_running

REQUEST_TIMEOUT_S = 60.0
"""Every request's bound: longer than a replica's restart, so a request waiting for one is answered."""
POISON = {"truncated.png": (422, BAD_CODES["truncated.png"]), "text.png": (422, BAD_CODES["text.png"]),
          "bomb.png": (422, BAD_CODES["bomb.png"]), "tiny.png": (422, BAD_CODES["tiny.png"]),
          "empty.png": (400, "empty_body")}
"""The poison uploads (broken or hostile PNG bytes of tests/badfiles.py): the status and error code each must get."""


@dataclass(frozen=True)
class Answer:
    """One request: when it was due, sent and finished (monotonic seconds), what came back (an HTTP status, or
    the transport error's name), the JSON error code of a refusal, and the poison kind it sent (None: a good image)."""

    due: float
    started: float
    ended: float
    status: int | str
    error: str | None
    poison: str | None

    @property
    def latency_s(self) -> float:
        """From when it was due, so a paced client that fell behind counts the wait (no coordinated omission)."""
        return self.ended - self.due

    @property
    def server_error(self) -> bool:
        return isinstance(self.status, int) and self.status >= 500


class Uploads:
    """What each request sends: good images in turn, and every `poison_every`-th request a poison upload
    (0: never), the kinds in turn, so the share is exact and every kind is sent."""

    def __init__(self, images: list[bytes], poison_every: int = 0) -> None:
        self.images, self.poison_every = images, poison_every
        broken = bad_files()
        self.poison = [(name, broken[name][0]) for name in POISON]
        self.sent = 0
        self.lock = threading.Lock()

    def next(self) -> tuple[bytes, str | None]:
        with self.lock:
            n = self.sent
            self.sent += 1
        if self.poison_every and n % self.poison_every == self.poison_every - 1:
            name, data = self.poison[(n // self.poison_every) % len(self.poison)]
            return data, name
        return self.images[n % len(self.images)], None


def phantom_uploads(phantom_root: Path, count: int = 8) -> list[bytes]:
    """`count` PNG phantoms of the dataset, all classes, as a client uploads them."""
    paths = sorted(phantom_root.glob("*/images/*.png"))
    return [path.read_bytes() for path in paths[:: max(1, len(paths) // count)][:count]]


class Clients:
    """`count` client threads POSTing to `url`/predict until `stop()` or `bound_s`.

    `interval_s` 0: closed loop. Otherwise paced: client k sends at start + (k / count + j) * interval_s,
    so together they send count / interval_s requests per second whatever the latency; a request due
    while its client still waits goes out when the last is answered, its latency counted from when it was due."""

    def __init__(self, url: str, uploads: Uploads, count: int, interval_s: float = 0.0, bound_s: float = 120) -> None:
        self.url, self.uploads, self.interval_s = url, uploads, interval_s
        self.answers: list[Answer] = []
        self.lock, self.done = threading.Lock(), threading.Event()
        self.started = time.monotonic()
        self.deadline = self.started + bound_s
        self.threads = [threading.Thread(target=self._loop, args=(k / count,), daemon=True) for k in range(count)]
        for thread in self.threads:
            thread.start()

    def _loop(self, offset: float) -> None:
        due = self.started + offset * self.interval_s
        with httpx.Client(timeout=REQUEST_TIMEOUT_S) as client:
            while not self.done.is_set() and time.monotonic() < self.deadline:
                if self.interval_s:
                    self.done.wait(max(0.0, due - time.monotonic()))
                    if self.done.is_set():
                        return
                else:
                    due = time.monotonic()
                answer = self._send(client, due)
                with self.lock:
                    self.answers.append(answer)
                if isinstance(answer.status, str):
                    time.sleep(0.05)  # the server is gone: a client backs off
                due += self.interval_s

    def _send(self, client: httpx.Client, due: float) -> Answer:
        data, poison = self.uploads.next()
        started = time.monotonic()
        try:
            response = client.post(f"{self.url}/predict", content=data,
                                   headers={"Content-Type": "application/octet-stream"})
            status = response.status_code
            error = _error_code(response) if status != 200 else None
        except httpx.TransportError as err:
            status, error = type(err).__name__, None
        return Answer(due, started, time.monotonic(), status, error, poison)

    def snapshot(self) -> list[Answer]:
        with self.lock:
            return list(self.answers)

    def answered(self) -> int:
        return sum(1 for answer in self.snapshot() if answer.status == 200)

    def stop(self) -> list[Answer]:
        self.done.set()
        for thread in self.threads:
            thread.join(REQUEST_TIMEOUT_S + 10)
        return self.snapshot()


def _error_code(response: httpx.Response) -> str | None:
    """The JSON `error` code of a refusal; None when the body is not the app's JSON (e.g. Serve's own 500)."""
    try:
        return response.json().get("error")
    except ValueError:
        return None


def wait_until(check: Callable[[], bool], timeout: float, what: str, poll_s: float = 0.2) -> float:
    """Seconds until `check()` held; AssertionError naming `what` after `timeout`."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < timeout, f"no {what} after {timeout} s"
        time.sleep(poll_s)
    return time.monotonic() - started


def capacity(url: str, uploads: Uploads, clients: int, seconds: float) -> float:
    """Good answers per second of a closed loop of `clients` (after one round to warm up): what the app sustains."""
    load = Clients(url, uploads, clients)
    try:
        wait_until(lambda: load.answered() >= clients, REQUEST_TIMEOUT_S, "answers to warm up")
        begin, time_begin = load.answered(), time.monotonic()
        time.sleep(seconds)
        return (load.answered() - begin) / (time.monotonic() - time_begin)
    finally:
        load.stop()


# --- the processes of a served app --------------------------------------------------------------------------------

def titled(pids: list[int], title: str) -> list[int]:
    """Those of `pids` whose command line (a Ray worker's title) holds `title`, still running."""
    return still_running([pid for pid in pids if title.encode() in command_line(pid)])


def replica_title(app: str) -> str:
    return f"ServeReplica:{app}:{SERVE_DEPLOYMENT_NAME}"


PROXY_TITLE = "ProxyActor"


def readings(pid: int) -> dict:
    """A process's resident memory (MB), open files and threads, from /proc; None for each once it is gone."""
    try:
        open_files = len(os.listdir(f"/proc/{pid}/fd"))
        threads = int(next(line.split()[1] for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                           if line.startswith("Threads:")))
    except (OSError, StopIteration, ValueError):
        open_files = threads = None
    return {"rss_mb": proc_field_mb(pid, "VmRSS"), "open_files": open_files, "threads": threads}


def running_replicas(app: str) -> int:
    """Replicas of `app` that Serve's controller reports RUNNING (this process must be connected to that Ray)."""
    from ray import serve

    application = serve.status().applications.get(app)
    deployment = application.deployments.get(SERVE_DEPLOYMENT_NAME) if application else None
    return deployment.replica_states.get("RUNNING", 0) if deployment else 0


# --- a replica's death --------------------------------------------------------------------------------------------

@dataclass
class Death:
    """One SIGKILL of one replica under load: when (monotonic), which pid, and the seconds until Serve had started
    its replacement (`replaced_s`) and until the full count was RUNNING again (`recovered_s`)."""

    killed_at: float
    pid: int
    replaced_s: float
    recovered_s: float
    answers: list[Answer]

    @property
    def recovered_at(self) -> float:
        return self.killed_at + self.recovered_s

    def in_flight(self) -> list[Answer]:
        """Requests sent before the kill and not yet answered at it (on any replica)."""
        return [a for a in self.answers if a.started <= self.killed_at < a.ended]

    def failed(self) -> list[Answer]:
        return [a for a in self.answers if a.status != 200]

    def after_recovery(self) -> list[Answer]:
        return [a for a in self.answers if a.started >= self.recovered_at]


def kill_one_replica(replicas: Callable[[], list[int]], running: Callable[[], int], count: int,
                     timeout: float) -> tuple[float, int, float, float]:
    """SIGKILL the first of `replicas()` and wait, at most `timeout` s in all, for Serve to replace it: (kill
    time, pid, seconds until a replacement process exists, seconds until `running()` is back to `count`)."""
    before = replicas()
    assert len(before) == count and running() == count, f"not {count} replicas running: {before}"
    pid, killed_at = before[0], time.monotonic()
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: pid not in (now := replicas()) and len(now) == count, timeout, "a replacement replica process")
    replaced = time.monotonic() - killed_at
    wait_until(lambda: len(replicas()) == count and running() == count, max(0.1, timeout - replaced),
               f"{count} replicas running again")
    return killed_at, pid, replaced, time.monotonic() - killed_at


def replica_death(url: str, uploads: Uploads, clients: int, replicas: Callable[[], list[int]],
                  running: Callable[[], int], count: int, after_s: float = 5, timeout: float = 120) -> Death:
    """`clients` in a closed loop; once every client has been answered twice, one replica is SIGKILLed; the load
    goes on until `after_s` after the full count is back. Every answer is kept in the `Death`."""
    load = Clients(url, uploads, clients, bound_s=timeout + 120)
    try:
        wait_until(lambda: load.answered() >= 2 * clients, REQUEST_TIMEOUT_S, "answers before the kill")
        killed_at, pid, replaced, recovered = kill_one_replica(replicas, running, count, timeout)
        time.sleep(after_s)
    finally:
        answers = load.stop()
    return Death(killed_at, pid, replaced, recovered, answers)


# --- a soak -------------------------------------------------------------------------------------------------------

@dataclass
class Soak:
    """A paced run: the closed-loop capacity measured first, the rate run at, when the paced load began
    (monotonic), every answer, and (seconds since the beginning, {role: readings}) samples of the processes."""

    capacity_rps: float
    rate_rps: float
    began: float
    seconds: float
    answers: list[Answer]
    samples: list[tuple[float, dict]]


def soak(url: str, uploads: Uploads, clients: int, seconds: float, load_share: float,
         processes: Callable[[], dict[str, int]], capacity_s: float = 15, sample_every_s: float = 10) -> Soak:
    """Measure the capacity with a closed loop of `clients` (good images only) for `capacity_s`, then pace the
    clients at `load_share` of it, poison included, for `seconds`, sampling `readings` of each of `processes()`
    (role -> pid) every `sample_every_s` and at the end."""
    measured = capacity(url, Uploads(uploads.images), clients, capacity_s)
    rate = load_share * measured
    load = Clients(url, uploads, clients, interval_s=clients / rate, bound_s=seconds + 60)
    samples = []
    try:
        while (elapsed := time.monotonic() - load.started) < seconds:
            samples.append((elapsed, {role: readings(pid) for role, pid in processes().items()}))
            time.sleep(min(sample_every_s, max(0.0, seconds - elapsed)))
    finally:
        answers = load.stop()
    samples.append((time.monotonic() - load.started, {role: readings(pid) for role, pid in processes().items()}))
    return Soak(measured, rate, load.started, seconds, answers, samples)


# --- `xray-ray serve`, started as a user starts it (for the benchmarks) -----------------------------------------

class ServedCommand:
    """`xray-ray serve --model MODEL --port PORT ARGS` in its own session (tests/running.py), its Ray using
    `token_file` (write_token_file, in a 0700 folder), so a driver here can join that Ray (`join_env`): one
    token for every command a process joins, as Ray reads a driver's token once. `stop()` as Ctrl-C stops it."""

    def __init__(self, model: Path, port: int, folder: Path, args: list[str], token_file: Path) -> None:
        home = folder / "home"
        home.mkdir(parents=True)
        self.token_file = token_file
        self.url = f"http://127.0.0.1:{port}"
        self.command = Command(["serve", "--model", str(model), "--port", str(port), *args], folder / "serve.log",
                               folder, env=user_env(HOME=str(home), RAY_AUTH_TOKEN_PATH=str(token_file)))

    def wait_healthy(self, timeout: float = 300) -> None:
        self.command.wait_for(lambda: healthy(self.url), timeout, "a healthy replica")

    def pids(self) -> list[int]:
        return self.command.processes()

    def gcs_address(self) -> str:
        """Where a driver joins this command's Ray (its GCS listener, on loopback)."""
        port = next(row["port"] for row in self.command.listeners() if Path(row["process"]).name == "gcs_server")
        return f"127.0.0.1:{port}"

    def join_env(self) -> dict[str, str]:
        """What a driver in this process needs to join that Ray: its token."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_file)}

    def stop(self) -> None:
        try:
            self.command.stop("interrupt")
        finally:
            self.command.kill()
