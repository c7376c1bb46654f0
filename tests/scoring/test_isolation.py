"""One file's or one batch's failure stays its own row; scoring stays inside the archive; a damaged ledger repairs itself.

All without Ray: the read stage, the Scorer, the archive walk and the ledger are called directly.
"""

from __future__ import annotations

import json
import os
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.badfiles import write_good_files
from xray_ray.config import CLASS_NAMES
from xray_ray.config_services import ScoreConfig
from xray_ray.scoring import archive, ledger, pipeline
from xray_ray.scoring.preflight import ModelInfo, ScoreError, model_info
from xray_ray.scoring.pipeline import PREDICTION_COLUMNS, Scorer, read_and_prepare
from xray_ray.scoring.run import _write_part, read_predictions, run_folder

SIZE = 32


def _batch(paths, errors=None, codes=None) -> dict:
    n = len(paths)
    return {"path": np.array([str(p) for p in paths], dtype=object),
            "error": np.array(errors or [""] * n, dtype=object), "code": np.array(codes or [""] * n, dtype=object)}


def _rows(prepared: dict) -> dict[str, tuple[str, str]]:
    return {Path(p).name: (s, c) for p, s, c in zip(prepared["path"], prepared["status"], prepared["error_code"])}


# --- any exception for one file is that file's row ---------------------------------------


def test_any_exception_while_reading_or_decoding_one_file_is_that_files_error_row(tmp_path, monkeypatch):
    good = write_good_files(tmp_path)
    names = sorted(good)
    real_read, real_prepare = pipeline.read_bytes, pipeline.decode_and_preprocess
    failures = {names[0]: ("read", KeyError("boom")), names[1]: ("decode", MemoryError()),
                names[2]: ("decode", RuntimeError("a bug \x00 with control characters")),
                names[3]: ("read", OSError(5, "Input/output error"))}

    def read_bytes(path, limits):
        stage, exc = failures.get(Path(path).name, (None, None))
        if stage == "read":
            raise exc
        return real_read(path, limits)

    def decode_and_preprocess(data, size, limits):
        for name, (stage, exc) in failures.items():
            if stage == "decode" and data == (tmp_path / name).read_bytes():
                raise exc
        return real_prepare(data, size, limits)

    monkeypatch.setattr(pipeline, "read_bytes", read_bytes)
    monkeypatch.setattr(pipeline, "decode_and_preprocess", decode_and_preprocess)
    prepared = read_and_prepare(_batch([tmp_path / n for n in names]), SIZE, ledger.KnownKeys([]))
    rows = _rows(prepared)
    assert len(rows) == len(names)
    assert rows[names[0]] == ("error", "internal_error:KeyError")
    assert rows[names[1]] == ("error", "internal_error:MemoryError")
    assert rows[names[2]] == ("error", "internal_error:RuntimeError")
    assert rows[names[3]] == ("error", "internal_error:OSError")
    reasons = dict(zip(prepared["path"], prepared["error_reason"]))
    assert reasons[str(tmp_path / names[2])].startswith("RuntimeError: a bug") and "\x00" not in "".join(reasons.values())
    assert all(rows[n] == ("ok", "") for n in names[4:])
    assert prepared["pixels"].shape == (len(names), SIZE, SIZE)


def test_walk_errors_keep_their_code(tmp_path):
    prepared = read_and_prepare(_batch(["/x/a.png", "/x/b.png"], ["symlink leads outside", "unreadable folder"],
                                       ["outside_archive", ""]), SIZE, ledger.KnownKeys([]))
    assert list(prepared["error_code"]) == ["outside_archive", "unreadable"]


# --- a failing model call: retried once, then its files are error rows --------------------


class FlakyScorer(Scorer):
    """Fails its first `failures` calls, then answers uniform probabilities."""

    def __init__(self, failures: int):
        self.failures, self.calls = failures, 0

    def predict(self, inputs):
        self.calls += 1
        if self.calls <= self.failures:
            raise RuntimeError("CUDA error: device lost")
        n = len(inputs)
        return {"probabilities": np.full((n, len(CLASS_NAMES)), 0.25), "ood_score": np.zeros(n),
                "out_of_distribution": np.zeros(n, bool), "model_version": "v1", "engine": "fake"}

    def describe(self):
        return "v1", "fake"


