"""DICOM conformance for the tests: `dciodvfy` (dicom3tools) on a written file, its errors as a list.

dciodvfy checks an object against its IOD's modules, attributes and value representations. It
prints to stderr; lines starting "Error" are errors, "Warning" lines are allowed. When it is not
installed the calling test is skipped with the reason shown, except under CI (env CI=true), where
a missing validator must fail rather than pass silently.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest


def dciodvfy_errors(path: Path | str) -> list[str]:
    """The "Error" lines `dciodvfy` prints for the DICOM file at `path` ([] when it conforms)."""
    program = shutil.which("dciodvfy")
    if program is None:
        reason = "dciodvfy (Debian package dicom3tools) is not installed; DICOM conformance not checked"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    result = subprocess.run([program, str(path)], capture_output=True, text=True, timeout=60, check=False)
    lines = (result.stderr + result.stdout).splitlines()
    return [line for line in lines if line.startswith("Error")]
