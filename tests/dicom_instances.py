"""Small synthetic DX instances (DICOM Part-10 bytes) for the PACS tests: a PACS needs real UIDs, dates and
the tags its selection rules look at (modality, body part, view), and a pixel array the tests can compare."""

from __future__ import annotations

import io

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID

DX_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"
"""Digital X-Ray Image Storage - For Presentation."""


def dx_pixels(size: int = 64, seed: int = 0) -> np.ndarray:
    """The uint16 (12-bit) pixels `dx_instance` stores for this size and seed."""
    return np.random.default_rng(seed).integers(0, 4096, (size, size), dtype=np.uint16)


def dx_instance(study_uid: str, series_uid: str, sop_uid: str, study_date: str, view: str,
                body_part: str = "CHEST", modality: str = "DX", size: int = 64, seed: int = 0,
                pixels: np.ndarray | None = None) -> bytes:
    """One DX Image Storage instance, MONOCHROME2 uint16 `size`x`size` (`dx_pixels(size, seed)`, or the 12-bit
    `pixels` given, e.g. a phantom's), explicit VR little endian. An empty `view` or `body_part` leaves
    ViewPosition or BodyPartExamined out."""
    ds = Dataset()
    ds.SOPClassUID = DX_IMAGE_STORAGE
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = study_date
    ds.StudyTime = ds.ContentTime = "120000"
    ds.AccessionNumber = ""
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PatientName = "PHANTOM^DX"
    ds.PatientID = f"PH-{study_uid[-8:]}"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.ReferringPhysicianName = ""
    ds.Modality = modality
    ds.Manufacturer = "xray-ray tests"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.PatientOrientation = ""
    if body_part:
        ds.BodyPartExamined = body_part
    if view:
        ds.ViewPosition = view
    stored = dx_pixels(size, seed) if pixels is None else np.asarray(pixels, np.uint16)
    ds.set_pixel_data(stored, "MONOCHROME2", 12, generate_instance_uid=False)
    return part10_bytes(ds)


def part10_bytes(ds: Dataset) -> bytes:
    """`ds` as a Part-10 file (preamble, "DICM", file meta from its SOP class and instance, explicit VR little
    endian), as a modality writes it."""
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()
