"""A night scored straight from a real PACS (Orthanc with its DICOMweb plugin), its SRs stored back (issue 29).

Two study dates of synthetic DX instances, each study with a frontal and a lateral view, one
study of a knee, and one study outside the dates, are stored in Orthanc. One scoring run over
the two dates must score every frontal instance, skip every other one with its reason, store
one SR per answer (and a heat-map capture per answer in distribution) in the study it
describes, and write the same SRs to `--sr-out`. The second night fetches and stores nothing.
A PACS that stops after the night's instances were listed leaves a row per instance it did not
send, and the next run completes them. An archive folder of DICOM and PNG files gets SRs for
its DICOM files only.
"""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tests.dicom_instances import dx_instance
from tests.dicom_validation import dciodvfy_errors
from tests.pacs_server import orthanc  # noqa: F401 - the fixture
from xray_ray.config import CLASS_NAMES
from xray_ray.config_services import ScoreConfig
from xray_ray.images import synth
from xray_ray.images.dicom_results import read_answer
from xray_ray.scoring.dicomweb import PacsClient
from xray_ray.scoring.pacs import PACS_UNREACHABLE
from xray_ray.scoring.preflight import ScoreError, check_run
from xray_ray.scoring.run import read_predictions, score

SLOW_FIXTURES = {"orthanc"}
DATES = ("20261201", "20261202")
SIZE = 96


def uid(*parts: int) -> str:
    return "1.2.826.0.1.3680043.10.1419." + ".".join(str(p) for p in parts)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> list[np.ndarray]:
    """Phantom radiographs as 12-bit planes, so the instances look like the model's training data."""
    root = tmp_path_factory.mktemp("phantoms")
    synth.write_dataset(root, per_class=2, size=SIZE, seed=21)
    return [(np.asarray(Image.open(p).convert("L"), np.uint16) * 16) for p in sorted(root.glob("*/images/*.png"))]


@pytest.fixture(scope="module")
def night(orthanc, phantoms, tmp_path_factory):  # noqa: F811 - the fixture imported above
    """The PACS filled with the night's studies; returns (client, credentials file, expected instances)."""
    folder = tmp_path_factory.mktemp("pacs-night")
    credentials = orthanc.credentials_file(folder)
    client = PacsClient(orthanc.dicomweb_url, str(credentials))
    expected = {"frontal": [], "lateral": [], "knee": [], "other_date": []}
    instances, n = [], 0
    for d, date in enumerate((*DATES, "20261203")):
        for s in range(2):
            study = uid(1, d, s)
            kinds = [("frontal", "PA", "CHEST"), ("lateral", "LL", "CHEST")] if s == 0 else [("knee", "AP", "KNEE")]
            for k, (kind, view, part) in enumerate(kinds):
                n += 1
                sop = uid(3, d, s, k)
                instances.append(dx_instance(study, uid(2, d, s, k), sop, date, view, body_part=part, size=SIZE,
                                             pixels=phantoms[n % len(phantoms)]))
                expected["other_date" if date not in DATES else kind].append(sop)
    client.store(instances)
    return client, credentials, expected


def run(client_url: str, credentials: Path, out: Path, name: str, **options) -> dict:
    settings = ScoreConfig(pacs=client_url, study_date="-".join(DATES), pacs_credentials=str(credentials),
                           out=str(out), run=name, **options)
    return score(settings, check_run(settings))


