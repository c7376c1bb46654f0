"""DICOM results of one classifier answer: a TID 1500 Structured Report and a Grad-CAM Secondary Capture.

The nightly scoring job and the Serve endpoint both write them, so one module builds them. The
SR follows IHE AI Results (AIR): one image-level measurement group referencing the source
instance, holding the predicted class as its finding, each class's calibrated probability, the
out-of-distribution flag and score, and the algorithm's name and version; the model is named
again as contributing equipment. Both objects go into the source's study, in series of their own,
marked unverified and research use only. Every UID is derived from the source instance and the
model version (`result_uid`), so scoring the same image again with the same model replaces the
same objects instead of adding duplicates. The source is known only by the header subset
`source_header` keeps, which the scorers carry from decoding to writing.
"""

from __future__ import annotations

import io
import json
import math
import uuid
from dataclasses import dataclass

import highdicom as hd
import numpy as np
import pydicom
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from xray_ray.config import CLASS_NAMES
from xray_ray.images.decode import is_dicom

HEADER_KEYWORDS: tuple[str, ...] = (
    "SpecificCharacterSet", "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality",
    # Patient module
    "PatientName", "PatientID", "IssuerOfPatientID", "TypeOfPatientID", "PatientBirthDate", "PatientBirthTime",
    "PatientSex", "PatientIdentityRemoved", "DeidentificationMethod",
    # General Study and Patient Study modules
    "StudyDate", "StudyTime", "AccessionNumber", "ReferringPhysicianName", "StudyID", "StudyDescription",
    "PatientAge", "PatientSize", "PatientWeight",
    # the acquisition equipment, which highdicom names as contributing equipment
    "Manufacturer", "ManufacturerModelName", "DeviceSerialNumber", "SoftwareVersions", "InstitutionName",
    "InstitutionalDepartmentName", "StationName",
    # what the heat map shows, and the orientation of its rows and columns
    "BodyPartExamined", "PatientOrientation",
)
"""The source attributes the results need: identity, patient and study modules, acquisition equipment."""

_REQUIRED = ("StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "SOPInstanceUID")
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "StudyDate",
          "StudyTime", "ReferringPhysicianName")  # attributes highdicom reads from the evidence: empty when absent
_KINDS = ("sr", "sr-series", "sc", "sc-series", "device", "tracking")
_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "xray-ray:dicom-results")

MANUFACTURER = "xray-ray project"
SR_SERIES_NUMBER = 9901
SC_SERIES_NUMBER = 9902
_SR_SERIES = "AI result - research use only, not for diagnosis"
_SC_SERIES = "AI heat map - research use only, not for diagnosis"
_BANNER, _BANNER_SHORT = "RESEARCH USE ONLY - NOT FOR DIAGNOSIS", "RESEARCH USE ONLY"

# Codes without a standard one live in this private scheme, declared in each SR's Coding Scheme Identification.
_PRIVATE = "99XRAYRAY"
_PRIVATE_SCHEME = CodingSchemeIdentificationItem(designator=_PRIVATE, name="xray-ray private codes",
                                                 responsible_organization=MANUFACTURER)
_FINDINGS = {
    # SNOMED CT 840539006 "Disease caused by severe acute respiratory syndrome coronavirus 2" (COVID-19)
    "COVID": hd.sr.CodedConcept("840539006", "SCT", "COVID-19"),
    # DICOM PS3.16 DCM 112001 "Opacity" (CID 6104 "Abnormal Opacity Finding or Feature", chest CAD)
    "Lung_Opacity": hd.sr.CodedConcept("112001", "DCM", "Opacity"),
    # SNOMED CT 17621005 "Normal" (DICOM PS3.16 uses it, e.g. CID 222 "Normality Codes")
    "Normal": hd.sr.CodedConcept("17621005", "SCT", "Normal"),
    # SNOMED CT 75570004 "Viral pneumonia"
    "Viral Pneumonia": hd.sr.CodedConcept("75570004", "SCT", "Viral pneumonia"),
}
_PROBABILITIES = {name: hd.sr.CodedConcept(f"PROB-{code}", _PRIVATE, f"Probability of {meaning}")
                  for name, code, meaning in zip(CLASS_NAMES, ("COVID", "OPACITY", "NORMAL", "VIRALPNEU"),
                                                 ("COVID-19", "lung opacity", "normal", "viral pneumonia"))}
