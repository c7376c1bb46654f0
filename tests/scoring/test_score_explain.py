"""Heat maps in the scoring report: capped, shared across the review groups, named by content hash."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from xray_ray.config import CLASS_NAMES
from xray_ray.files import sha256_file
from xray_ray.images import synth
from xray_ray.scoring.explain import EXPLAIN_DIR, pick
from xray_ray.config_services import ScoreConfig
from xray_ray.scoring.run import score

PATIENT = "DOE_JANE_1961-04-02"


def test_pick_takes_each_group_in_turn_up_to_the_limit_one_per_content():
    rows = pd.DataFrame({"why": ["low confidence"] * 5 + ["most confident COVID"] * 2 + ["most confident Normal"] * 2,
                         "sha256": ["a", "b", "c", "d", "e", "f", "a", "g", "h"]})
    assert pick(rows, 5)["sha256"].tolist() == ["a", "f", "g", "b", "h"]  # "a" again (a duplicate file) is skipped
    assert pick(rows, 100)["sha256"].tolist() == ["a", "f", "g", "b", "h", "c", "d", "e"]
    assert pick(rows, 0).empty and list(pick(rows, 0).columns) == ["why", "sha256"]


@pytest.mark.timeout(900)
def test_report_shows_capped_heat_maps_named_by_content_hash(compact_model, ray_local, tmp_path):
    archive = tmp_path / "archive"
    synth.write_dataset(archive, per_class=4, size=96, seed=8)
    renamed = archive / "Lung_Opacity" / "images" / f"{PATIENT}.png"  # a patient's name in the file name
    shutil.move(archive / "Lung_Opacity" / "images" / "Lung_Opacity-1.png", renamed)
    summary = score(ScoreConfig(archives=[str(archive)], model=str(compact_model[0]), out=str(tmp_path / "out"),
                                 run="night", explain=6, top_n=3))
    report = tmp_path / "out" / "night" / "report"
    files = sorted((report / EXPLAIN_DIR).iterdir())
    assert summary["explanations"]["shown"] == 6 and len(files) == 12  # a thumbnail and a heat map each
    hashes = {sha256_file(p) for p in archive.rglob("*.png")}
    for path in files:
        assert re.fullmatch(r"[0-9a-f]{64}(-gradcam)?\.png", path.name) and path.name[:64] in hashes
        with Image.open(path) as image:
            assert max(image.size) <= 256 and image.mode == ("RGB" if "gradcam" in path.name else "L")
    page = (report / "index.html").read_text()
    assert PATIENT not in "".join(p.name for p in files)
    shown = re.findall(r'<img src="(explain/[^"]+)"', page)
    assert sorted(shown) == sorted(f"{EXPLAIN_DIR}/{p.name}" for p in files)
    assert "Where the model looked" in page and "Grad-CAM" in page
    review = pd.read_csv(report / "review.csv")
    groups = {why for why in review["why"]}
    assert len(groups) > 1 and json.loads((report / "summary.json").read_text())["explanations"]["limit"] == 6

    again = score(ScoreConfig(archives=[str(archive)], model=str(compact_model[0]), out=str(tmp_path / "out2"),
                               run="night", explain=0))
    assert again["explanations"]["shown"] == 0 and not (tmp_path / "out2" / "night" / "report" / EXPLAIN_DIR).exists()
    assert set(CLASS_NAMES) >= set(review["predicted class"]) and np.isfinite(review["confidence"]).all()