def sop_of(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


@pytest.mark.timeout(600)
def test_a_night_from_the_pacs_scores_frontal_views_and_stores_one_sr_each(night, orthanc, compact_model,  # noqa: F811
                                                                            ray_local, tmp_path):
    client, credentials, expected = night
    out, sr_out = tmp_path / "scores", tmp_path / "sr"
    summary = run(orthanc.dicomweb_url, credentials, out, "night1", model=str(compact_model[0]), pacs_store=True,
                  sr_out=str(sr_out), sr_heatmaps=True)
    rows = read_predictions(out / "night1")
    by_sop = {sop_of(path): row for path, row in zip(rows["path"], rows.to_dict("records"))}
    assert set(by_sop) == set(expected["frontal"] + expected["lateral"] + expected["knee"])  # not the other date
    assert {by_sop[s]["status"] for s in expected["frontal"]} == {"ok"}
    assert {(by_sop[s]["status"], by_sop[s]["error_code"]) for s in expected["lateral"]} == {("skipped", "lateral_view")}
    assert {(by_sop[s]["status"], by_sop[s]["error_code"]) for s in expected["knee"]} == {("skipped", "not_chest")}
    pacs = summary["pacs"]
    assert pacs["selected"] == len(expected["frontal"]) == summary["scored"]
    assert pacs["skipped"] == {"lateral_view": len(expected["lateral"]), "not_chest": len(expected["knee"])}
    results = summary["dicom_results"]
    assert results["sr_stored"] == results["sr_written"] == len(expected["frontal"])
    page = (out / "night1" / "report" / "index.html").read_text()
    assert "PACS and DICOM results" in page and "lateral_view" in page

    # Each SR is in the study it describes, found there by QIDO, and says what the row says.
    for sop in expected["frontal"]:
        row = by_sop[sop]
        study = row["path"].split("/studies/")[1].split("/")[0]
        found = client.search_instances(study, modality="SR")
        assert len(found) == 1
        stored = client.retrieve(study, *found[0], max_bytes=2**24)
        answer = read_answer(stored)
        assert answer["source_sop_instance_uid"] == sop and answer["study_instance_uid"] == study
        assert answer["predicted_label"] == row["predicted_label"] in CLASS_NAMES
        assert answer["model_version"] == row["model_version"]
        assert answer["out_of_distribution"] == bool(row["out_of_distribution"])
        for name in CLASS_NAMES:
            assert answer["probabilities"][name] == pytest.approx(row["prob_" + name.replace(" ", "_")], abs=1e-6)
    written = sorted(sr_out.rglob("*.dcm"))
    assert len(written) == results["sr_written"] + results.get("sc_written", 0)
    for path in written:
        assert dciodvfy_errors(path) == [], path

    # The second night: nothing fetched again, nothing stored again.
    fetched_before, instances_before = orthanc.retrievals(), orthanc.instance_count()
    assert fetched_before >= len(expected["frontal"])  # the count sees the first night's retrievals
    again = run(orthanc.dicomweb_url, credentials, out, "night2", model=str(compact_model[0]), pacs_store=True)
    assert again["scored_this_time"] == 0 and again["skipped_already_scored"] == pacs["instances"]
    assert orthanc.retrievals() == fetched_before  # no WADO-RS retrieval
    assert orthanc.instance_count() == instances_before


@pytest.mark.timeout(600)
def test_a_pacs_that_stops_mid_night_leaves_a_row_per_instance_and_the_next_run_completes_them(
        night, orthanc, compact_model, ray_local, tmp_path):  # noqa: F811
    client, credentials, expected = night
    out = tmp_path / "scores"
    listed = out / "night" / ".work" / "files"

    def stop_once_listed():
        deadline = time.monotonic() + 120
        while not any(listed.glob("files-*.parquet")) and time.monotonic() < deadline:
            time.sleep(0.005)
        orthanc.kill()  # at once: a SIGTERM'd Orthanc takes about 2.5 s to exit, and fetches could slip in

    stopper = threading.Thread(target=stop_once_listed, daemon=True)
    stopper.start()
    try:
        first = run(orthanc.dicomweb_url, credentials, out, "night", model=str(compact_model[0]), pacs_timeout_s=5)
    finally:
        stopper.join()
        orthanc.restart()
    rows = read_predictions(out / "night")
    frontal = rows[rows["path"].map(sop_of).isin(expected["frontal"])]
    assert len(frontal) == len(expected["frontal"])  # every instance has its row: scored, or why not
    unfetched = frontal[frontal["status"] == "error"]
    assert len(unfetched) == len(frontal) and set(unfetched["error_code"]) <= {"pacs_unreachable", "pacs_timeout"}
    assert first["errors"] == len(unfetched)

    second = run(orthanc.dicomweb_url, credentials, out, "night", model=str(compact_model[0]))
    rows = read_predictions(out / "night")
    assert second["scored_this_time"] == len(unfetched)
    assert set(rows[rows["path"].map(sop_of).isin(expected["frontal"])]["status"]) == {"ok"}


def test_an_unreachable_pacs_stops_the_run_before_anything_with_its_own_exit_code(orthanc, tmp_path):  # noqa: F811
    credentials = orthanc.credentials_file(tmp_path)
    settings = ScoreConfig(pacs="http://127.0.0.1:9/dicom-web", study_date=DATES[0], pacs_credentials=str(credentials),
                           out=str(tmp_path / "out"), model=str(tmp_path))
    with pytest.raises(ScoreError) as refused:
        check_run(settings)
    assert refused.value.exit_code == PACS_UNREACHABLE == 6 and "cannot be reached" in str(refused.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("problem", ["missing", "open to others", "not JSON", "plain http off loopback"])
def test_a_credentials_file_that_cannot_be_used_is_a_configuration_error(problem, tmp_path):
    path, url = tmp_path / "pacs.json", "http://127.0.0.1:9/dicom-web"
    if problem != "missing":
        path.write_text("{" if problem == "not JSON" else '{"bearer": "t0ken"}')
        path.chmod(0o644 if problem == "open to others" else 0o600)
    if problem == "plain http off loopback":
        url = "http://pacs.example.org/dicom-web"
    settings = ScoreConfig(pacs=url, study_date=DATES[0], pacs_credentials=str(path), out=str(tmp_path / "out"),
                           model=str(tmp_path))
    with pytest.raises(ScoreError) as refused:
        check_run(settings)
    assert refused.value.exit_code == 2 and str(path if problem != "plain http off loopback" else "https") in str(
        refused.value)
    assert "t0ken" not in str(refused.value)


@pytest.mark.timeout(600)
def test_an_archive_folder_gets_srs_for_its_dicom_files_only(compact_model, ray_local, phantoms, tmp_path):
    archive = tmp_path / "archive"
    archive.mkdir()
    for i in range(2):
        (archive / f"study-{i}.dcm").write_bytes(dx_instance(uid(7, i), uid(8, i), uid(9, i), DATES[0], "PA",
                                                             size=SIZE, pixels=phantoms[i]))
        Image.fromarray((phantoms[i] // 16).astype(np.uint8)).save(archive / f"image-{i}.png")
    sr_out = tmp_path / "sr"
    settings = ScoreConfig(archives=[str(archive)], model=str(compact_model[0]), out=str(tmp_path / "out"),
                           run="night", sr_out=str(sr_out), explain=0)
    summary = score(settings, check_run(settings))
    written = sorted(sr_out.rglob("*.dcm"))
    assert summary["scored"] == 4 and summary["dicom_results"]["not_dicom"] == 2 and len(written) == 2
    assert {read_answer(p.read_bytes())["source_sop_instance_uid"] for p in written} == {uid(9, 0), uid(9, 1)}
    assert all(dciodvfy_errors(p) == [] for p in written)
    assert "2 answered images were not DICOM" in (tmp_path / "out" / "night" / "report" / "index.html").read_text()
    next_night = replace(settings, run="next-night")  # a night with nothing new: an empty report, no new SR
    again = score(next_night, check_run(next_night))
    assert again["scored_this_time"] == 0 and again["scored"] == 0 and sorted(sr_out.rglob("*.dcm")) == written
    assert pd.read_parquet(next((tmp_path / "out" / "night" / "predictions").glob("*.parquet"))).shape[0] == 4
