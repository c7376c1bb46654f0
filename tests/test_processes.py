"""The /proc readers that tests and benchmarks share: process tree and group, liveness, CPU seconds."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from xray_ray.processes import cpu_seconds, process_group, process_tree, stat_fields, still_running


def test_a_child_is_in_the_tree_and_its_group_and_gone_once_reaped():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], start_new_session=True)
    try:
        assert child.pid in process_tree(os.getpid())
        assert process_group(child.pid) == [child.pid]
        assert still_running([child.pid]) == [child.pid]
    finally:
        child.kill()
        child.wait()
    assert still_running([child.pid]) == [] and stat_fields(child.pid) is None and cpu_seconds(child.pid) is None


def test_cpu_seconds_grow_with_work_done():
    before = cpu_seconds(os.getpid())
    deadline = time.process_time() + 0.3
    while time.process_time() < deadline:
        pass
    assert before is not None and cpu_seconds(os.getpid()) >= before + 0.2
