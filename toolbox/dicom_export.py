"""DICOM files for the report (secondary capture, RGB) and the parametric maps (real geometry).

Maps are written as MR Image Storage objects with 16-bit unsigned pixels and a rescale slope, so
``value = stored * RescaleSlope + RescaleIntercept`` gives ml/min/g (MBF, PS) or a fraction (Vp);
pixels with no fit (NaN) are stored as 0. Geometry follows DICOM PS3.3 C.7.6.2: MRD's
``position`` is the centre of the slice, DICOM's ImagePositionPatient the centre of the first
(top-left) pixel, so the position is moved by half the field of view minus half a pixel along
the read (column) and phase (row) directions. MRD and DICOM both use patient LPS coordinates.
ImageOrientationPatient = (read_dir, phase_dir): along a row the column index grows along
``read_dir``, down a column the row index grows along ``phase_dir`` (docs/conventions.md).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

from perfline.gadgets.perfusion_items import ImageGeometry

logger = logging.getLogger(__name__)

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
SECONDARY_CAPTURE_STORAGE = "1.2.840.10008.5.1.4.1.1.7"


class DicomExportError(ValueError):
    """The array or the geometry cannot be written as the requested DICOM object."""


@dataclass(frozen=True)
class DicomStudy:
    """Identifiers shared by every object of one scan (one study, one frame of reference)."""

    patient_id: str = "anonymous"
    patient_name: str = "anonymous"
    study_id: str = "1"
    study_description: str = "perfline perfusion"
    study_instance_uid: str = field(default_factory=generate_uid)
    frame_of_reference_uid: str = field(default_factory=generate_uid)


def dicom_geometry(geometry: ImageGeometry, shape: tuple[int, int]) -> dict[str, list[float]]:
    """ImagePositionPatient, ImageOrientationPatient and PixelSpacing for an array of ``shape``.

    Args:
        geometry: MRD-style geometry (``position`` = slice centre, mm, LPS).
        shape: (rows, cols) of the array.
    """
    rows, cols = shape
    row_spacing, col_spacing = (float(v) for v in geometry.pixel_spacing_mm)
    read = np.asarray(geometry.read_dir, dtype=np.float64)
    phase = np.asarray(geometry.phase_dir, dtype=np.float64)
    for name, vector in (("read_dir", read), ("phase_dir", phase)):
        if not np.isclose(np.linalg.norm(vector), 1.0, atol=1e-3):
            raise DicomExportError(f"{name} must be a unit vector, got {vector.tolist()}")
    first = (np.asarray(geometry.position, dtype=np.float64)
             - (cols / 2.0 - 0.5) * col_spacing * read - (rows / 2.0 - 0.5) * row_spacing * phase)
    return {
        "ImagePositionPatient": [float(v) for v in first],
        "ImageOrientationPatient": [float(v) for v in (*read, *phase)],
        "PixelSpacing": [row_spacing, col_spacing],
    }


def _base_dataset(study: DicomStudy, sop_class: str, *, series_uid: str, series_number: int,
                  instance_number: int, series_description: str, modality: str) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    now = datetime.now(timezone.utc)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientID = study.patient_id
    ds.PatientName = study.patient_name
    ds.StudyInstanceUID = study.study_instance_uid
    ds.StudyID = study.study_id
    ds.StudyDescription = study.study_description
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.InstanceNumber = instance_number
    ds.SeriesDescription = series_description
    ds.Modality = modality
    ds.Manufacturer = "perfline"
    ds.ReferringPhysicianName = ""
    ds.AccessionNumber = ""
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    return ds


def report_secondary_capture(image_rgb: np.ndarray, study: DicomStudy, *, series_uid: str | None = None,
                             series_number: int = 900, instance_number: int = 1,
                             description: str = "perfline AHA report") -> Dataset:
    """Secondary Capture (RGB, 8 bit) of the report image uint8 [rows, cols, 3]."""
    image = np.asarray(image_rgb)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise DicomExportError(f"expected a uint8 [rows, cols, 3] image, got {image.dtype} {image.shape}")
    ds = _base_dataset(study, SECONDARY_CAPTURE_STORAGE, series_uid=series_uid or generate_uid(),
                       series_number=series_number, instance_number=instance_number,
                       series_description=description, modality="OT")
    ds.ConversionType = "WSD"  # workstation
    ds.ImageType = ["DERIVED", "SECONDARY", "REPORT"]
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.Rows, ds.Columns = image.shape[:2]
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(image).tobytes()
    return ds


def parametric_map_dataset(values: np.ndarray, geometry: ImageGeometry, study: DicomStudy, *,
                           series_uid: str, series_number: int, instance_number: int, description: str,
                           units: str, rescale_slope: float = 0.001, slice_position_mm: float | None = None) -> Dataset:
    """MR Image Storage dataset of a float map [rows, cols] (e.g. MBF in ml/min/g).

    Stored as uint16 ``round(value / rescale_slope)``; NaN and negative values become 0, values above
    ``65535 * rescale_slope`` are clipped (65.5 ml/min/g at the default slope).

    Raises:
        DicomExportError: not a 2-D array, or a non-positive slope.
    """
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 2:
        raise DicomExportError(f"expected a map [rows, cols], got shape {array.shape}")
    if not rescale_slope > 0:
        raise DicomExportError(f"rescale_slope must be > 0, got {rescale_slope}")
    stored = np.clip(np.nan_to_num(array, nan=0.0) / rescale_slope, 0, 65535)
    stored = np.rint(stored).astype(np.uint16)
    ds = _base_dataset(study, MR_IMAGE_STORAGE, series_uid=series_uid, series_number=series_number,
                       instance_number=instance_number, series_description=description, modality="MR")
    ds.ImageType = ["DERIVED", "PRIMARY", "PERFUSION"]
    ds.FrameOfReferenceUID = study.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    for key, value in dicom_geometry(geometry, array.shape).items():
        setattr(ds, key, value)
    ds.SliceThickness = float(geometry.field_of_view_mm[2])
    normal = np.asarray(geometry.slice_dir, dtype=np.float64)
    ds.SliceLocation = float(slice_position_mm if slice_position_mm is not None
                             else np.dot(np.asarray(geometry.position, dtype=np.float64), normal))
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = array.shape
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.RescaleSlope = f"{rescale_slope:.6g}"
    ds.RescaleIntercept = "0"
    ds.RescaleType = units[:16]
    finite = array[np.isfinite(array)]
    if finite.size:
        low, high = np.percentile(finite, [1.0, 99.0])
        ds.WindowCenter = f"{(low + high) / 2:.4g}"
        ds.WindowWidth = f"{max(high - low, rescale_slope):.4g}"
    # MR Image module type 1 / 2 attributes that have no meaning for a derived map
    ds.ScanningSequence = "RM"
    ds.SequenceVariant = "NONE"
    ds.ScanOptions = ""
    ds.MRAcquisitionType = "2D"
    ds.PixelData = stored.tobytes()
    return ds


def write_dataset(ds: Dataset, path: str | Path) -> Path:
    """Write ``ds`` as a DICOM Part 10 file (preamble + file meta); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    logger.debug("wrote DICOM %s (%s)", path, ds.SOPClassUID)
    return path


def map_values(ds: Dataset) -> np.ndarray:
    """float64 [rows, cols] physical values of a map written by :func:`parametric_map_dataset`."""
    return ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
