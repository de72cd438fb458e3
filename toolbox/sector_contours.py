"""AHA sector contours on the MBF maps, as polylines and as MRD image meta strings.

Endocardial and epicardial borders are found by casting rays from the LV centre every
``step_deg`` degrees through the myocardial mask: the first and the last myocardial sample along
each ray give the endo and epi radius. Each AHA sector's outline is its endo arc, the boundary
ray out to the epi border, the epi arc back, and the other boundary ray; it is drawn in the
colour of its coronary territory (Xue et al., Radiology: AI 2020, Figure 3: LAD yellow, RCA
green, LCx red).

Points are pixel coordinates ``(x, y) = (column, row)`` of the map's array grid (pixel centres
at integers). Two meta formats (REFERENCES.md section 8):

- Gadgetron ``GT_ROI``: ``r, g, b, thickness, x1, y1, x2, y2, ...`` (colour 0-1). One key holds one
  contour, so several contours use keys ``GT_ROI_<label>``.
- FIRE ``ROI_<label>``: ``r, g, b, thickness, style, visibility, x1, y1, ...``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from perfline.toolbox.aha import SliceLevel, sector_boundaries_deg, segment_of_angle, territory_of

logger = logging.getLogger(__name__)

TERRITORY_RGB: dict[str, tuple[float, float, float]] = {
    "LAD": (1.0, 1.0, 0.0),  # yellow
    "RCA": (0.0, 1.0, 0.0),  # green
    "LCx": (1.0, 0.0, 0.0),  # red
}
BORDER_RGB: tuple[float, float, float] = (1.0, 1.0, 1.0)


class ContourError(ValueError):
    """The myocardial mask or the sector geometry cannot give contours."""


@dataclass(frozen=True)
class Contour:
    """One polyline in pixel coordinates.

    Attributes:
        label: meta key suffix ("endo", "epi", "segment_07").
        points_xy: float64 [points, 2]: (x = column, y = row).
        rgb: colour, each 0-1.
        thickness: line thickness in display pixels.
        closed: whether the last point joins the first.
    """

    label: str
    points_xy: np.ndarray
    rgb: tuple[float, float, float]
    thickness: float = 1.0
    closed: bool = True


def radial_borders(myocardium: np.ndarray, center_rc: tuple[float, float], angles_deg: np.ndarray, *,
                   sample_step_px: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
    """Endo and epi radius (pixels) of the myocardium along rays from the LV centre.

    Args:
        myocardium: bool [rows, cols].
        center_rc: LV centre (row, col).
        angles_deg: ray directions, degrees counter-clockwise as displayed (docs/conventions.md).

    Returns:
        (endo, epi) float64 [angles]; NaN where a ray meets no myocardium. Each ray is sampled every
        ``sample_step_px`` with nearest-pixel lookup: endo / epi are the radii of the first / last
        sample that falls on a myocardial pixel (within about half a pixel of the mask border).
    """
    mask = np.asarray(myocardium, dtype=bool)
    if mask.ndim != 2:
        raise ContourError(f"myocardium must be [rows, cols], got shape {mask.shape}")
    max_radius = math.hypot(*mask.shape)
    radii = np.arange(0.0, max_radius, sample_step_px)
    theta = np.radians(np.asarray(angles_deg, dtype=np.float64))[:, None]
    rows = np.rint(center_rc[0] - radii[None, :] * np.sin(theta)).astype(np.int64)
    cols = np.rint(center_rc[1] + radii[None, :] * np.cos(theta)).astype(np.int64)
    inside = (rows >= 0) & (rows < mask.shape[0]) & (cols >= 0) & (cols < mask.shape[1])
    hits = np.zeros(rows.shape, dtype=bool)
    hits[inside] = mask[rows[inside], cols[inside]]
    any_hit = hits.any(axis=1)
    first = np.argmax(hits, axis=1)
    last = hits.shape[1] - 1 - np.argmax(hits[:, ::-1], axis=1)
    endo = np.where(any_hit, radii[first], np.nan)
    epi = np.where(any_hit, radii[last], np.nan)
    return endo, epi


def _points(center_rc: tuple[float, float], angles_deg: np.ndarray, radius: np.ndarray) -> np.ndarray:
    theta = np.radians(angles_deg)
    return np.stack([center_rc[1] + radius * np.cos(theta), center_rc[0] - radius * np.sin(theta)], axis=1)


def border_contours(myocardium: np.ndarray, center_rc: tuple[float, float], *, step_deg: float = 3.0,
                    thickness: float = 1.0) -> list[Contour]:
    """Closed endo and epi borders (white) of the myocardium; rays that miss it are skipped."""
    angles = np.arange(0.0, 360.0, step_deg)
    endo, epi = radial_borders(myocardium, center_rc, angles)
    contours = []
    for label, radius in (("endo", endo), ("epi", epi)):
        keep = np.isfinite(radius)
        if keep.sum() < 3:
            raise ContourError(f"{label} border: rays from {center_rc} met the myocardium in {int(keep.sum())} "
                               f"of {angles.size} directions, expected at least 3")
        contours.append(Contour(label, _points(center_rc, angles[keep], radius[keep]), BORDER_RGB, thickness))
    return contours


def sector_contours(myocardium: np.ndarray, center_rc: tuple[float, float], rv_insertion_deg: float,
                    level: SliceLevel, *, step_deg: float = 2.0, thickness: float = 1.5) -> list[Contour]:
    """Closed outline of every AHA sector of one slice, coloured by coronary territory.

    Args:
        myocardium: bool [rows, cols] mask.
        center_rc: LV centre (row, col) in pixels.
        rv_insertion_deg: anterior RV insertion (docs/conventions.md).
        level: "basal", "mid" or "apical" (6, 6 or 4 sectors).

    Returns:
        One :class:`Contour` per sector with label ``segment_NN``; sectors whose rays never meet the
        myocardium are left out.
    """
    if not math.isfinite(rv_insertion_deg):
        raise ContourError(f"rv_insertion_deg must be finite, got {rv_insertion_deg}")
    boundaries = np.sort(sector_boundaries_deg(rv_insertion_deg, level))
    contours = []
    for index, start in enumerate(boundaries):
        end = boundaries[(index + 1) % boundaries.size]
        span = (end - start) % 360.0
        segment = int(segment_of_angle(start + span / 2, rv_insertion_deg, level))
        count = max(2, int(math.ceil(span / step_deg)) + 1)
        angles = start + np.linspace(0.0, span, count)
        endo, epi = radial_borders(myocardium, center_rc, angles)
        keep = np.isfinite(endo)
        if keep.sum() < 2:
            logger.debug("segment %d: no myocardium along its rays, no contour", segment)
            continue
        inner = _points(center_rc, angles[keep], endo[keep])
        outer = _points(center_rc, angles[keep], epi[keep])[::-1]
        contours.append(Contour(f"segment_{segment:02d}", np.concatenate([inner, outer]),
                                TERRITORY_RGB[territory_of(segment)], thickness))
    return contours


def _number(value: float) -> str:
    return f"{value:.2f}"


def gadgetron_roi_meta(contours: list[Contour]) -> dict[str, list[str]]:
    """Gadgetron ``GT_ROI`` meta values: ``{"GT_ROI_<label>": [r, g, b, thickness, x1, y1, ...]}``."""
    meta: dict[str, list[str]] = {}
    for contour in contours:
        values = [*contour.rgb, contour.thickness, *np.asarray(contour.points_xy, dtype=np.float64).ravel()]
        meta[f"GT_ROI_{contour.label}"] = [_number(v) for v in values]
    return meta


def fire_roi_meta(contours: list[Contour], *, style: int = 0, visibility: int = 1) -> dict[str, list[str]]:
    """FIRE ROI meta values: ``{"ROI_<label>": [r, g, b, thickness, style, visibility, x1, y1, ...]}``.

    ``style`` 0 is a solid line, ``visibility`` 1 shows the ROI.
    """
    meta: dict[str, list[str]] = {}
    for contour in contours:
        values = [*contour.rgb, contour.thickness, style, visibility,
                  *np.asarray(contour.points_xy, dtype=np.float64).ravel()]
        meta[f"ROI_{contour.label}"] = [_number(v) for v in values]
    return meta


def parse_roi_meta(values: list[str], *, fire: bool) -> tuple[tuple[float, float, float], float, np.ndarray]:
    """Inverse of the meta formats: (rgb, thickness, points_xy [points, 2]) from one meta value list."""
    numbers = np.asarray([float(v) for v in values], dtype=np.float64)
    header = 6 if fire else 4
    if numbers.size < header or (numbers.size - header) % 2:
        raise ContourError(f"ROI meta needs {header} header values and x/y pairs, got {numbers.size} values")
    return (float(numbers[0]), float(numbers[1]), float(numbers[2])), float(numbers[3]), \
        numbers[header:].reshape(-1, 2)
