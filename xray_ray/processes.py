"""Processes this project starts and measures: a free loopback port, stopping a process group,
and what /proc says about a process tree (memory, titles, listening sockets).

Linux only where /proc is read; elsewhere the readings are empty (None or []), never an error.
Benchmarks and tests use the same readers, so a figure in a report and a bound in a test
mean the same thing.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_process_group(process: subprocess.Popen, grace: float) -> None:
    """End a process started in its own session and everything it started: SIGTERM, `grace` seconds
    to exit, then SIGKILL the whole group and every process of its tree as it was before the SIGTERM,
    so children it left behind go too, even those in a session of their own (a Ray job's driver,
    which would otherwise wait a minute for its dead GCS)."""
    tree = process_tree(process.pid)[1:] if process.poll() is None else []
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for pid in still_running(tree):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    process.wait(10)


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block SIGTERM raises KeyboardInterrupt as Ctrl-C does, so a command's clean-up runs on `kill` too."""
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def stop_signals_ignored() -> Iterator[None]:
    """Within the block Ctrl-C and SIGTERM are ignored, so a stop already under way (Ray shutting down) finishes
    instead of being cut short by a second signal."""
    previous = {number: signal.signal(number, signal.SIG_IGN) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def proc_field_mb(pid: int | str, field: str, source: str = "status") -> float | None:
    """A kB field (`VmRSS`, `VmHWM`, `Pss`...) of /proc/<pid>/<source> in MB; None when unreadable."""
    try:
        for line in Path(f"/proc/{pid}/{source}").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def process_footprint() -> dict:
    """What this process costs: resident memory now and at its peak, in MB, and whether TensorFlow
    was imported (processes on ONNX Runtime promise not to)."""
    return {"rss_mb": proc_field_mb("self", "VmRSS"), "peak_rss_mb": proc_field_mb("self", "VmHWM"),
            "tensorflow_imported": "tensorflow" in sys.modules}


def stat_fields(pid: int | str) -> list[str] | None:
    """/proc/<pid>/stat after the command name (which may hold spaces and parentheses): state, parent, process
    group, ..., user and system CPU ticks at [11] and [12]; None once the process is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields if len(fields) > 12 else None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds the process has used so far; None once it is gone."""
    fields = stat_fields(pid)
    return None if fields is None else (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_tree(pid: int) -> list[int]:
    """`pid` and every live process it started, directly or not (from each process's parent in /proc)."""
    children: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        fields = stat_fields(entry)
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [pid], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def process_group(pgid: int) -> list[int]:
    """Every live process whose process group is `pgid` (a terminal's foreground job, a `start_new_session` child)."""
    return [int(entry) for entry in filter(str.isdigit, os.listdir("/proc"))
            if (fields := stat_fields(entry)) is not None and fields[0] != "Z" and int(fields[2]) == pgid]


def still_running(pids: list[int]) -> list[int]:
    """Those of `pids` that are still running (not gone, not zombies)."""
    return [pid for pid in pids if (fields := stat_fields(pid)) is not None and fields[0] != "Z"]


def command_line(pid: int) -> bytes:
    """The process's command line (Ray puts a worker's title there, e.g. `ray::MapWorker(...)`); b'' if gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except OSError:
        pass
    return inodes


def _address(hex_address: str) -> tuple[str, int]:
    host, port = hex_address.split(":")
    raw = bytes.fromhex(host)
    if len(raw) == 4:
        ip = socket.inet_ntop(socket.AF_INET, raw[::-1])
    else:  # IPv6: four little-endian 32-bit words
        ip = socket.inet_ntop(socket.AF_INET6, b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))
    return ip, int(port, 16)


def tcp_listeners(pids: list[int]) -> list[dict]:
    """Every TCP socket in LISTEN state owned by one of `pids`: address, port, pid and process title (the
    whole first word of its command line: a binary's full path, however deep the install lies)."""
    owner = {inode: pid for pid in pids for inode in _socket_inodes(pid)}
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[3] != "0A" or fields[9] not in owner:  # 0A: LISTEN
                continue
            ip, port = _address(fields[1])
            pid = owner[fields[9]]
            title = command_line(pid).split(b"\0")[0].decode(errors="replace")
            found.append({"address": ip, "port": port, "pid": pid, "process": title})
    return sorted(found, key=lambda row: (row["port"], row["pid"]))
