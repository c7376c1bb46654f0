"""Choosing a Ray before Ray is imported, and the token files of the Rays this project starts."""

from __future__ import annotations

import os
import stat

import pytest

from xray_ray.loopback import MULTI_HOST_SWITCH, is_loopback_address, use_address
from xray_ray.ray_runtime import write_token_file


@pytest.mark.parametrize("address, loopback", [
    ("127.0.0.1:6379", True), ("http://localhost:8265", True), ("ray://[::1]:10001", True),
    ("[::ffff:127.0.0.1]:8000", True),  # how a dual-stack listener on 127.0.0.1 shows in /proc/net/tcp6
    ("10.0.0.2:6379", False), ("http://192.0.2.2:8265", False), ("auto", False), ("ray://head.example:10001", False),
    ("[::ffff:10.0.0.2]:8000", False), ("[::]:8000", False), ("0.0.0.0:8000", False),
])
def test_loopback_addresses(address, loopback):
    assert is_loopback_address(address) is loopback


def test_a_local_or_loopback_ray_turns_multi_host_mode_off_and_a_cluster_turns_it_back_on(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv(MULTI_HOST_SWITCH, raising=False)
    use_address(None)
    assert os.environ[MULTI_HOST_SWITCH] == "0"
    use_address("10.0.0.2:6379")
    assert os.environ["RAY_ADDRESS"] == "10.0.0.2:6379" and MULTI_HOST_SWITCH not in os.environ
    use_address("127.0.0.1:6379")
    assert os.environ[MULTI_HOST_SWITCH] == "0"


def test_token_file_is_private_whatever_the_umask(tmp_path):
    previous = os.umask(0)
    try:
        path = write_token_file(tmp_path)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(path.read_text()) == 64
    with pytest.raises(FileExistsError):  # never overwrites a token someone relies on
        write_token_file(tmp_path)
