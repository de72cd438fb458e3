"""Build MRD images (``ismrmrd.Image``) with full geometry and meta attributes.

The one helper every gadget uses to send images back to the client: it fills the ImageHeader
geometry (matrix_size, field_of_view, position, read/phase/slice_dir, patient_table_position),
the indices, and the meta attributes scanners and Gadgetron viewers read
(GADGETRON_DataRole, GADGETRON_ImageComment, GADGETRON_SeqDescription,
GADGETRON_WindowCenter / GADGETRON_WindowWidth, GADGETRON_ColorMap, units, contours).

Array layout: ``data`` is ``[rows, cols]`` (one image) or ``[channels, rows, cols]``
(e.g. RGB, 3 channels with ``image_type=IMTYPE_RGB``); MRD stores ``[channels, z, y, x]`` with
y = rows (phase encode) and x = cols (readout), so ``matrix_size = (cols, rows, 1)``.
Contours (REFERENCES.md §8) are written in both conventions: Gadgetron ``GT_ROI_<name>``
(r, g, b, thickness, x, y, ...) and FIRE ``ROI_<name>`` (r, g, b, thickness, style,
visibility, x, y, ...), with x = column and y = row in pixels.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import ismrmrd
import numpy as np

from perfline.gadgets.perfusion_items import ImageGeometry

# numpy dtype -> dtype stored (MRD has no 8-bit or bool type)
_STORED_DTYPES: dict[np.dtype, np.dtype] = {
    np.dtype(np.bool_): np.dtype(np.uint16),
    np.dtype(np.uint8): np.dtype(np.uint16),
    np.dtype(np.int8): np.dtype(np.int16),
    np.dtype(np.uint16): np.dtype(np.uint16),
    np.dtype(np.int16): np.dtype(np.int16),
    np.dtype(np.uint32): np.dtype(np.uint32),
    np.dtype(np.int32): np.dtype(np.int32),
    np.dtype(np.float32): np.dtype(np.float32),
    np.dtype(np.float64): np.dtype(np.float32),
    np.dtype(np.complex64): np.dtype(np.complex64),
    np.dtype(np.complex128): np.dtype(np.complex64),
}
_HEADER_FIELDS = {name for name, _ in ismrmrd.ImageHeader._fields_}
_RESERVED_FIELDS = {"version", "data_type", "matrix_size", "channels", "attribute_string_len",
                    "field_of_view", "position", "read_dir", "phase_dir", "slice_dir",
                    "patient_table_position", "image_series_index", "image_index", "slice",
                    "repetition", "image_type"}
UNITS_META_KEY = "PERFLINE_Units"


class ImageBuildError(ValueError):
    """The array or the arguments cannot form an MRD image."""


@dataclass(frozen=True)
class Contour:
    """A polygon drawn over an image.

    Attributes:
        name: short identifier (used in the meta key, e.g. ``"endo"`` -> ``ROI_endo``).
        points_xy: float [n, 2] pixel coordinates, x = column, y = row.
        color_rgb: components in [0, 1].
        thickness: line width in pixels.
    """

    name: str
    points_xy: np.ndarray
    color_rgb: tuple[float, float, float] = (1.0, 0.0, 0.0)
    thickness: float = 1.0


def window_from_data(data: np.ndarray) -> tuple[float, float]:
    """(center, width) spanning the 1st..99th percentile of the finite values (magnitude for complex)."""
    values = np.abs(data) if np.iscomplexobj(data) else np.asarray(data, dtype=np.float64)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 0.0, 1.0
    low, high = np.percentile(finite, [1.0, 99.0])
    width = float(high - low)
    if width <= 0.0:
        width = max(abs(float(high)), 1.0)
    return float((high + low) / 2.0), width


def _contour_meta(contour: Contour) -> dict[str, list[str]]:
    points = np.asarray(contour.points_xy, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 2:
        raise ImageBuildError(f"contour {contour.name!r}: points_xy must be [n, 2], got {points.shape}")
    rgb = [f"{c:g}" for c in contour.color_rgb]
    xy = [f"{v:.3f}" for v in points.ravel()]
    return {
        f"GT_ROI_{contour.name}": rgb + [f"{contour.thickness:g}"] + xy,
        f"ROI_{contour.name}": rgb + [f"{contour.thickness:g}", "0", "1"] + xy,
    }


def make_image(data: np.ndarray, geometry: ImageGeometry, *, series_index: int, image_index: int,
               slice: int, repetition: int = 0, data_role: str,
               meta: dict[str, Any] | None = None,
               image_type: int = ismrmrd.IMTYPE_MAGNITUDE,
               comment: str | None = None, seq_description: str | None = None,
               window: tuple[float, float] | None = None, units: str | None = None,
               color_map: str | None = None, contours: Sequence[Contour] = (),
               header_fields: dict[str, Any] | None = None) -> ismrmrd.Image:
    """An ``ismrmrd.Image`` of ``data`` placed by ``geometry``.

    Args:
        data: ``[rows, cols]`` or ``[channels, rows, cols]``; float64 is stored as float32,
            bool/uint8 as uint16 (MRD has no 8-bit type), complex128 as complex64.
        geometry: field of view (mm), position and direction cosines of the image.
        series_index, image_index, slice, repetition: MRD ImageHeader indices.
        data_role: ``GADGETRON_DataRole`` (e.g. "Image", "Gd", "Flow_Map", "AHA").
        meta: extra meta attributes (override the ones set here).
        image_type: ``ismrmrd.IMTYPE_*`` (IMTYPE_RGB for 3-channel report images).
        comment: ``GADGETRON_ImageComment`` (defaults to ``data_role``).
        seq_description: ``GADGETRON_SeqDescription`` suffix (defaults to ``data_role``).
        window: (center, width) display window; by default the 1st..99th percentile.
        units: physical unit of the pixel values (meta ``PERFLINE_Units``), e.g. "ml/min/g".
        color_map: ``GADGETRON_ColorMap`` (e.g. "Perfusion.pal").
        contours: polygons written as ``GT_ROI_<name>`` and ``ROI_<name>`` meta attributes.
        header_fields: other ImageHeader fields by name (e.g. ``acquisition_time_stamp``,
            ``contrast``, ``phase``, ``set``, ``user_float``); geometry/index fields are set
            by the arguments above and may not be given here.

    Raises:
        ImageBuildError: wrong dimensions, unsupported dtype, unknown or reserved header field.
    """
    array = np.asarray(data)
    if array.ndim == 2:
        array = array[np.newaxis]
    if array.ndim != 3:
        raise ImageBuildError(f"expected [rows, cols] or [channels, rows, cols], got shape {np.shape(data)}")
    if image_type == ismrmrd.IMTYPE_RGB and array.shape[0] != 3:
        raise ImageBuildError(f"an RGB image needs 3 channels, got {array.shape[0]}")
    stored = _STORED_DTYPES.get(array.dtype)
    if stored is None:
        raise ImageBuildError(f"unsupported dtype {array.dtype}; supported: "
                              f"{sorted(str(d) for d in _STORED_DTYPES)}")
    mrd_data = np.ascontiguousarray(array.astype(stored, copy=False)[:, np.newaxis, :, :])
    image = ismrmrd.Image.from_array(mrd_data)

    image.image_type = image_type
    image.image_series_index = series_index
    image.image_index = image_index
    image.slice = slice
    image.repetition = repetition
    image.field_of_view = tuple(ctypes.c_float(v).value for v in geometry.field_of_view_mm)
    image.position = geometry.position
    image.read_dir = geometry.read_dir
    image.phase_dir = geometry.phase_dir
    image.slice_dir = geometry.slice_dir
    image.patient_table_position = geometry.patient_table_position
    for name, value in (header_fields or {}).items():
        if name not in _HEADER_FIELDS:
            raise ImageBuildError(f"unknown ImageHeader field {name!r}; valid: {sorted(_HEADER_FIELDS)}")
        if name in _RESERVED_FIELDS:
            raise ImageBuildError(f"ImageHeader field {name!r} is set by make_image's own arguments")
        setattr(image, name, value)

    center, width = window if window is not None else window_from_data(array)
    attributes: dict[str, Any] = {
        "GADGETRON_DataRole": data_role,
        "GADGETRON_ImageComment": comment if comment is not None else data_role,
        "GADGETRON_SeqDescription": f"_{seq_description if seq_description is not None else data_role}",
        "GADGETRON_WindowCenter": f"{center:.6g}",
        "GADGETRON_WindowWidth": f"{width:.6g}",
        "GADGETRON_ImageNumber": str(image_index),
    }
    if units is not None:
        attributes[UNITS_META_KEY] = units
    if color_map is not None:
        attributes["GADGETRON_ColorMap"] = color_map
    for contour in contours:
        attributes.update(_contour_meta(contour))
    attributes.update(meta or {})
    image.meta = ismrmrd.Meta(attributes)
    return image


def image_array(image: ismrmrd.Image) -> np.ndarray:
    """The pixel data as ``[rows, cols]`` (one channel, one z) or ``[channels, rows, cols]``."""
    data = image.data
    if data.shape[1] != 1:
        raise ImageBuildError(f"expected a 2D image (z = 1), got data shape {data.shape}")
    return data[0, 0] if data.shape[0] == 1 else data[:, 0]


def geometry_from_image(image: ismrmrd.Image) -> ImageGeometry:
    """The ImageGeometry of an MRD image (inverse of what :func:`make_image` writes)."""
    fov = tuple(float(v) for v in image.field_of_view)
    x, y = image.matrix_size[0], image.matrix_size[1]
    return ImageGeometry(
        field_of_view_mm=fov,  # type: ignore[arg-type]
        position=tuple(float(v) for v in image.position),  # type: ignore[arg-type]
        read_dir=tuple(float(v) for v in image.read_dir),  # type: ignore[arg-type]
        phase_dir=tuple(float(v) for v in image.phase_dir),  # type: ignore[arg-type]
        slice_dir=tuple(float(v) for v in image.slice_dir),  # type: ignore[arg-type]
        patient_table_position=tuple(float(v) for v in image.patient_table_position),  # type: ignore[arg-type]
        pixel_spacing_mm=(fov[1] / y if y else 1.0, fov[0] / x if x else 1.0),
    )
