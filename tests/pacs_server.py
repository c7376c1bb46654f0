"""A real Orthanc PACS (with its DICOMweb plugin) for tests: `start_orthanc(folder)`, or the module-scoped fixture
`orthanc` (`from tests.pacs_server import orthanc  # noqa: F401`).

Each server has its own folder (config, storage, index, log), a free port on 127.0.0.1 and a random password.
Orthanc 1.10 has no option to choose the address it listens on: it binds 0.0.0.0:PORT (`ss -ltnp`), and with
`RemoteAccessAllowed: false` it refuses every HTTP client that is not on loopback. Its DICOM port stays closed.
Without Orthanc or the plugin the tests skip, or fail under CI=true.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

ORTHANC_BIN = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
SYSTEM_PORTS = (8042, 4242)
"""Orthanc's default HTTP and DICOM ports: a system Orthanc may hold them, a test server never takes them."""
READY_TIMEOUT_S = 30.0


def orthanc_or_skip() -> tuple[str, str]:
    """(Orthanc binary, DICOMweb plugin); without either the test skips, or fails when CI=true."""
    binary = shutil.which("Orthanc") or (ORTHANC_BIN if os.access(ORTHANC_BIN, os.X_OK) else None)
    plugin = _dicomweb_plugin()
    if binary and plugin:
        return binary, plugin
    reason = ("Orthanc is not installed (Debian package orthanc)" if not binary
              else "Orthanc's DICOMweb plugin is not installed (Debian package orthanc-dicomweb)")
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; CI needs it", pytrace=False)
    pytest.skip(reason)


def _dicomweb_plugin() -> str | None:
    """The DICOMweb plugin's path, from dpkg when it knows the package, else Debian's usual place."""
    try:
        listed = subprocess.run(["dpkg", "-L", "orthanc-dicomweb"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        listed = ""
    found = [line for line in listed.splitlines() if line.endswith("/libOrthancDicomWeb.so")]
    return next((path for path in found + [DICOMWEB_PLUGIN] if os.path.isfile(path)), None)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the kernel's pick), never one of SYSTEM_PORTS."""
    port = SYSTEM_PORTS[0]
    while port in SYSTEM_PORTS:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
    return port


@dataclass
class OrthancServer:
    """One Orthanc process and its folder; `stop` and `restart` keep the folder, so the stored instances too."""

    binary: str
    folder: Path
    port: int
    user: str
    password: str
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def log(self) -> Path:
        return self.folder / "orthanc.log"

    def credentials_file(self, folder: Path, password: str | None = None) -> Path:
        """A credentials file for this server (owner-only, as `dicomweb.read_credentials` wants) in `folder`;
        `password` replaces the right one."""
        path = Path(folder) / "pacs_credentials.json"
        path.write_text(json.dumps({"basic": {"user": self.user, "password": password or self.password}}))
        path.chmod(0o600)
        return path

    def start(self) -> None:
        """Start Orthanc in its own session and wait until it answers with the credentials; fails with its log."""
        with open(self.folder / "stdout.txt", "ab") as output:
            self.process = subprocess.Popen([self.binary, "--verbose", f"--logfile={self.log}",  # logs each request
                                             str(self.folder / "orthanc.json")],
                                            stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                if requests.get(f"{self.url}/system", auth=(self.user, self.password), timeout=2).ok:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        exited = self.process.poll()
        self.stop()
        log = self.log.read_text(errors="replace")[-4000:] if self.log.exists() else "(no log)"
        pytest.fail(f"Orthanc on port {self.port} did not answer in {READY_TIMEOUT_S:g} s (exit code {exited}):\n{log}",
                    pytrace=False)

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM to this server's pid, SIGKILL after `timeout_s`; waits until it has exited."""
        if self.process is None or self.process.poll() is not None:
            return
        os.kill(self.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.kill(self.pid, signal.SIGKILL)
            self.process.wait()

    def kill(self) -> None:
        """SIGKILL to this server's pid, as a crash or a power cut stops it: it answers nothing more at once."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
            self.process.wait()

    def instance_count(self) -> int:
        """The instances this server holds (its /statistics)."""
        answer = requests.get(f"{self.url}/statistics", auth=(self.user, self.password), timeout=10)
        answer.raise_for_status()
        return int(answer.json()["CountInstances"])

    def retrievals(self) -> int:
        """WADO-RS instance retrievals answered so far: GET requests for an instance's bytes in the verbose log."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return len(re.findall(r"\bGET /dicom-web/studies/[^/\s]+/series/[^/\s]+/instances/[^/\s]+(?:\s|$)", text))

    def restart(self) -> None:
        """Stop (if running) and start again on the same port, config and storage."""
        self.stop()
        self.start()


def start_orthanc(folder: Path) -> OrthancServer:
    """An Orthanc serving DICOMweb at http://127.0.0.1:PORT/dicom-web/, storing in `folder`, started and ready."""
    binary, plugin = orthanc_or_skip()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    server = OrthancServer(binary, folder, free_port(), "xray-ray-tests", secrets.token_urlsafe(16))
    config = {"Name": "xray-ray-tests", "HttpPort": server.port, "RemoteAccessAllowed": False,
              "AuthenticationEnabled": True, "RegisteredUsers": {server.user: server.password},
              "DicomServerEnabled": False, "StorageDirectory": str(folder / "storage"),
              "IndexDirectory": str(folder / "index"), "Plugins": [plugin], "SaveJobs": False,
              "WebDavEnabled": False, "HttpThreadsCount": 8,
              "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False}}
    (folder / "orthanc.json").write_text(json.dumps(config, indent=2))
    server.start()
    return server


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    """An Orthanc for this test module, stopped at its end."""
    server = start_orthanc(tmp_path_factory.mktemp("orthanc"))
    try:
        yield server
    finally:
        server.stop()
