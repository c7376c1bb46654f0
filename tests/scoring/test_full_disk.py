"""A full disk in the nightly job: refused before Ray starts when the estimate does not fit, and an `ENOSPC` half way
ends the run with exit 5, no partial part, a ledger that matches the parts, and a re-run that completes.

The fast tests call the check and the part writer directly; the slow ones score phantoms on the session's Ray,
once with the part writer made to fail and once on a real, small tmpfs that fills up (root only: it skips,
saying why, where mounting is not allowed).
"""

from __future__ import annotations

import errno
import os
import subprocess
import time
from contextlib import nullcontext
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from tests.scoring.test_isolation import _prediction_rows
from xray_ray.cli import app
from xray_ray.config_services import ScoreConfig
from xray_ray.files import sha256_file
from xray_ray.images import synth
from xray_ray.scoring import ledger, preflight, run
from xray_ray.scoring.preflight import DISK_FULL, ModelInfo, ScoreError, check_space, space_needed
from xray_ray.scoring.run import read_predictions

DISK_MB = 6


def _no_temp_files(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if p.name.endswith(".tmp") or p.name == ".work"]


def _ledger_matches_parts(out: Path) -> bool:
    parts = {f"{p.parent.parent.name}--{p.stem}.parquet" for p in out.glob(f"*/{ledger.PARTS_DIR}/part-*.parquet")}
    return parts == {p.name for p in (out / ledger.LEDGER_DIR).glob("*.parquet")}


# --- before Ray starts -----------------------------------------------------------------------------------------


def test_a_run_short_of_space_exits_5_before_ray_starts_naming_the_folder_and_the_bytes(tmp_path, monkeypatch):
    from xray_ray.cli import services

    sessions = []
    monkeypatch.setattr(services, "ray_session", lambda *args, **kwargs: sessions.append(args) or nullcontext())
    monkeypatch.setattr(preflight, "_card_info", lambda folder, engine: ModelInfo("v1", "onnxruntime", 64))
    monkeypatch.setattr(preflight, "free_space", lambda out: 123_456)
    archive = tmp_path / "archive"
    synth.write_dataset(archive, per_class=2, size=32, seed=1)
    out = tmp_path / "scores"
    result = CliRunner().invoke(app, ["score", "--archive", str(archive), "--model", str(tmp_path), "--out",
                                      str(out), "--explain", "0"])
    needed = space_needed(8, ScoreConfig(explain=0))
    assert result.exit_code == DISK_FULL == 5, result.output
    message = " ".join(result.output.split())
    assert f"not enough free space for this run in {out}" in message
    assert f"about {needed:,} bytes needed" in message and "123,456 bytes free" in message
    assert not sessions and not out.exists()  # refused before Ray, nothing written


def test_the_estimate_counts_only_rows_the_ledger_does_not_hold_yet(tmp_path, monkeypatch):
    archive = tmp_path / "archive"
    synth.write_dataset(archive, per_class=3, size=32, seed=2)
    (archive / "gone.png").symlink_to("missing.png")  # an entry with no content: a row too
    out = tmp_path / "out"
    options = ScoreConfig(archives=[str(archive)], out=str(out), model=str(tmp_path), explain=0, commit_rows=5)
    info = ModelInfo("v1", "onnxruntime", 64)
    assert check_space(options, [archive], info) == 13
    files = sorted(str(p) for p in archive.rglob("*.png") if p.is_file())[:4]
    rows = _prediction_rows(files)
    rows["sha256"] = [sha256_file(f) for f in files]
    run._write_part(out / "night1", out, [rows])
    assert check_space(options, [archive], info) == 9
    assert check_space(options, [archive], ModelInfo("v2", "onnxruntime", 64)) == 13  # another version: all
    # 9 rows in 2 parts, the report, doubled
    assert space_needed(9, options) == 2 * (9 * preflight.ROW_BYTES + 2 * preflight.PART_BYTES + preflight.REPORT_BYTES)
    monkeypatch.setattr(preflight, "free_space", lambda out: space_needed(9, options) - 1)
    with pytest.raises(ScoreError, match=f"in {out}: about") as refused:
        check_space(options, [archive], info)
    assert refused.value.exit_code == DISK_FULL


# --- the part writer on a full disk ------------------------------------------------------------------------------


def _failing_parquet(monkeypatch, prefix: str, nth: int) -> list[float]:
    """Make the `nth` Parquet write whose temp file starts with `prefix` write a few bytes and fail with ENOSPC;
    returns the list the time of that failure goes to."""
    real, seen, failed_at = pd.DataFrame.to_parquet, [], []

    def to_parquet(self, path, *args, **kwargs):
        if Path(path).name.startswith(prefix):
            seen.append(Path(path).name)
            if len(seen) == nth:
                Path(path).write_bytes(b"PAR1 and no more room")  # what a full disk leaves behind
                failed_at.append(time.monotonic())
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(self, path, *args, **kwargs)

    monkeypatch.setattr(pd.DataFrame, "to_parquet", to_parquet)
    return failed_at


@pytest.mark.parametrize("failing", [".part-", ".night1--part-"], ids=["part", "its ledger file"])
def test_a_full_disk_while_committing_a_part_leaves_no_part_no_temp_file_and_a_matching_ledger(
        tmp_path, monkeypatch, failing):
    out = tmp_path / "out"
    folder = out / "night1"
    _failing_parquet(monkeypatch, failing, nth=2)
    run._write_part(folder, out, [_prediction_rows(["/a/1.png", "/a/2.png"])])
    with pytest.raises(OSError) as full:
        run._write_part(folder, out, [_prediction_rows(["/a/3.png", "/a/4.png"])])
    assert preflight.is_disk_full(full.value)
    assert [p.name for p in (folder / ledger.PARTS_DIR).iterdir()] == ["part-00001.parquet"]
    assert not _no_temp_files(out) and _ledger_matches_parts(out)
    assert ledger.repair(out) == ledger.Repair()  # nothing left to mend
    assert set(read_predictions(folder)["path"]) == {"/a/1.png", "/a/2.png"}


