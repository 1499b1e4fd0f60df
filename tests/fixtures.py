"""Test-only DICOM writers: realistic CT, MG and DX headers with the modules their IODs require, and CT series
folders. Tests and benchmarks only; script code never writes synthetic headers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, generate_uid
from pydicom.valuerep import format_number_as_ds

from common import dicom_io


def _base_dataset(sop_class: str, modality: str, patient_id: str, study_uid=None, series_uid=None) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, generate_uid()
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20240101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.AccessionNumber, ds.Modality, ds.Manufacturer = "SYNTH", modality, "medgen-restore synthetic"
    ds.ReferringPhysicianName, ds.StudyDescription = "", "synthetic phantom"
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = (
        "Synthetic^Phantom",
        patient_id,
        "",
        "O",
    )
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid or generate_uid(), series_uid or generate_uid()
    ds.StudyID, ds.SeriesNumber, ds.AcquisitionNumber = "1", 1, 1
    ds.SamplesPerPixel = 1
    return ds


def make_ct_dataset(
    hu: np.ndarray,
    *,
    pixel_spacing_mm=(0.7, 0.7),
    position_mm=(0, 0, 0),
    slice_thickness_mm=1.0,
    instance_number=1,
    patient_id="SYNTH001",
    study_uid=None,
    series_uid=None,
) -> Dataset:
    """CT Image Storage, signed 16-bit, slope 1 / intercept -1024 (moved if the HU range needs it)."""
    ds = _base_dataset(CTImageStorage, "CT", patient_id, study_uid, series_uid)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.PatientPosition, ds.BodyPartExamined, ds.KVP = "HFS", "CHEST", "120"
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[str(ds.StudyInstanceUID), "frame"])
    ds.PositionReferenceIndicator = ""
    ds.InstanceNumber = int(instance_number)
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [format_number_as_ds(float(v)) for v in position_mm]
    ds.SliceLocation = format_number_as_ds(float(position_mm[2]))
    ds.SliceThickness = format_number_as_ds(float(slice_thickness_mm))
    ds.PixelSpacing = [format_number_as_ds(float(v)) for v in pixel_spacing_mm]
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelRepresentation, ds.BitsAllocated, ds.BitsStored = 1, 16, 16
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
    ds.WindowCenter, ds.WindowWidth, ds.WindowCenterWidthExplanation = 40, 400, "SOFT TISSUE"
    dicom_io._encode(np.asarray(hu), ds)
    return ds


def make_projection_dataset(
    stored_uint16: np.ndarray,
    *,
    modality="MG",
    bits_stored=14,
    monochrome1=False,
    imager_pixel_spacing_mm=(0.07, 0.07),
) -> Dataset:
    """Digital Mammography (MG) or Digital X-Ray (DX) For Presentation with the given stored values."""
    stored = np.asarray(stored_uint16)
    if stored.ndim != 2 or stored.min() < 0 or stored.max() >= 1 << bits_stored:
        raise ValueError(f"stored values must be a 2-D array within {bits_stored} unsigned bits")
    if modality not in ("MG", "DX"):
        raise ValueError(f"modality must be 'MG' or 'DX', got {modality!r}")
    sop_class = dicom_io.MAMMO_FOR_PRESENTATION if modality == "MG" else dicom_io.DX_FOR_PRESENTATION
    ds = _base_dataset(sop_class, modality, "SYNTH001", None, None)
    ds.ImageType = ["ORIGINAL", "PRIMARY", ""]
    ds.PresentationIntentType, ds.InstanceNumber, ds.BurnedInAnnotation = "FOR PRESENTATION", 1, "NO"
    ds.ImageLaterality, ds.PatientOrientation, ds.BodyPartExamined = "L", ["A", "R"], "BREAST"
    ds.PositionerType = "MAMMOGRAPHIC" if modality == "MG" else "NONE"
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "76752008", "SCT", "Breast"
    ds.AnatomicRegionSequence = [code]
    view = Dataset()
    view.CodeValue, view.CodingSchemeDesignator, view.CodeMeaning = "399162004", "SCT", "cranio-caudal"
    view.ViewModifierCodeSequence = []
    ds.ViewCodeSequence, ds.OrganExposed = [view], "BREAST"
    ds.AcquisitionContextSequence, ds.DetectorType = [], "DIRECT"
    ds.ImagerPixelSpacing = [format_number_as_ds(float(v)) for v in imager_pixel_spacing_mm]
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.PresentationLUTShape = "INVERSE" if monochrome1 else "IDENTITY"
    # Sign -1: higher value = less X-ray reaching the detector (dense is bright in MONOCHROME2).
    ds.PixelIntensityRelationship, ds.PixelIntensityRelationshipSign = "LOG", 1 if monochrome1 else -1
    ds.PixelRepresentation, ds.BitsAllocated, ds.BitsStored = 0, 16, int(bits_stored)
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
    ds.WindowCenter, ds.WindowWidth = (1 << bits_stored) // 2, 1 << bits_stored
    ds.LossyImageCompression = "00"
    dicom_io._encode(stored, ds)
    return ds


def write_ct_series(
    hu_zyx: np.ndarray, folder: str | Path, spacing_mm_zyx, shuffle_names=False
) -> list[Path]:
    """One CT file per slice (z along +normal); with shuffle_names, file names do not follow slice order."""
    folder = Path(folder)
    n_z, n_y, n_x = hu_zyx.shape
    sz, sy, sx = (float(v) for v in spacing_mm_zyx)
    uids = {"study_uid": generate_uid(), "series_uid": generate_uid()}
    names = np.arange(n_z)
    rng = np.random.default_rng(n_z)
    while shuffle_names and n_z > 1 and (names == np.arange(n_z)).all():
        names = rng.permutation(n_z)
    paths = []
    for k in range(n_z):
        position = (-n_x * sx / 2, -n_y * sy / 2, k * sz)  # x/y centred like a scanner's field of view
        ds = make_ct_dataset(
            hu_zyx[k], pixel_spacing_mm=(sy, sx), position_mm=position, slice_thickness_mm=sz, **uids
        )
        ds.InstanceNumber = k + 1
        paths.append(dicom_io.write_dataset(ds, folder / f"IM{names[k] + 1:04d}.dcm"))
    return paths