_OOD_FLAG = hd.sr.CodedConcept("OOD", _PRIVATE, "Out of distribution")
_OOD_SCORE = hd.sr.CodedConcept("OOD-SCORE", _PRIVATE, "Out-of-distribution score")
_NO_UNITS = codes.UCUM.NoUnits  # UCUM "1"
_CHEST_XRAY = hd.sr.CodedConcept("399208008", "SCT", "Plain chest X-ray")  # SNOMED CT procedure


class ResultError(ValueError):
    """A DICOM result cannot be built from this header or answer (the message says why)."""


@dataclass(frozen=True)
class Answer:
    """One classifier answer, as the DICOM results report it."""

    predicted_label: str
    probabilities: dict[str, float]
    ood_score: float
    out_of_distribution: bool
    model_version: str
    model_name: str = "xray-ray chest X-ray classifier"


def source_header(data: bytes) -> str:
    """The DICOM file's HEADER_KEYWORDS attributes as compact JSON, '' when `data` is no readable DICOM (a PNG, say):
    what the results need of their source, small enough to travel with each prediction row."""
    if not is_dicom(data):
        return ""
    try:
        source = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True, specific_tags=HEADER_KEYWORDS)
        if not all(source.get(keyword) for keyword in _REQUIRED):
            return ""
        subset = Dataset()
        for keyword in HEADER_KEYWORDS:
            if keyword in source:
                subset.add(source[keyword])
        return json.dumps(subset.to_json_dict(), separators=(",", ":"))
    except Exception:  # noqa: BLE001 - anything unreadable is simply not DICOM to us
        return ""


def result_uid(source_sop_instance_uid: str, model_version: str, kind: str) -> str:
    """The UID of a result `kind` ('sr', 'sr-series', 'sc', 'sc-series', 'device', 'tracking') of this source and
    model, as 2.25.<int>: a re-run writes the same objects, never duplicates. Series kinds take the study UID as
    source (one series per study and model), 'device' takes the model version (a retrained model is a new device)."""
    if kind not in _KINDS:
        raise ValueError(f"unknown result UID kind {kind!r}, expected one of {_KINDS}")
    # A name-based (SHA-1, version 5) UUID: pydicom's generate_uid(prefix=None) ignores its entropy and is random.
    name = json.dumps([kind, source_sop_instance_uid, model_version])
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, name).int}"


def _evidence(header_json: str) -> Dataset:
    """The source as a Dataset highdicom takes as evidence, Type 2 attributes present (empty when unknown)."""
    if not header_json:
        raise ResultError("no DICOM header: the input was not DICOM, so it gets no DICOM result")
    try:
        source = Dataset.from_json(header_json)
    except Exception as err:  # noqa: BLE001 - any parse failure means the same thing here
        raise ResultError(f"the DICOM header is not valid DICOM JSON: {err}") from None
    missing = [keyword for keyword in _REQUIRED if not source.get(keyword)]
    if missing:
        raise ResultError(f"the DICOM header lacks {', '.join(missing)}")
    for keyword in _TYPE2:
        if keyword not in source:
            setattr(source, keyword, "")
    if source.PatientSex not in ("M", "F", "O"):
        source.PatientSex = ""
    return source


def _check(answer: Answer) -> None:
    """Refuse an answer whose label or probabilities do not name the four classes."""
    if answer.predicted_label not in _FINDINGS or set(answer.probabilities) != set(CLASS_NAMES):
        raise ResultError(f"answer must name one of {CLASS_NAMES} and give each a probability, got "
                          f"{answer.predicted_label!r} and {sorted(answer.probabilities)}")


