"""Sector contours on a synthetic ring: radii, sector angles, territory colours, meta round trip."""

from __future__ import annotations

import numpy as np
import pytest

from perfline.toolbox.aha import aha_segment_map
from perfline.toolbox.sector_contours import (
    ContourError, TERRITORY_RGB, border_contours, fire_roi_meta, gadgetron_roi_meta, parse_roi_meta,
    radial_borders, sector_contours,
)

SHAPE = (80, 90)
CENTER = (40.0, 44.0)


def ring(inner: float = 10.0, outer: float = 17.0) -> np.ndarray:
    rows, cols = np.indices(SHAPE)
    radius = np.hypot(rows - CENTER[0], cols - CENTER[1])
    return (radius >= inner) & (radius < outer)


def test_radial_borders_match_ring():
    endo, epi = radial_borders(ring(), CENTER, np.arange(0, 360, 10.0))
    assert np.all(np.abs(endo - 10.0) < 1.0)
    assert np.all(np.abs(epi - 17.0) < 1.5)


def test_border_contours_and_errors():
    endo, epi = border_contours(ring(), CENTER)
    assert endo.label == "endo" and epi.label == "epi"
    r_endo = np.hypot(endo.points_xy[:, 0] - CENTER[1], endo.points_xy[:, 1] - CENTER[0])
    r_epi = np.hypot(epi.points_xy[:, 0] - CENTER[1], epi.points_xy[:, 1] - CENTER[0])
    assert r_endo.max() < r_epi.min()
    with pytest.raises(ContourError, match="expected at least 3"):
        border_contours(np.zeros(SHAPE, bool), CENTER)


@pytest.mark.parametrize("level, count", [("basal", 6), ("mid", 6), ("apical", 4)], ids=["basal", "mid", "apical"])
def test_sector_outline_encloses_its_segment(level, count):
    rv = 110.0
    mask = ring()
    contours = sector_contours(mask, CENTER, rv, level)
    assert len(contours) == count
    segments = aha_segment_map(mask, CENTER, rv, level)
    from matplotlib.path import Path
    rows, cols = np.nonzero(mask)
    for contour in contours:
        segment = int(contour.label.split("_")[1])
        inside = Path(contour.points_xy).contains_points(np.stack([cols, rows], axis=1))
        truth = segments[rows, cols] == segment
        # the polygon covers its own segment's pixels and (almost) nothing of the others
        assert (inside & truth).sum() > 0.85 * truth.sum()
        assert (inside & ~truth).sum() < 0.1 * truth.sum()


def test_territory_colours():
    contours = {c.label: c for c in sector_contours(ring(), CENTER, 120.0, "mid")}
    assert contours["segment_07"].rgb == TERRITORY_RGB["LAD"] == (1.0, 1.0, 0.0)
    assert contours["segment_10"].rgb == TERRITORY_RGB["RCA"]
    assert contours["segment_11"].rgb == TERRITORY_RGB["LCx"]


def test_anterior_sector_is_above_centre():
    """With the standard RV insertion (120 deg) segment 7 (mid anterior) lies above and right of the LV centre."""
    contour = {c.label: c for c in sector_contours(ring(), CENTER, 120.0, "mid")}["segment_07"]
    assert contour.points_xy[:, 1].mean() < CENTER[0]  # smaller row = up


def test_meta_round_trip():
    contours = sector_contours(ring(), CENTER, 120.0, "apical")
    gt = gadgetron_roi_meta(contours)
    fire = fire_roi_meta(contours)
    assert set(gt) == {f"GT_ROI_segment_{n}" for n in (13, 14, 15, 16)}
    assert set(fire) == {f"ROI_segment_{n}" for n in (13, 14, 15, 16)}
    rgb, thickness, points = parse_roi_meta(gt["GT_ROI_segment_15"], fire=False)
    assert rgb == TERRITORY_RGB["RCA"] and thickness == 1.5
    original = next(c for c in contours if c.label == "segment_15").points_xy
    np.testing.assert_allclose(points, original, atol=0.006)
    values = fire["ROI_segment_13"]
    assert values[4:6] == ["0.00", "1.00"]  # style, visibility
    _, _, fire_points = parse_roi_meta(values, fire=True)
    assert fire_points.shape == next(c for c in contours if c.label == "segment_13").points_xy.shape
    with pytest.raises(ContourError, match="x/y pairs"):
        parse_roi_meta(["1", "0", "0", "1", "5"], fire=False)


def test_nan_insertion_rejected():
    with pytest.raises(ContourError, match="finite"):
        sector_contours(ring(), CENTER, float("nan"), "mid")
