"""DICOM results of a classifier answer: the SR round-trips the answer, the UIDs are stable, dciodvfy finds no error."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset

from tests.dicom_instances import DX_IMAGE_STORAGE, part10_bytes
from tests.dicom_validation import dciodvfy_errors
from xray_ray.config import CLASS_NAMES
from xray_ray.images.dicom_results import (
    Answer,
    ResultError,
    heatmap_capture,
    read_answer,
    result_uid,
    source_header,
    structured_report,
    to_bytes,
)

STUDY, SERIES = "1.2.826.0.1.3680043.8.498.101", "1.2.826.0.1.3680043.8.498.102"
SOFTWARE = "0.1.0"

pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR CS:UserWarning")  # the sparse source's 'male'


def dx_source(sop_uid: str, complete: bool = True) -> bytes:
    """A 64x64 MONOCHROME2 DX instance as Part-10 bytes: `complete` with every patient and study attribute (and a
    non-ASCII name in UTF-8), else with the Type 2 ones a sloppy modality leaves out, and an invalid sex."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = DX_IMAGE_STORAGE, sop_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = STUDY, SERIES
    ds.StudyDate, ds.StudyTime, ds.Modality = "20260105", "093000", "DX"
    ds.PatientID = "PH-0001"
    ds.ViewPosition, ds.BodyPartExamined = "PA", "CHEST"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    if complete:
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.PatientName = "Müller^Anna"
        ds.PatientBirthDate, ds.PatientSex, ds.PatientAge = "19700101", "F", "056Y"
        ds.AccessionNumber, ds.StudyID, ds.ReferringPhysicianName = "ACC-7", "7", "Doe^John"
        ds.Manufacturer, ds.ManufacturerModelName = "Phantom Imaging", "DX-64"
        ds.PatientOrientation = ["L", "F"]
    else:
        ds.PatientName = "PHANTOM^DX"
        ds.PatientSex = "male"
    ds.set_pixel_data(np.random.default_rng(0).integers(0, 4096, (64, 64), dtype=np.uint16), "MONOCHROME2", 12,
                      generate_instance_uid=False)
    return part10_bytes(ds)


def answer(label: str, out_of_distribution: bool = False, ood_score: float = 0.12,
           model_version: str = "effnet-20261203-abc123") -> Answer:
    """An answer for `label`: most of the probability on it, the rest spread (odd values, to test precision)."""
    rest = (1 - 0.7123456789) / 3
    return Answer(label, {name: 0.7123456789 if name == label else rest for name in CLASS_NAMES}, ood_score,
                  out_of_distribution, model_version)


ANSWERS = {**{label: answer(label) for label in CLASS_NAMES},
           "out-of-distribution": answer("Normal", out_of_distribution=True, ood_score=7.5),
           "no-ood-score": answer("COVID", ood_score=float("nan"))}


@pytest.fixture(scope="module")
def headers() -> dict[str, str]:
    """The header JSON of a complete and of a sparse source instance."""
    return {"complete": source_header(dx_source("1.2.826.0.1.3680043.8.498.103")),
            "sparse": source_header(dx_source("1.2.826.0.1.3680043.8.498.104", complete=False))}


def conforms(dataset, tmp_path) -> None:
    """Assert dciodvfy finds no error in `dataset` written as a file."""
    path = tmp_path / f"{dataset.SOPInstanceUID}.dcm"
    path.write_bytes(to_bytes(dataset))
    assert dciodvfy_errors(path) == []


def test_source_header_keeps_identity_and_nothing_for_other_bytes():
    data = dx_source("1.2.826.0.1.3680043.8.498.105")
    header = json.loads(source_header(data))
    assert header["0020000D"]["Value"] == [STUDY] and header["0020000E"]["Value"] == [SERIES]
    assert header["00080018"]["Value"] == ["1.2.826.0.1.3680043.8.498.105"]
    assert header["00100010"]["Value"] == [{"Alphabetic": "Müller^Anna"}]
    assert "7FE00010" not in header and "00185101" not in header  # no pixels, nothing outside HEADER_KEYWORDS
    png = io.BytesIO()
    Image.new("L", (8, 8)).save(png, "PNG")
    for other in (png.getvalue(), b"", b"\x00" * 200, b"garbage" * 50, b"\x08\x00\x16\x00garbage"):
        assert source_header(other) == ""
    assert isinstance(source_header(data[:300]), str)  # truncated: whatever it gets, it does not raise


