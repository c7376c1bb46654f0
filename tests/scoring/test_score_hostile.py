"""`xray-ray score` on an archive of hostile files next to good ones: every file a row, exit 0, a code for each refusal.

The command runs as a user runs it (a separate process), on this session's Ray; a file
keeps being rewritten while the archive is scored.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from tests.badfiles import encode, gray8, write_good_files
from tests.helpers import REPO as ROOT
from tests.hostile import good_compressed_dicoms, rewriting, write_hostile_files
from xray_ray.images import synth
from xray_ray.scoring.run import read_predictions

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model(compact_model, ray_local) -> Path:
    return compact_model[0]


def _score(archive: Path, model: Path, out: Path, run: str, *extra: str) -> subprocess.CompletedProcess:
    import ray

    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}  # this session's Ray
    command = [sys.executable, "-m", "xray_ray.cli", "score", "--archive", str(archive), "--model", str(model),
               "--out", str(out), "--run", run, "--batch-size", "8", *extra]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)


@pytest.mark.timeout(900)
def test_hostile_archive_scores_every_good_file_and_gives_every_hostile_one_a_coded_row(model, tmp_path):
    archive = tmp_path / "archive"
    synth.write_dataset(archive / "phantoms", per_class=2, size=64, seed=3)
    good = set(write_good_files(archive / "good")) - {"dicom_no_preamble"}  # no extension, no DICM: not picked up
    (archive / "good" / "dicom_no_preamble").unlink()
    for name, (content, _) in good_compressed_dicoms().items():
        (archive / "good" / name).write_bytes(content)
        good.add(name)
    hostile = write_hostile_files(archive / "hostile")
    (tmp_path / "outside.png").write_bytes(encode(Image.fromarray(gray8(90, 80, seed=4)), "PNG"))  # its own content
    (archive / "hostile" / "link_outside.png").symlink_to(tmp_path / "outside.png")
    hostile["link_outside.png"] = "outside_archive"
    png = (archive / "good" / "gray8.png").read_bytes()
    out = archive / "scores"  # inside the archive: never scored itself

    with rewriting(archive / "hostile" / "changing.png", [png, png[: len(png) // 3], bytes(3000)]):
        result = _score(archive, model, out, "night1")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    rows = read_predictions(out / "night1")
    by_name = {os.path.relpath(p, archive): r for p, r in zip(rows["path"], rows.to_dict("records"))}
    expected_files = 8 + len(good) + len(hostile) + 1
    assert len(rows) == len(by_name) == expected_files, sorted(by_name)
    for name in good:
        assert by_name[f"good/{name}"]["status"] == "ok", (name, by_name[f"good/{name}"]["error_reason"])
    assert all(by_name[n]["status"] == "ok" for n in by_name if n.startswith("phantoms/"))
    for name, code in hostile.items():
        row = by_name[f"hostile/{name}"]
        assert row["status"] == "error" and row["error_code"] == code and row["error_reason"], (name, row)
    changing = by_name["hostile/changing.png"]
    assert changing["status"] == "ok" or changing["error_code"] in {
        "changed_while_read", "truncated", "not_an_image", "decode_failed"}, changing

    summary = json.loads((out / "night1" / "report" / "summary.json").read_text())
    errors = rows[rows["status"] == "error"]
    assert summary["files"] == expected_files and summary["errors"] == len(errors)
    assert summary["error_codes"] == errors["error_code"].value_counts().sort_index().to_dict()
    report_errors = pd.read_csv(out / "night1" / "report" / "errors.csv")
    assert len(report_errors) == len(errors) and report_errors["code"].notna().all()
    print(f"{len(rows)} rows, {len(rows) - len(errors)} scored, {len(errors)} errors: {summary['error_codes']}")
    print(result.stdout)

    followed = _score(archive, model, out, "night2", "--follow-symlinks")  # files never read are looked at again
    assert followed.returncode == 0, followed.stderr[-3000:]
    night2 = read_predictions(out / "night2").set_index("path")
    assert night2.loc[str(archive / "hostile" / "link_outside.png"), "status"] == "ok"
    assert night2.loc[str(archive / "hostile" / "dev_zero.png"), "error_code"] == "not_a_file"