# --- a whole run on a full disk ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(compact_model, ray_local) -> Path:
    return compact_model[0]


def _archive(root: Path) -> tuple[Path, int]:
    """24 phantoms and a broken link: 25 entries, each a row."""
    synth.write_dataset(root, per_class=6, size=96, seed=7)
    (root / "gone.png").symlink_to("missing.png")
    return root, 25


def _score_args(archive: Path, model: Path, out: Path) -> list[str]:
    return ["score", "--archive", str(archive), "--model", str(model), "--out", str(out), "--run", "night1",
            "--batch-size", "2", "--commit-rows", "4", "--files-per-task", "8", "--explain", "0"]


def _assert_ended_cleanly(result, out: Path, failed_at: float) -> None:
    """Exit 5 within 30 s of the failure, the message, committed parts intact, no temp file, ledger = parts."""
    ended = time.monotonic() - failed_at
    assert result.exit_code == DISK_FULL, result.output
    assert ended < 30, f"the run went on {ended:.1f} s after the disk filled up"
    print(f"the run ended {ended:.1f} s after the disk filled up")
    message = " ".join(result.output.split())
    assert f"the disk holding {out} is full (" in message and "No space left on device" in message, message
    assert "bytes needed" in message and "bytes free" in message and "run the same command again" in message
    parts = sorted((out / "night1" / ledger.PARTS_DIR).glob("part-*.parquet"))
    assert parts, "no part was committed before the disk filled up"
    assert all(len(pd.read_parquet(part)) for part in parts)  # every visible part whole
    assert not _no_temp_files(out) and _ledger_matches_parts(out)
    assert ledger.repair(out) == ledger.Repair()


def _assert_completed(result, out: Path, entries: int) -> None:
    """The re-run: exit 0, one row per archive entry, no path twice in any part."""
    assert result.exit_code == 0, result.output
    rows = pd.concat([pd.read_parquet(p) for p in sorted((out / "night1" / ledger.PARTS_DIR).glob("*.parquet"))])
    assert len(rows) == entries and rows["path"].is_unique
    assert len(read_predictions(out / "night1")) == entries


def test_enospc_from_the_part_writer_ends_the_run_with_exit_5_and_a_rerun_completes(model, tmp_path, monkeypatch):
    archive, entries = _archive(tmp_path / "archive")
    out = tmp_path / "out"
    failed_at = _failing_parquet(monkeypatch, ".part-", nth=3)
    result = CliRunner().invoke(app, _score_args(archive, model, out))
    assert failed_at, "the run ended before its third part"
    _assert_ended_cleanly(result, out, failed_at[0])
    assert len(list((out / "night1" / ledger.PARTS_DIR).glob("part-*.parquet"))) == 2

    monkeypatch.undo()  # space again
    _assert_completed(CliRunner().invoke(app, _score_args(archive, model, out)), out, entries)


def _fill(folder: Path, leave: int = 0) -> Path:
    """Write a file into `folder` until at most `leave` bytes are free (all of them: until ENOSPC)."""
    ballast = folder / "ballast"
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        while (room := os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize - leave) > 0:
            os.write(fd, bytes(min(room, 1 << 20)))
    except OSError as err:
        assert err.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return ballast


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of DISK_MB MB mounted for this test, always unmounted after; skips where mounting is not allowed."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_MB}m,mode=0755", "tmpfs", str(disk)],
                             capture_output=True, text=True, check=False) if os.geteuid() == 0 else None
    if mounted is None or mounted.returncode != 0:
        why = "not root" if mounted is None else (mounted.stderr.strip() or f"mount exited {mounted.returncode}")
        pytest.skip(f"cannot mount a {DISK_MB} MB tmpfs to fill up here ({why}); CI runs this as root")
    try:
        yield disk
    finally:
        if subprocess.run(["umount", str(disk)], capture_output=True, check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(disk)], capture_output=True, check=False)


def test_a_real_full_disk_refuses_a_run_then_ends_one_half_way_and_the_rerun_completes(
        model, tmp_path, small_disk, monkeypatch):
    archive, entries = _archive(tmp_path / "archive")
    out = small_disk / "scores"

    ballast = _fill(small_disk, leave=64 * 1024)  # another writer took the disk: refused before Ray starts
    refused = CliRunner().invoke(app, _score_args(archive, model, out))
    assert refused.exit_code == DISK_FULL, refused.output
    assert f"not enough free space for this run in {out}" in " ".join(refused.output.split())
    assert not any(out.glob("*/run.json"))
    ballast.unlink()

    real_write_part, committed, failed_at = run._write_part, [], []

    def write_part_then_fill_the_disk(folder, out_, frames):
        written = real_write_part(folder, out_, frames)
        committed.append(written)
        if len([n for n in committed if n]) == 2 and not failed_at:  # the disk fills up after two parts
            _fill(small_disk)
            failed_at.append(time.monotonic())
        return written

    monkeypatch.setattr(run, "_write_part", write_part_then_fill_the_disk)
    result = CliRunner().invoke(app, _score_args(archive, model, out))
    assert failed_at, "the run ended before the disk was filled"
    _assert_ended_cleanly(result, out, failed_at[0])

    monkeypatch.undo()
    (small_disk / "ballast").unlink()  # space freed
    _assert_completed(CliRunner().invoke(app, _score_args(archive, model, out)), out, entries)