@pytest.mark.parametrize("source", ["complete", "sparse"])
@pytest.mark.parametrize("case", list(ANSWERS))
def test_structured_report_round_trips_the_answer_and_conforms(headers, source, case, tmp_path):
    given = ANSWERS[case]
    source_uids = json.loads(headers[source])
    report = structured_report(headers[source], given, SOFTWARE)
    back = read_answer(to_bytes(report))
    assert back["predicted_label"] == given.predicted_label
    assert back["probabilities"] == pytest.approx(given.probabilities, abs=1e-6)
    assert back["out_of_distribution"] is given.out_of_distribution
    assert back["ood_score"] == pytest.approx(given.ood_score, nan_ok=True)  # NaN: no detector, no score item
    assert back["model_version"] == given.model_version
    assert back["source_sop_instance_uid"] == source_uids["00080018"]["Value"][0]
    assert back["study_instance_uid"] == report.StudyInstanceUID == STUDY
    assert report.SeriesInstanceUID != SERIES and report.Modality == "SR" and report.VerificationFlag == "UNVERIFIED"
    assert "research use only" in report.SeriesDescription
    model = [item for item in report.ContributingEquipmentSequence
             if item.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"
             and item.Manufacturer == "xray-ray project"]
    assert len(model) == 1 and given.model_version in model[0].SoftwareVersions
    assert model[0].DeviceUID == result_uid(given.model_version, given.model_version, "device")
    conforms(report, tmp_path)


def test_uids_are_deterministic_per_source_and_model(headers):
    first = structured_report(headers["complete"], ANSWERS["COVID"], SOFTWARE)
    again = structured_report(headers["complete"], ANSWERS["Normal"], SOFTWARE)  # a re-run, another answer
    retrained = structured_report(headers["complete"], answer("COVID", model_version="effnet-20261210-def456"),
                                  SOFTWARE)
    other_image = structured_report(headers["sparse"], ANSWERS["COVID"], SOFTWARE)
    assert first.SOPInstanceUID == again.SOPInstanceUID and first.SeriesInstanceUID == again.SeriesInstanceUID
    assert retrained.SOPInstanceUID != first.SOPInstanceUID and retrained.SeriesInstanceUID != first.SeriesInstanceUID
    assert other_image.SOPInstanceUID != first.SOPInstanceUID
    assert other_image.SeriesInstanceUID == first.SeriesInstanceUID  # one series per study and model

    def device(report):
        return next(item.DeviceUID for item in report.ContributingEquipmentSequence if "DeviceUID" in item)

    assert device(first) == device(other_image) != device(retrained)
    assert first.SOPInstanceUID.startswith("2.25.") and len(first.SOPInstanceUID) <= 64
    with pytest.raises(ValueError, match="kind"):
        result_uid("1.2.3", "v1", "report")


@pytest.mark.parametrize("source", ["complete", "sparse"])
@pytest.mark.parametrize("side", [64, 256])
def test_heatmap_capture_is_rgb_in_the_study_with_a_burned_in_strip(headers, source, side, tmp_path):
    overlay = np.random.default_rng(side).integers(0, 256, (side, side, 3), dtype=np.uint8)
    capture = heatmap_capture(headers[source], overlay, ANSWERS["Viral Pneumonia"], SOFTWARE)
    conforms(capture, tmp_path)
    pixels = capture.pixel_array
    assert capture.PhotometricInterpretation == "RGB" and capture.BurnedInAnnotation == "YES"
    assert capture.StudyInstanceUID == STUDY and capture.SeriesInstanceUID != SERIES
    assert capture.SOPInstanceUID == result_uid(json.loads(headers[source])["00080018"]["Value"][0],
                                                ANSWERS["Viral Pneumonia"].model_version, "sc")
    assert pixels.shape[0] > side and pixels.shape[1:] == (side, 3)
    np.testing.assert_array_equal(pixels[:side], overlay)  # the heat map itself is untouched
    strip = pixels[side:]
    assert strip.max() > 150 and (strip == 0).all(axis=-1).mean() > 0.5  # white (anti-aliased) text on black


def test_out_of_distribution_gets_no_heatmap(headers):
    with pytest.raises(ResultError, match="out-of-distribution"):
        heatmap_capture(headers["complete"], np.zeros((64, 64, 3), np.uint8), ANSWERS["out-of-distribution"],
                        SOFTWARE)


@pytest.mark.parametrize(("header", "message"), [("", "not DICOM"), ("{not json", "not valid DICOM JSON"),
                                                  ('{"00100020":{"vr":"LO","Value":["P"]}}', "StudyInstanceUID")])
def test_a_missing_or_bad_header_is_a_clear_error(header, message):
    with pytest.raises(ResultError, match=message):
        structured_report(header, ANSWERS["COVID"], SOFTWARE)
    with pytest.raises(ResultError, match=message):
        heatmap_capture(header, np.zeros((64, 64, 3), np.uint8), ANSWERS["COVID"], SOFTWARE)


def test_an_answer_outside_the_four_classes_is_refused(headers):
    with pytest.raises(ResultError, match="one of"):
        structured_report(headers["complete"], answer("Tuberculosis"), SOFTWARE)
