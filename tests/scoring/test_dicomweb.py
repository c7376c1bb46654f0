"""The PACS client (`scoring.dicomweb`) against a real Orthanc: QIDO-RS selection, WADO-RS bytes, STOW-RS stores,
the failures the scoring job turns into rows or a refused start, and the selection rules alone."""

from __future__ import annotations

import io
import json
import pickle

import numpy as np
import pydicom
import pytest
import requests
from dicomweb_client import DICOMwebClient
from pydicom.errors import InvalidDicomError

from tests.dicom_instances import dx_instance, dx_pixels
from tests.pacs_server import orthanc  # noqa: F401
from xray_ray.images.decode import decode
from xray_ray.scoring.dicomweb import (
    Candidate,
    PacsClient,
    PacsError,
    PacsUnreachable,
    SelectionRules,
    _single_part,
    instance_sop,
    instance_url,
    parse_instance_url,
    read_credentials,
)

ROOT = "1.2.826.0.1.3680043.8.498.4242"  # pydicom's UID root, a branch of our own
STUDY_1, STUDY_2, STUDY_3 = f"{ROOT}.1", f"{ROOT}.2", f"{ROOT}.3"
# sop: (study, series, date, view, body part, modality, seed, expected skip reason over 20261201-20261202)
INSTANCES = {
    f"{ROOT}.1.1.1": (STUDY_1, f"{ROOT}.1.1", "20261201", "PA", "CHEST", "DX", 1, ""),
    f"{ROOT}.1.1.2": (STUDY_1, f"{ROOT}.1.1", "20261201", "LL", "CHEST", "DX", 2, "lateral_view"),
    f"{ROOT}.2.1.1": (STUDY_2, f"{ROOT}.2.1", "20261202", "AP", "CHEST", "DX", 3, ""),
    f"{ROOT}.2.1.2": (STUDY_2, f"{ROOT}.2.1", "20261202", "", "CHEST", "DX", 4, ""),
    f"{ROOT}.2.1.3": (STUDY_2, f"{ROOT}.2.1", "20261202", "OBL", "CHEST", "DX", 5, "other_view"),
    f"{ROOT}.2.2.1": (STUDY_2, f"{ROOT}.2.2", "20261202", "PA", "HAND", "DX", 6, "not_chest"),
    f"{ROOT}.2.3.1": (STUDY_2, f"{ROOT}.2.3", "20261202", "PA", "CHEST", "CT", 7, "not_radiograph"),
    f"{ROOT}.3.1.1": (STUDY_3, f"{ROOT}.3.1", "20261203", "PA", "CHEST", "DX", 8, None),  # outside the range
}


def encoded(sop: str) -> bytes:
    study, series, date, view, body_part, modality, seed, _ = INSTANCES[sop]
    return dx_instance(study, series, sop, date, view, body_part=body_part, modality=modality, seed=seed)


@pytest.fixture(scope="module")
def pacs(orthanc, tmp_path_factory):  # noqa: F811
    """A client of the module's Orthanc, holding INSTANCES."""
    client = PacsClient(orthanc.dicomweb_url, str(orthanc.credentials_file(tmp_path_factory.mktemp("pacs"))))
    assert sorted(client.store([encoded(sop) for sop in INSTANCES])) == sorted(INSTANCES)
    return client


def test_find_instances_selects_frontal_chest_radiographs(pacs):
    found = list(pacs.find_instances("20261201-20261202", SelectionRules()))
    assert {c.sop_uid: c.skip_reason for c in found} == {
        sop: reason for sop, (*_, reason) in INSTANCES.items() if reason is not None}
    lateral = next(c for c in found if c.sop_uid == f"{ROOT}.1.1.2")
    assert lateral == Candidate(STUDY_1, f"{ROOT}.1.1", f"{ROOT}.1.1.2", "1.2.840.10008.5.1.4.1.1.1.1", "DX",
                                "CHEST", "LL", "20261201", "lateral_view")
    assert [c.sop_uid for c in pacs.find_instances("20261203", SelectionRules())] == [f"{ROOT}.3.1.1"]
    with pytest.raises(ValueError, match="YYYYMMDD"):
        next(pacs.find_instances("20261202-20261201", SelectionRules()))


