"""Anterior RV insertion direction from a label map (Xue et al. 2020; REFERENCES.md §6).

The paper takes, from the RV mask and the LV centre, the extreme RV pixel by angle. Here the
angles of all RV pixels about the LV centre form a circular arc; the largest empty angular gap
separates its two ends. Following docs/conventions.md, the anterior insertion is the end from
which the arc runs counter-clockwise (as displayed) across the septum to the inferior
insertion, i.e. the first RV angle after the gap going counter-clockwise.
Angles: degrees in [0, 360), ``atan2(-(r - r0), c - c0)``.
"""

from __future__ import annotations

import numpy as np

from perfline.toolbox.aha import pixel_angles_deg

LV_BLOOD, MYOCARDIUM, RV_BLOOD = 1, 2, 3


class InsertionNotFoundError(ValueError):
    """The label map lacks the LV or the RV needed for the RV insertion."""


def lv_center_rc(labels: np.ndarray) -> tuple[float, float]:
    """Centroid (row, col), pixels, of the LV blood pool; of the myocardium if no blood pool."""
    labels = np.asarray(labels)
    for label in (LV_BLOOD, MYOCARDIUM):
        rows, cols = np.nonzero(labels == label)
        if rows.size:
            return float(rows.mean()), float(cols.mean())
    raise InsertionNotFoundError("no LV blood pool or myocardium (labels 1, 2) in the label map")


def rv_arc_deg(labels: np.ndarray, center_rc: tuple[float, float] | None = None
               ) -> tuple[float, float]:
    """(anterior, inferior) ends of the RV arc seen from the LV centre, degrees in [0, 360).

    Args:
        labels: uint8 [rows, cols] label map (3 = RV blood pool).
        center_rc: LV centre (row, col) in pixels; the LV blood-pool centroid if None.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"expected labels [rows, cols], got shape {labels.shape}")
    rv = labels == RV_BLOOD
    if not rv.any():
        raise InsertionNotFoundError("no RV blood pool (label 3) in the label map")
    center = lv_center_rc(labels) if center_rc is None else center_rc
    angles = np.sort(pixel_angles_deg(labels.shape, center)[rv])
    gaps = np.diff(np.concatenate([angles, angles[:1] + 360.0]))
    widest = int(np.argmax(gaps))
    anterior = angles[(widest + 1) % angles.size]
    inferior = angles[widest]
    return float(anterior % 360.0), float(inferior % 360.0)


def rv_insertion_deg(labels: np.ndarray, center_rc: tuple[float, float] | None = None) -> float:
    """Anterior RV insertion direction, degrees in [0, 360) (docs/conventions.md)."""
    return rv_arc_deg(labels, center_rc)[0]
