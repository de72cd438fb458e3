"""Segmentation agreement metrics of the paper's Table (Xue et al. 2020; REFERENCES.md §7).

All functions take label or boolean masks [rows, cols] on the same grid and a pixel spacing in
mm (square pixels). Borders are the pixels of a region that touch its outside (4-connected);
distances are between border pixel centres, in mm, computed with the exact Euclidean distance
transform (scipy.ndimage.distance_transform_edt).

Hausdorff definition used here: the *maximum* (100th percentile) of the symmetric border
distances, i.e. the classical bidirectional Hausdorff distance (as in the paper), computed
separately for the endocardial and the epicardial border. ``hausdorff_mm(..., percentile=95)``
gives the 95th percentile of the pooled distances of both directions (medpy's ``hd95``
convention) for comparison.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

LV_BLOOD, MYOCARDIUM, RV_BLOOD = 1, 2, 3


class EmptyMaskError(ValueError):
    """A border distance was asked for a mask with no pixels."""


def _check_pair(auto: np.ndarray, manual: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    auto, manual = np.asarray(auto, dtype=bool), np.asarray(manual, dtype=bool)
    if auto.shape != manual.shape or auto.ndim != 2:
        raise ValueError(f"expected two masks [rows, cols] of one shape, got {auto.shape} and "
                         f"{manual.shape}")
    return auto, manual


def dice(auto: np.ndarray, manual: np.ndarray) -> float:
    """2 |A and M| / (|A| + |M|); 1.0 when both are empty."""
    auto, manual = _check_pair(auto, manual)
    total = auto.sum() + manual.sum()
    return 1.0 if total == 0 else float(2.0 * np.logical_and(auto, manual).sum() / total)


def overlap_rates(auto: np.ndarray, manual: np.ndarray) -> dict[str, float]:
    """False positive and negative rates relative to the manual area, precision and recall.

    false_positive = |A and not M| / |M|; false_negative = |M and not A| / |M|;
    precision = |A and M| / |A|; recall = |A and M| / |M| (NaN when the denominator is 0).
    """
    auto, manual = _check_pair(auto, manual)
    overlap = float(np.logical_and(auto, manual).sum())
    area_auto, area_manual = float(auto.sum()), float(manual.sum())

    def ratio(numerator: float, denominator: float) -> float:
        return numerator / denominator if denominator > 0 else float("nan")

    return {
        "false_positive": ratio(float(np.logical_and(auto, ~manual).sum()), area_manual),
        "false_negative": ratio(float(np.logical_and(manual, ~auto).sum()), area_manual),
        "precision": ratio(overlap, area_auto),
        "recall": ratio(overlap, area_manual),
    }


def border(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` with a 4-neighbour outside it (the image edge counts as outside)."""
    mask = np.asarray(mask, dtype=bool)
    eroded = ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(2, 1),
                                    border_value=0)
    return mask & ~eroded


