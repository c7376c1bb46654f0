"""Indexing a dataset folder: layouts, labels, bad files as rows, and the real sample set."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest
from typer.testing import CliRunner

from tests.badfiles import write_bad_files
from xray_ray.cli import app
from xray_ray.config import CLASS_NAMES
from xray_ray.files import sha256_hex
from xray_ray.images import index as indexing

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def messy_root(phantom_root, tmp_path_factory):
    """The phantom tree, with bad files in one class, a masks folder, and a folder that is no class."""
    root = tmp_path_factory.mktemp("messy")
    shutil.copytree(phantom_root, root, dirs_exist_ok=True)
    bad = write_bad_files(root / "COVID" / "images")
    (root / "COVID" / "masks").mkdir()
    shutil.copy(next((root / "Normal" / "images").iterdir()), root / "COVID" / "masks" / "mask-1.png")
    (root / "Pneumothorax").mkdir()
    (root / "README.md.txt").write_text("root files are not images")
    return root, bad


def test_discover_current_layout_ignores_masks_and_reports_unknown(messy_root):
    root, bad = messy_root
    found = indexing.discover(root)
    labels = pd.Series([label for _, label in found.files]).value_counts().to_dict()
    assert labels == {"COVID": 12 + len(bad), "Lung_Opacity": 12, "Normal": 12, "Viral Pneumonia": 12}
    assert not any("/masks/" in path for path, _ in found.files)
    assert found.unknown_folders == ["Pneumothorax"]


def test_discover_older_flat_layout_with_loose_folder_names(tmp_path, phantom_root):
    for label, folder in zip(CLASS_NAMES, ["covid", "lung opacity", "NORMAL", "viral_pneumonia"]):
        shutil.copytree(phantom_root / label / "images", tmp_path / folder)
    found = indexing.discover(tmp_path)
    assert sorted({label for _, label in found.files}) == sorted(CLASS_NAMES)
    assert len(found.files) == 48 and found.unknown_folders == []


@pytest.mark.parametrize("make", [lambda p: p / "missing", lambda p: p])
def test_discover_refuses_a_folder_without_classes(tmp_path, make):
    (tmp_path / "cats").mkdir()
    with pytest.raises((FileNotFoundError, ValueError), match="not found|no labelled images"):
        indexing.discover(make(tmp_path))


def test_index_keeps_bad_files_as_rows_with_reasons(ray_local, messy_root):
    root, bad = messy_root
    frame, _ = indexing.build_index(root)
    assert list(frame.columns) == indexing.INDEX_COLUMNS
    assert frame["path"].is_monotonic_increasing
    good = frame[frame["readable"]]
    assert len(good) == 48 and (good["width"] == 128).all() and (good["height"] == 128).all()
    broken = frame[~frame["readable"]].set_index(frame.loc[~frame["readable"], "path"].map(lambda p: p.rsplit("/", 1)[1]))
    assert set(broken.index) == set(bad)
    for name, reason in bad.items():
        assert reason in broken.loc[name, "error"], (name, broken.loc[name, "error"])
    sample = good.iloc[0]
    assert sample["sha256"] == sha256_hex(open(sample["path"], "rb").read())
    assert sample["bytes"] == len(open(sample["path"], "rb").read())


def test_save_load_and_fingerprint_survive_a_move(ray_local, phantom_root, tmp_path):
    frame, _ = indexing.build_index(phantom_root)
    indexing.save_index(frame, tmp_path / "index.parquet")
    loaded = indexing.load_index(tmp_path / "index.parquet")
    pd.testing.assert_frame_equal(loaded, frame, check_dtype=False)
    assert loaded.attrs["synthetic"] is True
    moved = loaded.assign(path="/elsewhere/" + loaded["path"].str.rsplit("/", n=1).str[1])
    assert indexing.fingerprint(moved) == indexing.fingerprint(frame)
    relabelled = loaded.assign(label=loaded["label"].iloc[::-1].to_numpy())
    assert indexing.fingerprint(relabelled) != indexing.fingerprint(frame)
    assert [p.name for p in tmp_path.iterdir()] == ["index.parquet"]  # no temp file left behind


def test_load_index_refuses_other_parquet(tmp_path):
    pd.DataFrame({"a": [1]}).to_parquet(tmp_path / "x.parquet")
    with pytest.raises(ValueError, match="missing columns"):
        indexing.load_index(tmp_path / "x.parquet")


def test_cli_prints_counts_and_unreadable(ray_local, messy_root, tmp_path):
    root, bad = messy_root
    result = CliRunner().invoke(app, ["index", str(root), "--out", str(tmp_path / "i.parquet")])
    assert result.exit_code == 0, result.output
    assert "Viral Pneumonia" in result.output and f"unreadable {len(bad):>7}".replace(" ", "") in result.output.replace(" ", "")
    assert "Pneumothorax" in result.output and (tmp_path / "i.parquet").is_file()


def test_cli_reports_a_missing_folder(tmp_path):
    result = CliRunner().invoke(app, ["index", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "not found" in result.output


def test_real_sample_set_is_fully_readable_with_its_labels(ray_local, real_root):
    frame, found = indexing.build_index(real_root)
    expected = pd.read_csv(real_root / "index.csv")
    assert len(frame) == len(expected) == 240 and frame["readable"].all(), frame.loc[~frame["readable"], "error"]
    got = dict(zip(frame["path"].map(lambda p: str(p).split(str(real_root) + "/", 1)[1]), frame["label"]))
    assert got == dict(zip(expected["file_path"], expected["label"]))
    assert found.unknown_folders == []
