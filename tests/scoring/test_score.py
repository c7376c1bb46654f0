"""Archive scoring without a cluster: discovery, ledger, the read stage, labels, exit codes."""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from tests.badfiles import (
    dicom_bytes,
    dicom_raw_values,
    write_bad_files,
    write_good_files,
)
from xray_ray.cli import app
from xray_ray.files import sha256_hex
from xray_ray.images.preprocess import decode_and_preprocess
from xray_ray.scoring import archive, ledger
from xray_ray.scoring.pipeline import pack, read_and_prepare, unpack


def _walk(root: Path, **kwargs) -> dict[str, str]:
    return {os.path.relpath(found.path, root): found.error for found in archive.walk(root, **kwargs)}


def test_walk_streams_images_by_extension_or_dicom_marker(tmp_path):
    deep = tmp_path / "2024" / "03" / "ward b"
    deep.mkdir(parents=True)
    (deep / "scan0001").write_bytes(dicom_bytes(dicom_raw_values()))  # DICOM without extension: found by DICM
    (deep / "notes").write_bytes(b"plain text without an extension, long enough " * 10)
    (deep / "report.txt").write_text("not an image")
    (deep / "X.PNG").write_bytes(b"upper-case extension")
    (tmp_path / ".hidden.png").write_bytes(b"hidden")
    (tmp_path / "a.jpeg").write_bytes(b"jpeg by name")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.png").write_bytes(b"inside the excluded output folder")

    walker = archive.walk(tmp_path, exclude=[tmp_path / "out"])
    assert inspect.isgenerator(walker)  # streamed: no list of the whole archive
    assert next(walker).path == str(tmp_path / "a.jpeg")  # a folder's files, then its subfolders, in name order
    assert _walk(tmp_path, exclude=[tmp_path / "out"]) == {
        "2024/03/ward b/X.PNG": "", "2024/03/ward b/scan0001": "", "a.jpeg": ""}


def test_walk_reports_symlink_loops_and_unreadable_folders_as_errors(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "ok.png").write_bytes(b"x")
    (tmp_path / "sub" / "up").symlink_to("..")  # a folder loop
    (tmp_path / "self.png").symlink_to("self.png")  # a file link pointing to itself
    (tmp_path / "gone.png").symlink_to("missing.png")
    found = _walk(tmp_path)
    assert found["sub/ok.png"] == ""
    assert "symlink loop" in found["sub/up"]
    assert found["self.png"].startswith("unreadable file: Too many levels of symbolic links")
    assert found["gone.png"] == "unreadable file: No such file or directory"
    assert len(found) == 4  # the loop was not walked again
    if os.geteuid() != 0:  # root reads any folder
        (tmp_path / "locked").mkdir(mode=0o000)
        assert _walk(tmp_path)["locked"] == "unreadable folder: Permission denied"


def test_class_folder_labels_and_labels_csv(tmp_path):
    root = str(tmp_path)
    assert archive.class_folder_label(f"{root}/viral_pneumonia/images/x.png", root) == "Viral Pneumonia"
    assert archive.class_folder_label(f"{root}/2024/COVID/x.png", root) == "COVID"
    assert archive.class_folder_label(f"{root}/2024/x.png", root) is None
    csv = tmp_path / "labels" / "truth.csv"
    csv.parent.mkdir()
    csv.write_text("file_path,label\n../a.png,lung opacity\n/abs/b.png,Normal\n")
    assert archive.read_labels(csv) == {str(tmp_path / "a.png"): "Lung_Opacity", "/abs/b.png": "Normal"}
    csv.write_text("path,label\na.png,Pneumothorax\n")
    with pytest.raises(ValueError, match="unknown label 'Pneumothorax'"):
        archive.read_labels(csv)


def test_known_keys_and_ledger_reconcile(tmp_path):
    digests = [sha256_hex(bytes([i])) for i in range(50)]
    known = ledger.KnownKeys(digests[:25])
    assert all(d in known for d in digests[:25]) and not any(d in known for d in digests[25:])
    assert ledger.row_key("", "/a.png") != ledger.row_key("", "/b.png")  # unreadable files: keyed by path (and code)

    part = tmp_path / "night1" / ledger.PARTS_DIR / "part-00001.parquet"
    part.parent.mkdir(parents=True)
    pd.DataFrame({"path": ["/a.png", "/b.png"], "sha256": [digests[0], ""], "model_version": "v1",
                  "status": ["ok", "error"], "scored_at": pd.Timestamp.now(tz="UTC")}).to_parquet(part)
    assert len(ledger.known_keys(tmp_path, "v1")) == 0  # a part committed, its ledger entry not yet written
    assert ledger.repair(tmp_path).rebuilt == 1 and ledger.repair(tmp_path).rebuilt == 0
    keys = ledger.known_keys(tmp_path, "v1")
    assert digests[0] in keys and ledger.row_key("", "/b.png") in keys and len(keys) == 2  # unread: path and code
    assert len(ledger.known_keys(tmp_path, "v2")) == 0