def _model_equipment(answer: Answer, software_version: str) -> hd.ContributingEquipment:
    """The model as contributing (processing) equipment, with a Device UID of its own version (IHE AIR)."""
    equipment = hd.ContributingEquipment(
        MANUFACTURER, codes.DCM.ProcessingEquipment, manufacturer_model_name=answer.model_name,
        software_versions=[software_version, answer.model_version],
        contribution_description="AI model that produced this result")
    equipment.DeviceUID = result_uid(answer.model_version, answer.model_version, "device")
    return equipment


def structured_report(header_json: str, answer: Answer, software_version: str) -> hd.sr.Comprehensive3DSR:
    """The answer as a TID 1500 Comprehensive 3D SR in the source's study (IHE AIR): class, probabilities, the
    out-of-distribution flag and score, algorithm and model; an out-of-distribution answer gets one too."""
    source = _evidence(header_json)
    _check(answer)
    device_uid = result_uid(answer.model_version, answer.model_version, "device")
    observer = hd.sr.ObserverContext(codes.DCM.Device, hd.sr.DeviceObserverIdentifyingAttributes(
        uid=device_uid, name=answer.model_name, manufacturer_name=MANUFACTURER, model_name=answer.model_version))
    measurements = [hd.sr.Measurement(_PROBABILITIES[name], float(answer.probabilities[name]), _NO_UNITS)
                    for name in CLASS_NAMES]
    if math.isfinite(answer.ood_score):  # no score (no detector): the flag alone
        measurements.append(hd.sr.Measurement(_OOD_SCORE, float(answer.ood_score), _NO_UNITS))
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=result_uid(source.SOPInstanceUID, answer.model_version, "tracking"),
            identifier="chest X-ray classification"),
        finding_type=_FINDINGS[answer.predicted_label],
        algorithm_id=hd.sr.AlgorithmIdentification(answer.model_name, answer.model_version,
                                                   manufacturer=MANUFACTURER),
        measurements=measurements,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(
            _OOD_FLAG, codes.SCT.Yes if answer.out_of_distribution else codes.SCT.No)],
        source_images=[hd.sr.SourceImageForMeasurementGroup(source.SOPClassUID, source.SOPInstanceUID)])
    report = hd.sr.MeasurementReport(observation_context=hd.sr.ObservationContext(observer_device_context=observer),
                                     procedure_reported=_CHEST_XRAY, imaging_measurements=[group])
    return hd.sr.Comprehensive3DSR(
        evidence=[source], content=report[0],
        series_instance_uid=result_uid(source.StudyInstanceUID, answer.model_version, "sr-series"),
        series_number=SR_SERIES_NUMBER, series_description=_SR_SERIES,
        sop_instance_uid=result_uid(source.SOPInstanceUID, answer.model_version, "sr"), instance_number=1,
        manufacturer=MANUFACTURER, manufacturer_model_name="xray-ray", software_versions=software_version,
        is_complete=True, is_verified=False, coding_schemes=[_PRIVATE_SCHEME],
        contributing_equipment=[_model_equipment(answer, software_version)])