def _border_distances(auto: np.ndarray, manual: np.ndarray,
                      spacing_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Distances (mm) from each auto border pixel to the manual border, and back."""
    border_auto, border_manual = border(auto), border(manual)
    if not border_auto.any() or not border_manual.any():
        raise EmptyMaskError(f"border distance needs two non-empty masks, got "
                             f"{int(auto.sum())} and {int(manual.sum())} pixels")
    to_manual = ndimage.distance_transform_edt(~border_manual, sampling=spacing_mm)
    to_auto = ndimage.distance_transform_edt(~border_auto, sampling=spacing_mm)
    return to_manual[border_auto], to_auto[border_manual]


def hausdorff_mm(auto: np.ndarray, manual: np.ndarray, spacing_mm: float, *,
                 percentile: float = 100.0) -> float:
    """Bidirectional Hausdorff distance between the borders of two masks, mm.

    percentile=100 is the classical maximum; lower values take that percentile of the pooled
    distances of both directions.
    """
    auto, manual = _check_pair(auto, manual)
    forward, backward = _border_distances(auto, manual, spacing_mm)
    if percentile >= 100.0:
        return float(max(forward.max(), backward.max()))
    return float(np.percentile(np.concatenate([forward, backward]), percentile))


def mean_border_distance_mm(auto: np.ndarray, manual: np.ndarray, spacing_mm: float) -> float:
    """Symmetric mean distance between the borders of two masks (mm): the mean over the border
    pixels of both masks of the distance to the other mask's border."""
    auto, manual = _check_pair(auto, manual)
    forward, backward = _border_distances(auto, manual, spacing_mm)
    return float(np.concatenate([forward, backward]).mean())


def endo_epi_regions(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Endocardial region (inside the myocardium: LV blood pool with holes filled) and
    epicardial region (LV blood pool + myocardium, holes filled) of a label map."""
    labels = np.asarray(labels)
    epicardial = ndimage.binary_fill_holes((labels == LV_BLOOD) | (labels == MYOCARDIUM))
    endocardial = epicardial & (labels != MYOCARDIUM)
    return endocardial, epicardial


def angle_error_deg(auto_deg: float, manual_deg: float) -> float:
    """Absolute difference of two directions, degrees in [0, 180]."""
    difference = abs((auto_deg - manual_deg) % 360.0)
    return float(min(difference, 360.0 - difference))


@dataclass(frozen=True)
class SliceMetrics:
    """The paper's table for one slice; distances in mm, angle in degrees (NaN if undefined)."""

    dice: float
    false_positive: float
    false_negative: float
    precision: float
    recall: float
    boundary_error_mm: float
    hausdorff_endo_mm: float
    hausdorff_epi_mm: float
    hausdorff95_endo_mm: float
    hausdorff95_epi_mm: float
    rv_insertion_error_deg: float


def slice_metrics(auto_labels: np.ndarray, manual_labels: np.ndarray, spacing_mm: float, *,
                  auto_rv_insertion_deg: float = float("nan"),
                  manual_rv_insertion_deg: float = float("nan")) -> SliceMetrics:
    """All metrics of the myocardium (label 2) of one slice.

    The boundary error is the symmetric mean border distance of the endocardial and the
    epicardial borders pooled; Hausdorff distances are per border. Distances are NaN when
    either mask is empty.
    """
    auto_labels, manual_labels = np.asarray(auto_labels), np.asarray(manual_labels)
    if auto_labels.shape != manual_labels.shape:
        raise ValueError(f"label maps differ in shape: {auto_labels.shape} vs "
                         f"{manual_labels.shape}")
    auto_myo, manual_myo = auto_labels == MYOCARDIUM, manual_labels == MYOCARDIUM
    rates = overlap_rates(auto_myo, manual_myo)
    distances = dict.fromkeys(("boundary", "endo", "epi", "endo95", "epi95"), float("nan"))
    auto_endo, auto_epi = endo_epi_regions(auto_labels)
    manual_endo, manual_epi = endo_epi_regions(manual_labels)
    pooled = []
    for name, auto, manual in (("endo", auto_endo, manual_endo), ("epi", auto_epi, manual_epi)):
        try:
            forward, backward = _border_distances(auto, manual, spacing_mm)
        except EmptyMaskError:
            continue
        pooled.append(np.concatenate([forward, backward]))
        distances[name] = float(max(forward.max(), backward.max()))
        distances[name + "95"] = float(np.percentile(pooled[-1], 95))
    if len(pooled) == 2:
        distances["boundary"] = float(np.concatenate(pooled).mean())
    rv_error = float("nan")
    if np.isfinite(auto_rv_insertion_deg) and np.isfinite(manual_rv_insertion_deg):
        rv_error = angle_error_deg(auto_rv_insertion_deg, manual_rv_insertion_deg)
    return SliceMetrics(
        dice=dice(auto_myo, manual_myo), boundary_error_mm=distances["boundary"],
        hausdorff_endo_mm=distances["endo"], hausdorff_epi_mm=distances["epi"],
        hausdorff95_endo_mm=distances["endo95"], hausdorff95_epi_mm=distances["epi95"],
        rv_insertion_error_deg=rv_error, **rates)


def summarize(values: np.ndarray) -> dict[str, float]:
    """Mean, SD, and the 5th and 95th percentiles (90 % interval) of the finite values."""
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        nan = float("nan")
        return {"mean": nan, "sd": nan, "p05": nan, "p95": nan, "n": 0}
    return {"mean": float(finite.mean()), "sd": float(finite.std(ddof=1)) if finite.size > 1
            else 0.0, "p05": float(np.percentile(finite, 5)),
            "p95": float(np.percentile(finite, 95)), "n": int(finite.size)}