def test_a_pacs_that_refuses_a_search_at_its_root_is_walked_study_by_study(pacs, monkeypatch):
    """Some PACS answer 400 to QIDO-RS /instances without a study: the same candidates come study by study."""
    expected = sorted(pacs.find_instances("20261201-20261202", SelectionRules()), key=lambda c: c.sop_uid)
    search = pacs.client.search_for_instances

    def refuse_at_root(study_instance_uid=None, *args, **kwargs):
        if study_instance_uid is None:
            response = requests.Response()
            response.status_code, response.reason = 400, "Bad Request"
            raise requests.HTTPError(response=response)
        return search(study_instance_uid, *args, **kwargs)

    monkeypatch.setattr(pacs.client, "search_for_instances", refuse_at_root)
    assert sorted(pacs.find_instances("20261201-20261202", SelectionRules()), key=lambda c: c.sop_uid) == expected


def test_retrieve_returns_the_stored_file(pacs):
    sop = f"{ROOT}.1.1.1"
    data = pacs.retrieve(*parse_instance_url(instance_url(pacs.url, Candidate(
        STUDY_1, f"{ROOT}.1.1", sop, "", "DX", "CHEST", "PA", "20261201", ""))), max_bytes=1 << 20)
    assert data == encoded(sop)
    ds = pydicom.dcmread(io.BytesIO(data))
    assert ds.SOPInstanceUID == sop
    np.testing.assert_array_equal(ds.pixel_array, dx_pixels(seed=1))


def test_retrieve_failures_have_codes(pacs):
    with pytest.raises(PacsError) as missing:
        pacs.retrieve(STUDY_1, f"{ROOT}.1.1", f"{ROOT}.1.1.9", max_bytes=1 << 20)
    assert missing.value.code == "pacs_not_found" and "404" in str(missing.value)
    with pytest.raises(PacsError) as large:
        pacs.retrieve(STUDY_1, f"{ROOT}.1.1", f"{ROOT}.1.1.1", max_bytes=1000)
    assert large.value.code == "file_too_large"


def test_a_file_stored_without_preamble_is_read_as_stored(pacs, orthanc):  # noqa: F811
    """The InvalidDicomError of `DICOMwebClient.retrieve_instance` (module docstring of scoring.dicomweb): its
    `store_instances` sends a dataset without preamble and "DICM", Orthanc keeps those bytes, and its own
    retrieval cannot read them back; `PacsClient.retrieve` hands them to the decoder, which reads them."""
    study, series, sop = f"{ROOT}.9", f"{ROOT}.9.1", f"{ROOT}.9.1.1"
    dataset = pydicom.dcmread(io.BytesIO(dx_instance(study, series, sop, "20250101", "PA", seed=9)))
    bare = pydicom.Dataset()  # what a program builds: no preamble, which `dcmwrite` then leaves out
    bare.update(dataset)
    bare.file_meta = dataset.file_meta
    library = DICOMwebClient(orthanc.dicomweb_url, session=pacs.session)
    library.store_instances([bare], study)
    with pytest.raises(InvalidDicomError):
        library.retrieve_instance(study, series, sop)
    data = pacs.retrieve(study, series, sop, max_bytes=1 << 20)
    assert data[:4] == b"\x02\x00\x00\x00"  # group 0002 straight away: no preamble
    assert decode(data).shape == (64, 64)
    with pytest.raises(ValueError, match="Part-10"):
        pacs.store([data])


def test_storing_twice_keeps_one_instance(pacs):
    sop = f"{ROOT}.1.1.1"
    assert pacs.store([encoded(sop)]) == [sop]
    assert [found for _, found in pacs.search_instances(STUDY_1, "DX")].count(sop) == 1
    assert pacs.search_instances(STUDY_1, "SR") == []


def test_a_refused_store_says_what_the_pacs_answered(pacs):
    dataset = pydicom.dcmread(io.BytesIO(encoded(f"{ROOT}.1.1.1")))
    del dataset.SOPInstanceUID
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    with pytest.raises(PacsError) as refused:
        pacs.store([buffer.getvalue()])
    assert refused.value.code == "store_refused" and "HTTP 400" in str(refused.value)


def test_the_client_pickles_its_settings_only(pacs):
    copy = pickle.loads(pickle.dumps(pacs))
    assert "session" not in copy.__dict__ and vars(copy) == {key: vars(pacs)[key] for key in vars(copy)}
    copy.check()


