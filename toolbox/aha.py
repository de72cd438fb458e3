"""AHA 16-segment assignment of myocardial pixels from the RV insertion direction.

Reference: Cerqueira et al., Circulation 2002;105:539 (17-segment model; segment 17, the apex,
is not imaged in short-axis perfusion). Angle conventions: ``docs/conventions.md``.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

SliceLevel = Literal["basal", "mid", "apical"]
LEVELS: tuple[SliceLevel, ...] = ("basal", "mid", "apical")

SEGMENT_NAMES: dict[int, str] = {
    1: "basal anterior", 2: "basal anteroseptal", 3: "basal inferoseptal",
    4: "basal inferior", 5: "basal inferolateral", 6: "basal anterolateral",
    7: "mid anterior", 8: "mid anteroseptal", 9: "mid inferoseptal",
    10: "mid inferior", 11: "mid inferolateral", 12: "mid anterolateral",
    13: "apical anterior", 14: "apical septal", 15: "apical inferior", 16: "apical lateral",
}

TERRITORIES: dict[str, tuple[int, ...]] = {
    "LAD": (1, 2, 7, 8, 13, 14),
    "RCA": (3, 4, 9, 10, 15),
    "LCx": (5, 6, 11, 12, 16),
}

# offset in degrees (counter-clockwise from the anterior RV insertion) where each level's
# first listed sector starts, the sector width, and the segment numbers in that order
_LEVEL_SECTORS: dict[str, tuple[float, float, tuple[int, ...]]] = {
    "basal": (0.0, 60.0, (2, 3, 4, 5, 6, 1)),
    "mid": (0.0, 60.0, (8, 9, 10, 11, 12, 7)),
    "apical": (15.0, 90.0, (14, 15, 16, 13)),
}


def territory_of(segment: int) -> str:
    """Coronary territory ("LAD", "RCA" or "LCx") of AHA segment 1-16."""
    for name, segments in TERRITORIES.items():
        if segment in segments:
            return name
    raise ValueError(f"AHA segment must be 1-16, got {segment}")


def pixel_angles_deg(shape: tuple[int, int], center_rc: tuple[float, float]) -> np.ndarray:
    """Angle of every pixel about ``center_rc`` (row, col), degrees in [0, 360).

    Counter-clockwise as displayed (0° = increasing column, 90° = decreasing row).
    Returns float64 [rows, cols].
    """
    rows, cols = np.indices(shape, dtype=np.float64)
    return np.degrees(np.arctan2(-(rows - center_rc[0]), cols - center_rc[1])) % 360.0


def segment_of_angle(angle_deg: np.ndarray | float, rv_insertion_deg: float,
                     level: SliceLevel) -> np.ndarray:
    """AHA segment number (1-16) for angles about the LV centre at one slice level."""
    if level not in _LEVEL_SECTORS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    start, width, segments = _LEVEL_SECTORS[level]
    relative = (np.asarray(angle_deg, dtype=np.float64) - rv_insertion_deg - start) % 360.0
    index = np.minimum((relative // width).astype(np.int64), len(segments) - 1)
    return np.asarray(segments, dtype=np.uint8)[index]


def aha_segment_map(myocardium: np.ndarray, center_rc: tuple[float, float],
                    rv_insertion_deg: float, level: SliceLevel) -> np.ndarray:
    """AHA segment of every myocardial pixel.

    Args:
        myocardium: bool [rows, cols] myocardial mask.
        center_rc: LV centre (row, col) in pixels.
        rv_insertion_deg: anterior RV insertion direction, degrees (docs/conventions.md).
        level: "basal", "mid" or "apical".

    Returns:
        uint8 [rows, cols]: 0 outside the myocardium, else the AHA segment 1-16.
    """
    myocardium = np.asarray(myocardium, dtype=bool)
    if myocardium.ndim != 2:
        raise ValueError(f"myocardium must be a 2-D mask [rows, cols], got shape {myocardium.shape}")
    segments = segment_of_angle(pixel_angles_deg(myocardium.shape, center_rc), rv_insertion_deg, level)
    return np.where(myocardium, segments, 0).astype(np.uint8)


def sector_boundaries_deg(rv_insertion_deg: float, level: SliceLevel) -> np.ndarray:
    """Angles (degrees, [0, 360)) of the sector borders at one level, for drawing contours."""
    start, width, segments = _LEVEL_SECTORS[level]
    return (rv_insertion_deg + start + width * np.arange(len(segments))) % 360.0
