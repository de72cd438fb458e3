"""Post-processing of CNN class probabilities into one clean label map (QPerf's rule).

Per foreground class the probability threshold is raised from 0.5 until a single connected
component remains; if none of the thresholds gives exactly one, the largest component at 0.5
is kept (Xue et al. 2020 App. E3 / QPerf, REFERENCES.md §5). Thresholds >= 0.5 keep the
classes disjoint because the probabilities of a pixel sum to 1.

Labels: 0 background, 1 LV blood pool, 2 myocardium, 3 RV blood pool (docs/conventions.md).

Ring closing (optional, ``postprocess(..., close_ring=True)``): when the myocardium does not
enclose the LV blood pool, the myocardium probability is followed along rays from the blood
pool's centroid and each ray's wall is taken with a threshold relative to that ray's own
peak (:func:`close_ring_along_rays`), as QPerf's ring-based post-processing does; kept only if
the ring then closes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

logger = logging.getLogger(__name__)

LV_BLOOD, MYOCARDIUM, RV_BLOOD = 1, 2, 3
CLASS_NAMES = {LV_BLOOD: "LV blood pool", MYOCARDIUM: "myocardium", RV_BLOOD: "RV blood pool"}
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class PostProcessed:
    """Clean labels uint8 [rows, cols] plus what was (not) found."""

    labels: np.ndarray
    thresholds: dict[int, float]
    missing: tuple[str, ...] = field(default=())
    closed_ring: bool = False

    @property
    def empty(self) -> bool:
        """True when neither LV blood pool nor myocardium was found."""
        return not np.isin(self.labels, (LV_BLOOD, MYOCARDIUM)).any()


def single_component(probability: np.ndarray, *, start: float = 0.5, stop: float = 0.95,
                     step: float = 0.05) -> tuple[np.ndarray, float]:
    """Mask of one connected component of ``probability`` (float [rows, cols], 0-1).

    Raises the threshold from ``start`` to ``stop`` until exactly one 8-connected component
    remains; otherwise returns the largest component at ``start``. Returns (mask, threshold);
    an all-false mask when nothing exceeds ``start``.
    """
    for threshold in np.arange(start, stop + 1e-9, step):
        components, count = ndimage.label(probability > threshold, structure=_EIGHT_CONNECTED)
        if count == 1:
            return components == 1, float(threshold)
        if count == 0:
            break
    components, count = ndimage.label(probability > start, structure=_EIGHT_CONNECTED)
    if count == 0:
        return np.zeros(probability.shape, dtype=bool), float(start)
    sizes = np.bincount(components.ravel())[1:]
    return components == 1 + int(np.argmax(sizes)), float(start)


def is_closed_ring(labels: np.ndarray) -> bool:
    """True when the myocardium encloses the LV blood pool completely (4-connected path from
    the blood pool to the image edge must cross the myocardium)."""
    labels = np.asarray(labels)
    blood = labels == LV_BLOOD
    myocardium = labels == MYOCARDIUM
    if not blood.any() or not myocardium.any():
        return False
    outside, _ = ndimage.label(~myocardium)
    blood_regions = set(np.unique(outside[blood])) - {0}
    edge = np.concatenate([outside[0], outside[-1], outside[:, 0], outside[:, -1]])
    return not (blood_regions & set(np.unique(edge)))


def close_ring_along_rays(labels: np.ndarray, myocardium_probability: np.ndarray, *,
                          n_rays: int = 360, relative_threshold: float = 0.5,
                          min_peak: float = 0.1, step_px: float = 0.5) -> np.ndarray | None:
    """Labels uint8 [rows, cols] whose myocardium closes around the LV blood pool, or None.

    From the LV blood pool's centroid, ``n_rays`` rays (equal angles) sample
    ``myocardium_probability`` (float [rows, cols], 0-1; bilinear, every ``step_px`` pixels)
    beyond the last blood-pool pixel of the ray, to the image edge. On each ray the wall is the
    contiguous run around the ray's probability peak that stays above ``relative_threshold``
    x peak (an adaptive threshold: a faint but clear wall on one side counts as much as a
    strong one on the other). Run pixels not claimed by another class become myocardium; the
    largest 8-connected myocardium component is kept and enclosed unclaimed pixels become LV
    blood pool. None when a ray's peak is below ``min_peak`` (no wall there), a ray reaches
    the edge inside the blood pool, or the ring still does not close.
    """
    labels = np.asarray(labels)
    probability = np.asarray(myocardium_probability, dtype=np.float64)
    blood = labels == LV_BLOOD
    if not blood.any():
        return None
    center = np.array(ndimage.center_of_mass(blood))
    rows, cols = labels.shape
    angles = np.linspace(0.0, 2.0 * np.pi, int(n_rays), endpoint=False)
    radii = np.arange(0.0, float(np.hypot(rows, cols)), step_px)
    ray_r = center[0] - radii[None, :] * np.sin(angles)[:, None]
    ray_c = center[1] + radii[None, :] * np.cos(angles)[:, None]
    pixel_r, pixel_c = np.rint(ray_r).astype(int), np.rint(ray_c).astype(int)
    inside = (pixel_r >= 0) & (pixel_r < rows) & (pixel_c >= 0) & (pixel_c < cols)
    values = ndimage.map_coordinates(probability, [ray_r, ray_c], order=1, mode="constant",
                                     cval=0.0, prefilter=False)
    on_blood = np.zeros_like(inside)
    on_blood[inside] = blood[pixel_r[inside], pixel_c[inside]]
    step = np.arange(radii.size)[None, :]
    last_inside = inside.sum(axis=1) - 1  # a ray leaves the image once: a prefix is inside
    start = np.where(on_blood, step, -1).max(axis=1) + 1  # first step beyond the blood pool
    if (start > last_inside).any():
        return None
    in_range = (step >= start[:, None]) & (step <= last_inside[:, None])
    profile = np.where(in_range, values, -np.inf)
    peak = np.argmax(profile, axis=1)
    peak_value = profile[np.arange(len(angles)), peak]
    if (peak_value < min_peak).any():
        return None
    below = ~(in_range & (values > relative_threshold * peak_value[:, None]))
    low = np.where(below & (step < peak[:, None]), step, -1).max(axis=1) + 1
    high = np.where(below & (step > peak[:, None]), step, radii.size).min(axis=1)
    run = (step >= low[:, None]) & (step < high[:, None])
    wall = np.zeros(labels.shape, dtype=bool)
    wall[pixel_r[run], pixel_c[run]] = True
    closed = labels.copy()
    closed[wall & (closed == 0)] = MYOCARDIUM
    components, count = ndimage.label(closed == MYOCARDIUM, structure=_EIGHT_CONNECTED)
    if count > 1:
        sizes = np.bincount(components.ravel())[1:]
        closed[(closed == MYOCARDIUM) & (components != 1 + int(np.argmax(sizes)))] = 0
    enclosed = ndimage.binary_fill_holes(np.isin(closed, (LV_BLOOD, MYOCARDIUM)))
    closed[enclosed & (closed == 0)] = LV_BLOOD
    return closed if is_closed_ring(closed) else None


def postprocess(probabilities: np.ndarray, *, close_ring: bool = False,
                ring_relative_threshold: float = 0.5,
                ring_min_peak: float = 0.1) -> PostProcessed:
    """Clean label map from class probabilities float [classes, rows, cols] (classes 0-3).

    Each foreground class keeps one connected component; holes inside the myocardial ring that
    no class claims are given to the LV blood pool. ``close_ring``: an open ring is closed by
    :func:`close_ring_along_rays` (with ``ring_relative_threshold``, ``ring_min_peak``) when
    that succeeds; closed rings are never changed.
    """
    probabilities = np.asarray(probabilities, dtype=np.float32)
    if probabilities.ndim != 3 or probabilities.shape[0] != 4:
        raise ValueError(f"expected probabilities [4, rows, cols], got {probabilities.shape}")
    if not np.isfinite(probabilities).all():
        raise ValueError("probabilities contain NaN or infinite values")
    labels = np.zeros(probabilities.shape[1:], dtype=np.uint8)
    thresholds: dict[int, float] = {}
    missing = []
    for label in (LV_BLOOD, MYOCARDIUM, RV_BLOOD):
        mask, thresholds[label] = single_component(probabilities[label])
        if not mask.any():
            missing.append(CLASS_NAMES[label])
        labels[mask] = label
    if labels.any():
        enclosed = ndimage.binary_fill_holes(np.isin(labels, (LV_BLOOD, MYOCARDIUM)))
        labels[enclosed & (labels == 0)] = LV_BLOOD if (labels == LV_BLOOD).any() else 0
    closed_ring = is_closed_ring(labels)
    if close_ring and not closed_ring and (labels == MYOCARDIUM).any():
        closed = close_ring_along_rays(labels, probabilities[MYOCARDIUM],
                                       relative_threshold=ring_relative_threshold,
                                       min_peak=ring_min_peak)
        if closed is not None:
            logger.info("segmentation: open myocardial ring closed along rays")
            labels, closed_ring = closed, True
    result = PostProcessed(labels=labels, thresholds=thresholds, missing=tuple(missing),
                           closed_ring=closed_ring)
    if missing:
        logger.info("segmentation: not found: %s", ", ".join(missing))
    return result


# colours of the contours on the Gd images (the usual CMR viewer convention: LV endocardium
# red, LV epicardium green, RV yellow); the MBF maps keep the report's white borders
ENDO_RGB: tuple[float, float, float] = (1.0, 0.0, 0.0)
EPI_RGB: tuple[float, float, float] = (0.0, 1.0, 0.0)
RV_RGB: tuple[float, float, float] = (1.0, 1.0, 0.0)


def mask_outline_xy(mask: np.ndarray) -> np.ndarray:
    """Closed outline float64 [points, 2] (x = column, y = row, pixels) of the largest part of
    a bool mask [rows, cols]: the 0.5 iso-line of the mask (marching squares, ``contourpy``),
    half-way between member and non-member pixel centres; first point = last point.
    Raises ValueError for an empty mask."""
    import contourpy

    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2 or not mask.any():
        raise ValueError(f"expected a non-empty mask [rows, cols], got shape {mask.shape} with "
                         f"{int(mask.sum())} pixels")
    padded = np.pad(mask, 1).astype(np.float64)  # zero border: every outline closes
    lines = contourpy.contour_generator(z=padded, line_type=contourpy.LineType.Separate).lines(0.5)
    longest = max(lines, key=len)
    return np.asarray(longest, dtype=np.float64) - 1.0


def segmentation_contours(labels: np.ndarray, lv_center_rc: tuple[float, float], *,
                          step_deg: float = 3.0, thickness: float = 1.0) -> list:
    """Endo, epi and RV contours of a label map (docs/conventions.md labels) for image meta.

    Endo and epi are the report's radial borders (``perfline.toolbox.sector_contours.
    border_contours``: rays every ``step_deg`` from ``lv_center_rc`` (row, col); first / last
    myocardial pixel), so the Gd images and the MBF maps carry the same borders; RV is the
    outline of the RV blood pool (:func:`mask_outline_xy`). Contours labelled "endo", "epi",
    "rv", points (x = column, y = row) in pixels of ``labels``' grid, closed.

    Returns :class:`perfline.toolbox.sector_contours.Contour` objects; a class that is missing
    is left out. Raises ``ContourError`` when the myocardium gives no endo/epi border.
    """
    from perfline.toolbox.sector_contours import Contour, border_contours

    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"expected labels [rows, cols], got shape {labels.shape}")
    colours = {"endo": ENDO_RGB, "epi": EPI_RGB}
    contours = [Contour(c.label, c.points_xy, colours[c.label], thickness)
                for c in border_contours(labels == MYOCARDIUM, lv_center_rc, step_deg=step_deg,
                                         thickness=thickness)]
    if (labels == RV_BLOOD).any():
        contours.append(Contour("rv", mask_outline_xy(labels == RV_BLOOD), RV_RGB, thickness))
    return contours