def _prepared_batch(tmp_path) -> dict:
    write_good_files(tmp_path)
    (tmp_path / "broken.png").write_bytes(b"not an image at all")
    paths = [tmp_path / "gray8.png", tmp_path / "rgb.jpg", tmp_path / "broken.png"]
    return read_and_prepare(_batch(paths), SIZE, ledger.KnownKeys([]))


def test_a_model_call_that_fails_once_is_retried(tmp_path):
    scorer = FlakyScorer(failures=1)
    rows = scorer(_prepared_batch(tmp_path))
    assert scorer.calls == 2 and list(rows["status"]) == ["ok", "ok", "error"]
    assert list(rows["error_code"]) == ["", "", "not_an_image"]


def test_a_model_call_that_fails_twice_makes_its_files_model_failed_rows(tmp_path):
    scorer = FlakyScorer(failures=2)
    rows = scorer(_prepared_batch(tmp_path))
    assert scorer.calls == 2 and list(rows["status"]) == ["error"] * 3
    assert list(rows["error_code"]) == ["model_failed", "model_failed", "not_an_image"]
    assert "CUDA error" in rows["error_reason"][0] and list(rows["predicted_label"]) == [""] * 3
    assert np.isnan(rows["prob_COVID"]).all() and list(rows["model_version"]) == ["v1"] * 3


# --- scoring stays inside the archive ---------------------------------------------------


def _walk(root: Path, **kwargs) -> dict[str, tuple[str, str]]:
    return {os.path.relpath(f.path, root): (f.code, f.error) for f in archive.walk(root, **kwargs)}


def test_links_leading_outside_the_archive_are_outside_archive_rows_unless_followed(tmp_path):
    root, elsewhere, other_root = tmp_path / "archive", tmp_path / "elsewhere", tmp_path / "second_archive"
    for folder in (root / "in", elsewhere / "sub", other_root):
        folder.mkdir(parents=True)
    for file in (root / "in" / "a.png", elsewhere / "secret.png", elsewhere / "sub" / "deep.png", other_root / "b.png"):
        file.write_bytes(b"x")
    (elsewhere / "notes.txt").write_text("x")
    (root / "inside_link.png").symlink_to(root / "in" / "a.png")
    (root / "outside.png").symlink_to(elsewhere / "secret.png")
    (root / "outside_folder").symlink_to(elsewhere / "sub")
    (root / "scan0001").symlink_to(elsewhere / "secret.png")  # no extension: reported, never opened to sniff
    (root / "notes.txt").symlink_to(elsewhere / "notes.txt")  # not an image name: ignored
    (root / "other_archive.png").symlink_to(other_root / "b.png")
    (root / "zero.png").symlink_to("/dev/zero")

    found = _walk(root, roots=[other_root])
    outside = {name for name, (code, _) in found.items() if code == "outside_archive"}
    assert outside == {"outside.png", "outside_folder", "scan0001", "zero.png"}
    assert found["inside_link.png"] == found["in/a.png"] == found["other_archive.png"] == ("", "")
    assert "notes.txt" not in found and "outside_folder/deep.png" not in found

    followed = _walk(root, roots=[other_root], follow_symlinks=True)
    assert {n for n, (code, _) in followed.items() if code} == set()
    assert {"outside.png", "outside_folder/deep.png", "zero.png"} <= followed.keys()


def test_the_output_folder_is_never_walked_whatever_it_is_called(tmp_path):
    root = tmp_path / "archive"
    (root / "out" / "2024-01-01").mkdir(parents=True)
    (root / "out" / "2024-01-01" / "old.png").write_bytes(b"x")
    (root / "a.png").write_bytes(b"x")
    (root / "results").symlink_to(root / "out")  # the same folder under another name
    link_to_out = tmp_path / "out_link"
    link_to_out.symlink_to(root / "out")
    for exclude in (root / "out", link_to_out):  # --out given as the folder or as a link to it
        assert set(_walk(root, exclude=[exclude])) == {"a.png"}


