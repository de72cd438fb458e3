"""DICOM export read back with pydicom: geometry, rescale slope, RGB secondary capture."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

from perfline.gadgets.perfusion_items import ImageGeometry
from perfline.toolbox.dicom_export import (
    MR_IMAGE_STORAGE, SECONDARY_CAPTURE_STORAGE, DicomExportError, DicomStudy, dicom_geometry, map_values,
    parametric_map_dataset, report_secondary_capture, write_dataset,
)

# an oblique short-axis-like plane: read and phase orthonormal, neither along an axis
READ = np.array([0.8, 0.6, 0.0])
PHASE = np.array([-0.36, 0.48, 0.8])
GEOMETRY = ImageGeometry(field_of_view_mm=(360.0, 270.0, 8.0), position=(10.0, -20.0, 35.0),
                         read_dir=tuple(READ), phase_dir=tuple(PHASE), slice_dir=tuple(np.cross(READ, PHASE)),
                         pixel_spacing_mm=(1.875, 1.875))
SHAPE = (144, 192)


def pixel_world(ds, row: float, col: float) -> np.ndarray:
    """World position of pixel (row, col) from the DICOM attributes (PS3.3 C.7.6.2.1.1)."""
    origin = np.asarray(ds.ImagePositionPatient, dtype=float)
    orientation = np.asarray(ds.ImageOrientationPatient, dtype=float)
    row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)
    return origin + orientation[:3] * col_spacing * col + orientation[3:] * row_spacing * row


def test_map_round_trip_with_geometry(tmp_path):
    study = DicomStudy(patient_id="P7", study_id="42")
    rng = np.random.default_rng(0)
    mbf = rng.uniform(0.3, 4.5, SHAPE).astype(np.float32)
    mbf[0, :5] = np.nan
    ds = parametric_map_dataset(mbf, GEOMETRY, study, series_uid=pydicom.uid.generate_uid(), series_number=10,
                                instance_number=2, description="MBF", units="ml/min/g")
    path = write_dataset(ds, tmp_path / "mbf" / "slice0.dcm")
    back = pydicom.dcmread(path)
    assert back.SOPClassUID == MR_IMAGE_STORAGE and back.PatientID == "P7"
    values = map_values(back)
    assert values.shape == SHAPE
    np.testing.assert_allclose(values[1:], mbf[1:], atol=0.0006)
    assert np.all(values[0, :5] == 0)
    assert float(back.RescaleSlope) == pytest.approx(0.001)
    # the image centre is the MRD slice position; corners lie FOV apart along read / phase
    centre = (pixel_world(back, 0, 0) + pixel_world(back, SHAPE[0] - 1, SHAPE[1] - 1)) / 2
    np.testing.assert_allclose(centre, GEOMETRY.position, atol=1e-3)
    width = np.linalg.norm(pixel_world(back, 0, SHAPE[1] - 1) - pixel_world(back, 0, 0)) + 1.875
    height = np.linalg.norm(pixel_world(back, SHAPE[0] - 1, 0) - pixel_world(back, 0, 0)) + 1.875
    assert width == pytest.approx(360.0, abs=1e-3) and height == pytest.approx(270.0, abs=1e-3)
    assert float(back.SliceThickness) == 8.0
    assert back.FrameOfReferenceUID == study.frame_of_reference_uid


def test_secondary_capture_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (70, 120, 3), dtype=np.uint8)
    study = DicomStudy(patient_id="P7")
    path = write_dataset(report_secondary_capture(image, study), tmp_path / "report.dcm")
    back = pydicom.dcmread(path)
    assert back.SOPClassUID == SECONDARY_CAPTURE_STORAGE
    assert back.PhotometricInterpretation == "RGB"
    np.testing.assert_array_equal(back.pixel_array, image)
    assert back.StudyInstanceUID == study.study_instance_uid


def test_errors():
    with pytest.raises(DicomExportError, match=r"uint8 \[rows, cols, 3\]"):
        report_secondary_capture(np.zeros((4, 4)), DicomStudy())
    with pytest.raises(DicomExportError, match="map \\[rows, cols\\]"):
        parametric_map_dataset(np.zeros((2, 4, 4)), GEOMETRY, DicomStudy(), series_uid="1.2", series_number=1,
                               instance_number=1, description="x", units="x")
    bad = ImageGeometry(field_of_view_mm=(1, 1, 1), read_dir=(2.0, 0.0, 0.0))
    with pytest.raises(DicomExportError, match="unit vector"):
        dicom_geometry(bad, (4, 4))
