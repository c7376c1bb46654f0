"""Entries with no content to hash (broken links, symlink loops, files refused before reading): one row per path and
error code however often a night runs, and still listed in every night's report while they fail.

The read stage's check is called directly; the nights run on the session's Ray with its compact model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from xray_ray.config_services import ScoreConfig
from xray_ray.images import synth
from xray_ray.images.bounds import LIMITS
from xray_ray.scoring import ledger
from xray_ray.scoring.pipeline import read_and_prepare
from xray_ray.scoring.run import read_predictions, score


def _batch(paths, errors, codes) -> dict:
    return {name: np.array(values, dtype=object) for name, values in
            (("path", [str(p) for p in paths]), ("error", errors), ("code", codes))}


def test_the_read_stage_marks_an_entry_failing_the_same_way_as_still_failing(tmp_path):
    (tmp_path / "gone.png").symlink_to("missing.png")
    os.mkfifo(tmp_path / "pipe.png")
    batch = _batch([tmp_path / "gone.png", tmp_path / "pipe.png", tmp_path / "loop"],
                   ["unreadable file: No such file or directory", "", "folder skipped: symlink loop (already scanned)"],
                   ["unreadable", "", "unreadable"])
    first = read_and_prepare(batch, 32, ledger.KnownKeys([]))
    assert list(first["status"]) == ["error"] * 3 and list(first["error_code"]) == ["unreadable", "not_a_file",
                                                                                    "unreadable"]
    assert list(first["sha256"]) == [""] * 3  # nothing to hash: keyed by path and code
    known = ledger.KnownKeys([ledger.row_key(s, p, c) for s, p, c in
                              zip(first["sha256"], first["path"], first["error_code"])])
    again = read_and_prepare(batch, 32, known)
    assert list(again["status"]) == [ledger.STILL_FAILING] * 3 and list(again["error_reason"]) == list(
        first["error_reason"])  # still looked at, reported with tonight's reason

    (tmp_path / "pipe.png").unlink()
    (tmp_path / "pipe.png").write_bytes(b"now a file, not an image")  # fails another way: a new key, a new row
    synth.write_dataset(tmp_path / "found", per_class=1, size=32, seed=1)
    (tmp_path / "missing.png").write_bytes(next((tmp_path / "found").rglob("*.png")).read_bytes())  # link mended
    mended = read_and_prepare(_batch([tmp_path / "gone.png", tmp_path / "pipe.png"], ["", ""], ["", ""]), 32, known)
    assert list(mended["status"]) == ["ok", "error"] and mended["error_code"][1] == "not_an_image"


@pytest.fixture(scope="module")
def model(compact_model, ray_local) -> Path:
    return compact_model[0]


def _hostile_entries(archive: Path) -> dict[str, str]:
    """Entries with nothing to hash, by name: {name: error code}."""
    (archive / "gone.png").symlink_to("missing.png")  # a broken link
    (archive / "self.png").symlink_to("self.png")  # a link to itself
    (archive / "ward").mkdir()
    (archive / "ward" / "up").symlink_to("..")  # a folder loop
    os.mkfifo(archive / "pipe.png")  # not a regular file
    with open(archive / "huge.png", "wb") as file:
        file.truncate(LIMITS.max_file_bytes + 1)  # over the size cap (sparse)
    return {"gone.png": "unreadable", "self.png": "unreadable", "ward/up": "unreadable", "pipe.png": "not_a_file",
            "huge.png": "file_too_large"}


def _night(archive: Path, model: Path, out: Path, run: str) -> dict:
    return score(ScoreConfig(archives=[str(archive)], model=str(model), out=str(out), run=run, explain=0))


def _all_rows(out: Path) -> pd.DataFrame:
    """Every row of every part under `out`, as written (no deduplication)."""
    return pd.concat([pd.read_parquet(p) for p in sorted(out.glob(f"*/{ledger.PARTS_DIR}/part-*.parquet"))])


def test_an_archive_with_broken_links_and_a_loop_scored_again_and_again_adds_no_row_and_reports_each_night(
        model, tmp_path):
    archive = tmp_path / "archive"
    synth.write_dataset(archive, per_class=2, size=96, seed=5)
    failing = _hostile_entries(archive)
    (archive / "not_an_image.png").write_bytes(b"plain text")  # read and refused: keyed by content, as before
    out = tmp_path / "out"

    first = _night(archive, model, out, "night1")
    assert first["files"] == 8 + len(failing) + 1 and first["errors"] == len(failing) + 1
    assert first["still_failing"] == 0
    again = _night(archive, model, out, "night1")  # the same night run again
    second = _night(archive, model, out, "night2")  # the next night
    rows = _all_rows(out)
    assert len(rows) == 8 + len(failing) + 1 and rows["path"].is_unique, rows["path"].value_counts().head()
    assert again["scored_this_time"] == second["scored_this_time"] == 0
    assert again["still_failing"] == second["still_failing"] == len(failing)

    for night, summary in (("night1", again), ("night2", second)):  # each night lists what still fails
        listed = pd.read_csv(out / night / "report" / "errors.csv")
        by_name = {os.path.relpath(p, archive): code for p, code in zip(listed["path"], listed["code"])}
        assert {name: by_name.get(name) for name in failing} == failing, night
        assert summary["error_codes"]["unreadable"] == 3 and summary["errors"] >= len(failing)
        assert "gone.png" in (out / night / "report" / "index.html").read_text()
        state = json.loads((out / night / "run.json").read_text())
        assert state["still_failing"] == len(failing) and state["skipped_already_scored"] == \
            state["found"] - state["scored_now"] - len(failing)
    assert not any((out / "night2" / ledger.PARTS_DIR).glob("part-*.parquet"))  # nothing new to commit

    synth.write_dataset(tmp_path / "new", per_class=1, size=96, seed=6)
    (archive / "missing.png").write_bytes(next((tmp_path / "new").rglob("*.png")).read_bytes())  # the link mended
    third = _night(archive, model, out, "night3")
    night3 = read_predictions(out / "night3").set_index("path")
    assert night3.loc[str(archive / "gone.png"), "status"] == "ok" and third["still_failing"] == len(failing) - 1