def _burn_in(rgb: np.ndarray) -> np.ndarray:
    """`rgb` with a black strip below it saying research use only, in white (the short text on narrow images;
    clipped below about 60 px)."""
    height, width = rgb.shape[:2]
    font = ImageFont.load_default(size=max(6, min(24, width // 22)))
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text = _BANNER if measure.textlength(_BANNER, font=font) <= width - 4 else _BANNER_SHORT
    strip = int(font.size) + 6
    canvas = Image.new("RGB", (width, height + strip))
    canvas.paste(Image.fromarray(rgb, "RGB"))
    ImageDraw.Draw(canvas).text((width / 2, height + strip / 2), text, fill=(255, 255, 255), font=font, anchor="mm")
    return np.asarray(canvas)


def heatmap_capture(header_json: str, overlay_rgb: np.ndarray, answer: Answer,
                    software_version: str) -> hd.sc.SCImage:
    """The Grad-CAM overlay (uint8 RGB, H x W x 3) as an RGB Secondary Capture in the source's study, research use
    only burned into a strip below it; none for an out-of-distribution image, whose heat map means nothing."""
    source = _evidence(header_json)
    _check(answer)
    if answer.out_of_distribution:
        raise ResultError("no heat map for an out-of-distribution image")
    if overlay_rgb.dtype != np.uint8 or overlay_rgb.ndim != 3 or overlay_rgb.shape[2] != 3:
        raise ResultError(f"the overlay must be uint8 RGB (H, W, 3), got {overlay_rgb.dtype} {overlay_rgb.shape}")
    orientation = tuple(source.get("PatientOrientation") or ())
    capture = hd.sc.SCImage.from_ref_dataset(
        source, _burn_in(overlay_rgb), "RGB", 8, "PATIENT",
        series_instance_uid=result_uid(source.StudyInstanceUID, answer.model_version, "sc-series"),
        series_number=SC_SERIES_NUMBER, series_description=_SC_SERIES,
        sop_instance_uid=result_uid(source.SOPInstanceUID, answer.model_version, "sc"), instance_number=1,
        manufacturer=MANUFACTURER, patient_orientation=orientation if len(orientation) == 2 else ("L", "F"),
        transfer_syntax_uid=pydicom.uid.ExplicitVRLittleEndian,
        contributing_equipment=[_model_equipment(answer, software_version)])
    if len(orientation) != 2:
        capture.PatientOrientation = ""  # unknown: Type 2C, present and empty (highdicom needs a value to start)
    # the body part says Laterality may stay absent (the chest is unpaired); only chest X-rays are classified
    capture.BodyPartExamined = source.get("BodyPartExamined") or "CHEST"
    capture.BurnedInAnnotation = "YES"
    capture.DerivationDescription = f"Grad-CAM heat map for {answer.predicted_label}, model {answer.model_version}"
    reference = Dataset()
    reference.ReferencedSOPClassUID, reference.ReferencedSOPInstanceUID = source.SOPClassUID, source.SOPInstanceUID
    capture.SourceImageSequence = [reference]
    return capture


def to_bytes(dataset: Dataset) -> bytes:
    """`dataset` as DICOM Part-10 file bytes (preamble and file meta), for a file or a STOW-RS request."""
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, dataset, enforce_file_format=True)
    return buffer.getvalue()


def _key(code: hd.sr.CodedConcept) -> tuple[str, str]:
    """A code's (value, scheme): what identifies it, hashable."""
    return code.value, code.scheme_designator


def read_answer(data: bytes) -> dict:
    """The answer an SR from `structured_report` holds, read back with highdicom: what a consumer of the SR gets."""
    report = hd.sr.srread(data)
    groups = report.content.get_image_measurement_groups() if isinstance(report.content, hd.sr.MeasurementReport) \
        else []
    if len(groups) != 1:
        raise ResultError("not an xray-ray result: expected one image measurement group")
    group = groups[0]
    labels = {_key(code): name for name, code in _FINDINGS.items()}
    values = {_key(item.name): item.value for item in group.get_measurements()}
    version = hd.sr.utils.find_content_items(group[0], name=codes.DCM.AlgorithmVersion)
    return {
        "predicted_label": labels[_key(group.finding_type)],
        "probabilities": {name: values[_key(code)] for name, code in _PROBABILITIES.items()},
        "ood_score": values.get(_key(_OOD_SCORE), float("nan")),
        "out_of_distribution": group.get_qualitative_evaluations(_OOD_FLAG)[0].value == codes.SCT.Yes,
        "model_version": version[0].value,
        "source_sop_instance_uid": group.source_images[0].referenced_sop_instance_uid,
        "study_instance_uid": report.StudyInstanceUID,
    }