def test_read_stage_hashes_decodes_and_skips_known_files(tmp_path):
    bad = write_bad_files(tmp_path / "bad")
    good = write_good_files(tmp_path / "good")
    paths = [str(tmp_path / "bad" / n) for n in bad] + [str(tmp_path / "good" / n) for n in good]
    batch = {"path": np.array(paths + ["/nowhere"], dtype=object),
             "error": np.array([""] * len(paths) + ["unreadable folder: Permission denied"], dtype=object)}
    rows = read_and_prepare(batch, 48, ledger.KnownKeys([]))
    by_path = dict(zip(rows["path"], zip(rows["status"], rows["error_reason"])))
    for name, reason in bad.items():
        assert by_path[str(tmp_path / "bad" / name)][0] == "error" and reason in by_path[str(tmp_path / "bad" / name)][1]
    assert all(by_path[str(tmp_path / "good" / n)] == ("ok", "") for n in good)
    assert by_path["/nowhere"] == ("error", "unreadable folder: Permission denied")
    gray = tmp_path / "good" / "gray8.png"
    at = list(rows["path"]).index(str(gray))
    expected = decode_and_preprocess(gray.read_bytes(), 48)
    assert np.array_equal(unpack(rows["pixels"][at:at + 1])[0], expected)  # packing loses nothing
    assert np.array_equal(unpack(pack(expected)[np.newaxis])[0], expected)
    assert rows["size"][at] == gray.stat().st_size and rows["sha256"][at] == sha256_hex(gray.read_bytes())

    known = ledger.KnownKeys([ledger.row_key(s, p) for s, p in zip(rows["sha256"], rows["path"])][:5])
    again = read_and_prepare(batch, 48, known)
    assert len(again["path"]) == len(paths) + 1 - 5 and not set(again["path"]) & set(rows["path"][:5])


def _cli(*args: str):
    return CliRunner().invoke(app, ["score", *args])


@pytest.mark.timeout(900)  # the compact model fixture trains on a local Ray once per session
def test_exit_codes_for_bad_configuration_model_and_archive(tmp_path, compact_model_folder):
    archive_dir = tmp_path / "archive"
    archive_dir.mkdir()
    out = str(tmp_path / "out")
    model = str(compact_model_folder)
    cases = [
        (["--archive", str(tmp_path / "missing"), "--model", model, "--out", out], 4, "archive folder not found"),
        (["--archive", str(archive_dir), "--model", str(tmp_path), "--out", out], 3, "model_card.json is missing"),
        (["--archive", str(archive_dir), "--model", model, "--out", out, "--batch-size", "0"], 2, "score.batch_size"),
        (["--archive", str(archive_dir), "--model", model, "--out", out, "--review-threshold", "2"], 2, "between 0"),
        (["--archive", str(archive_dir), "--model", model, "--out", out, "--labels", "nope.csv"], 2, "--labels"),
        (["--archive", str(archive_dir), "--out", out], 2, "(--model, score.model) or a registry"),
        (["--archive", str(archive_dir), "--registry", str(tmp_path / "reg"), "--out", out], 3,
         "has no current model: promote one first"),
        (["--archive", str(archive_dir), "--model", model, "--registry", str(tmp_path), "--out", out], 2,
         "score.model or score.registry, not both"),
        (["--archive", str(archive_dir), "--model", model, "--out", out, "--backend", "spark"], 2,
         "score.backend must be one of"),
        (["--archive", str(archive_dir), "--model", model, "--out", out, "--expect-version", "other"], 3,
         "not the expected 'other'"),
        # The session's Ray has 2 CPUs: two 1-CPU actors would leave none for reading, and the job would hang.
        (["--archive", str(archive_dir), "--model", model, "--out", out, "--actors", "2", "--cpus-per-actor", "1"], 2,
         "need 2.5 CPU; the cluster has 2 CPU"),
        (["--archive", str(archive_dir), "--model", model, "--out", out, "--gpus-per-actor", "1"], 2,
         "asks for 1 GPU but the cluster has 0"),
    ]
    for args, code, message in cases:
        result = _cli(*args)
        assert result.exit_code == code, (args, result.output)
        assert message in result.output
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in compact_model_folder.iterdir():
        (broken / item.name).write_bytes(item.read_bytes())
    (broken / "model.onnx").write_bytes(b"corrupt")
    result = _cli("--archive", str(archive_dir), "--model", str(broken), "--out", out, "--engine", "onnxruntime")
    assert result.exit_code == 3 and "corrupt or was replaced" in result.output
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("*/run.json"))


@pytest.fixture(scope="module")
def compact_model_folder(compact_model) -> Path:
    return compact_model[0]


def test_archive_root_that_cannot_be_listed(tmp_path):
    with pytest.raises(archive.ArchiveError, match="not found"):
        archive.check_root(tmp_path / "missing")
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(archive.ArchiveError, match="not a folder"):
        archive.check_root(tmp_path / "file.png")