def test_a_named_pipe_without_extension_is_not_opened_by_the_walk(tmp_path):
    os.mkfifo(tmp_path / "scan0002")
    os.mkfifo(tmp_path / "pipe.png")
    assert _walk(tmp_path) == {"pipe.png": ("", "")}  # found by name; read_bytes refuses it (not_a_file)


# --- --expect-version --------------------------------------------------------------------


def test_expect_version_refuses_another_model_version(tmp_path, monkeypatch):
    from xray_ray.scoring import preflight

    monkeypatch.setattr(preflight, "_card_info", lambda folder, engine: ModelInfo("compact-v2", "onnxruntime", 64))
    options = ScoreConfig(archives=[str(tmp_path)], out=str(tmp_path / "out"), model=str(tmp_path))
    assert model_info(options).version == "compact-v2"
    options.expect_version = "compact-v1"
    with pytest.raises(ScoreError, match="version 'compact-v2', not the expected 'compact-v1'") as caught:
        model_info(options)
    assert caught.value.exit_code == 3


def test_a_model_folder_that_cannot_answer_is_refused_before_ray_starts(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from xray_ray.cli import app, services

    sessions = []
    monkeypatch.setattr(services, "ray_session", lambda *args, **kwargs: sessions.append(args) or nullcontext())
    (tmp_path / "archive").mkdir()
    result = CliRunner().invoke(app, ["score", "--archive", str(tmp_path / "archive"), "--out", str(tmp_path / "out"),
                                      "--model", str(tmp_path / "no-such-model")])
    assert result.exit_code == 3 and "no-such-model" in result.output
    assert not sessions  # no Ray session was opened for a run that could not begin
    assert not (tmp_path / "out").exists()


# --- a ledger that survives power losses --------------------------------------------------


def _prediction_rows(paths: list[str], version: str = "v1", codes: list[str] | None = None,
                     unread: tuple[str, ...] = ()) -> pd.DataFrame:
    """Rows as the pipeline makes them: a content hash, except for files never read (`unread` codes)."""
    codes = codes or [""] * len(paths)
    hashes = ["" if c in unread else ledger.row_key("", p) for p, c in zip(paths, codes)]
    frame = pd.DataFrame({"path": paths, "sha256": hashes, "size": 10,
                          "predicted_label": "Normal", "model_version": version, "engine": "fake",
                          "scored_at": pd.Timestamp.now(), "status": ["error" if c else "ok" for c in codes],
                          "error_code": codes, "error_reason": codes, "ood_score": 0.0, "out_of_distribution": False})
    for column in pipeline.PROBABILITY_COLUMNS.values():
        frame[column] = 0.25
    return frame[PREDICTION_COLUMNS]


def _commit_three_parts(out: Path) -> Path:
    folder = out / "night1"
    for n in range(3):
        _write_part(folder, out, [_prediction_rows([f"/a/{n}-{i}.png" for i in range(4)])])
    return folder


def _keys(out: Path) -> set[str]:
    return {p.hex() for p in ledger.known_keys(out, "v1").keys.tolist()}


def test_damaged_parts_and_ledger_files_are_quarantined_and_rebuilt(tmp_path, caplog):
    out = tmp_path / "out"
    folder = _commit_three_parts(out)
    parts = sorted((folder / "predictions").glob("part-*.parquet"))
    entries = sorted((out / "ledger").glob("*.parquet"))
    key_of = {p: {ledger.row_key("", path) for path in pd.read_parquet(p)["path"]} for p in parts}
    assert _keys(out) == set().union(*key_of.values())

    parts[0].write_bytes(b"")  # power loss: an empty part (its files must be scored again)
    entries[1].write_bytes(bytes(entries[1].stat().st_size))  # a zeroed ledger file (rebuilt from its part)
    with open(entries[2], "r+b") as file:  # a truncated ledger file
        file.truncate(entries[2].stat().st_size // 2)
    (folder / "predictions" / ".part-00004.parquet.abc.tmp").write_bytes(b"half")  # an interrupted write
    orphan = out / "ledger" / "night0--part-00001.parquet"
    orphan.write_bytes(entries[0].read_bytes())  # a ledger file whose part is gone

    done = ledger.repair(out)
    assert (done.quarantined, done.rebuilt, done.temp_removed) == (5, 2, 1)
    assert _keys(out) == key_of[parts[1]] | key_of[parts[2]]  # committed and intact: still known
    quarantined = sorted(p.relative_to(out / "quarantine").parts[0] for p in (out / "quarantine").rglob("*.parquet"))
    assert quarantined == ["ledger"] * 4 + ["night1"]
    assert "unreadable" in caplog.text and "moved to" in caplog.text
    assert len(read_predictions(folder)) == 8 and ledger.repair(out) == ledger.Repair()

    _write_part(folder, out, [_prediction_rows([f"/a/0-{i}.png" for i in range(4)])])  # the next run rescoring
    assert _keys(out) == set().union(*key_of.values())


def test_a_part_damaged_inside_is_found_when_its_run_is_read_in_full(tmp_path):
    out = tmp_path / "out"
    folder = _commit_three_parts(out)
    part = sorted((folder / "predictions").glob("part-*.parquet"))[1]
    data = bytearray(part.read_bytes())
    footer = int.from_bytes(data[-8:-4], "little") + 8
    data[4:-footer] = bytes(len(data) - 4 - footer)  # the data pages zeroed, footer and schema intact
    part.write_bytes(bytes(data))
    assert ledger.repair(out).quarantined == 0  # the cheap check cannot see it
    assert ledger.repair(out, read_in_full=folder).quarantined == 2  # the part and its ledger file
    assert len(read_predictions(folder)) == 8


def test_files_the_model_or_our_code_failed_on_are_scored_again_and_unread_ones_keyed_by_path_and_code(tmp_path):
    out = tmp_path / "out"
    codes = ["", "not_an_image", "model_failed", "changed_while_read", "outside_archive", "internal_error:MemoryError"]
    _write_part(out / "night1", out, [_prediction_rows([f"/a/{c or 'ok'}.png" for c in codes], codes=codes,
                                                       unread=("changed_while_read", "outside_archive"))])
    unread = {ledger.row_key("", f"/a/{c}.png", c) for c in ("changed_while_read", "outside_archive")}
    assert _keys(out) == {ledger.row_key("", "/a/ok.png"), ledger.row_key("", "/a/not_an_image.png"), *unread}

    _write_part(out / "night1", out, [_prediction_rows(["/a/model_failed.png"])])  # the same run, run again
    rows = read_predictions(out / "night1")
    assert len(rows) == len(codes) and rows.set_index("path").loc["/a/model_failed.png", "status"] == "ok"


def test_a_damaged_run_file_takes_the_version_from_the_parts(tmp_path):
    out = tmp_path / "out"
    folder = _commit_three_parts(out)
    (folder / "run.json").write_bytes(bytes(100))
    assert run_folder(out, "night1", "v1") == folder
    assert run_folder(out, "night1", "v2") == out / "night1.2"
    (folder / "run.json").write_text(json.dumps({"model_version": "v1"}))
    assert run_folder(out, "night1", "v1") == folder


def test_the_output_folder_is_never_walked_even_through_another_path(tmp_path):
    """--out inside the archive is skipped by resolved path and by inode, also when reached through a link."""
    archive_root = tmp_path / "archive"
    write_good_files(archive_root)
    out = archive_root / "scores"
    write_good_files(out / "report")
    (archive_root / "link_to_scores").symlink_to(out)
    found = [f.path for f in archive.walk(archive_root, exclude=[archive_root / "link_to_scores"])]
    assert found and not any("/scores/" in p or "/link_to_scores/" in p for p in found)
