"""Outputs are atomic and durable, and readable by whom the umask allows (they name patient image paths)."""

from __future__ import annotations

import os
import stat

import pytest

from xray_ray.files import atomic_folder, atomic_path, atomic_write_text, current_umask


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o027, 0o640)])
def test_outputs_follow_the_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        assert current_umask() == umask
        atomic_write_text(tmp_path / "summary.json", "{}")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "summary.json").stat().st_mode) == mode


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "report.txt"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half of the new")
        raise RuntimeError("the job died while writing")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["report.txt"]


def test_a_folder_replaces_the_old_one_as_a_whole_with_files_the_umask_allows(tmp_path):
    target = tmp_path / "model"
    with atomic_folder(target) as staging:
        (staging / "weights").write_bytes(b"old")
        (staging / "card.json").write_text("{}")
    previous = os.umask(0o027)
    try:
        with atomic_folder(target) as staging:
            assert (target / "weights").read_bytes() == b"old"  # readers see the old folder until the end
            (staging / "weights").write_bytes(b"new")
            (staging / "sub").mkdir()
            (staging / "sub" / "part").write_bytes(b"part")
    finally:
        os.umask(previous)
    assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*")) == ["sub", "sub/part", "weights"]
    assert (target / "weights").read_bytes() == b"new"
    assert stat.S_IMODE((target / "sub" / "part").stat().st_mode) == 0o640
    assert stat.S_IMODE(target.stat().st_mode) == 0o750  # the folder itself too, not mkdtemp's private 0700
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no staging or retired folder left behind


def test_a_failed_folder_write_keeps_the_old_folder_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "model"
    with atomic_folder(target) as staging:
        (staging / "weights").write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_folder(target) as staging:
        (staging / "weights").write_bytes(b"half of the new")
        raise RuntimeError("the export died while writing")
    assert (target / "weights").read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["model"]