def test_a_wrong_password_is_refused_with_401(orthanc, tmp_path):  # noqa: F811
    client = PacsClient(orthanc.dicomweb_url, str(orthanc.credentials_file(tmp_path, password="wrong")))
    with pytest.raises(PacsError) as refused:
        client.check()
    assert not isinstance(refused.value, PacsUnreachable) and "401" in str(refused.value)


def test_a_stopped_pacs_is_unreachable(pacs, orthanc):  # noqa: F811
    orthanc.stop()
    try:
        with pytest.raises(PacsUnreachable) as unreachable:
            PacsClient(pacs.url, pacs.credentials_file, timeout_s=5).check()
        assert unreachable.value.code == "pacs_unreachable" and "Connection refused" in str(unreachable.value)
    finally:
        orthanc.restart()
    assert [sop for _, sop in pacs.search_instances(STUDY_3, "DX")] == [f"{ROOT}.3.1.1"]  # same storage after the restart


def test_credentials_files(tmp_path):
    path = tmp_path / "credentials.json"
    path.write_text(json.dumps({"bearer": "token-1"}))
    path.chmod(0o644)
    with pytest.raises(PacsError, match="mode 0644.*chmod 600"):
        read_credentials(str(path))
    path.chmod(0o600)
    assert read_credentials(str(path)) == {"Authorization": "Bearer token-1"}
    path.write_text(json.dumps({"basic": {"user": "u"}}))
    with pytest.raises(PacsError, match="neither") as bad:
        read_credentials(str(path))
    assert bad.value.code == "bad_credentials"
    with pytest.raises(PacsError, match="clear text"):
        PacsClient("http://pacs.example.org/dicom-web", str(path)).check()


def test_only_one_dicom_part_is_an_answer():
    part = b"--b\r\nContent-Type: application/dicom\r\nContent-Length: 4\r\n\r\nDICM\r\n"
    assert _single_part('multipart/related; type="application/dicom"; boundary="b"', part + b"--b--", "x") == b"DICM"
    assert _single_part("application/dicom", b"DICM", "x") == b"DICM"
    for content_type, body in [("text/html", b"<html>"), ("multipart/related; boundary=b", part + part + b"--b--"),
                               ("multipart/related; boundary=b", part.replace(b": 4", b": 5") + b"--b--"),
                               ("multipart/related; boundary=b", part.replace(b"dicom", b"json") + b"--b--")]:
        with pytest.raises(PacsError) as bad:
            _single_part(content_type, body, "x")
        assert bad.value.code == "pacs_bad_answer"


def test_instance_urls():
    url = "https://pacs.example.org/dicom-web/studies/1.2/series/1.2.3/instances/1.2.3.4"
    assert parse_instance_url(url) == ("1.2", "1.2.3", "1.2.3.4") and instance_sop(url) == "1.2.3.4"
    assert instance_sop("/archive/studies/1.2/series/1.2.3/instances/1.2.3.4") == ""
    with pytest.raises(ValueError):
        parse_instance_url("/archive/a.dcm")


@pytest.mark.parametrize("modality, body_part, view, reason", [
    ("DX", "CHEST", "PA", ""), ("cr", " chest ", "ap", ""), ("DR", "", "", ""),
    ("CT", "CHEST", "PA", "not_radiograph"), ("", "CHEST", "PA", "not_radiograph"),
    ("DX", "HAND", "PA", "not_chest"), ("DX", "ABDOMEN", "LL", "not_chest"),
    ("DX", "CHEST", "LL", "lateral_view"), ("DX", "CHEST", "rl", "lateral_view"),
    ("DX", "CHEST", "LAT", "lateral_view"), ("DX", "CHEST", "LATERAL", "lateral_view"),
    ("DX", "CHEST", "RLD", "lateral_view"),
    ("DX", "CHEST", "OBL", "other_view"), ("DX", "CHEST", "LLO", "other_view"),
])
def test_skip_reason(modality, body_part, view, reason):
    assert SelectionRules().skip_reason(modality, body_part, view) == reason


def test_skip_reason_follows_the_rules():
    rules = SelectionRules(modalities=("DX",), body_parts=("CHEST",), view_positions=("PA",))
    assert rules.skip_reason("CR", "CHEST", "PA") == "not_radiograph"
    assert rules.skip_reason("DX", "", "PA") == "not_chest"
    assert rules.skip_reason("DX", "CHEST", "AP") == "other_view"
    assert rules.skip_reason("DX", "CHEST") == ""
