"""AHA segment assignment follows docs/conventions.md."""

import numpy as np
import pytest

from perfline.toolbox.aha import (
    aha_segment_map,
    pixel_angles_deg,
    sector_boundaries_deg,
    segment_of_angle,
    territory_of,
)


@pytest.mark.parametrize(
    "angle, expected",
    [(150, 2), (90, 1), (30, 6), (330, 5), (270, 4), (210, 3)],
    ids=["anteroseptal", "anterior", "anterolateral", "inferolateral", "inferior", "inferoseptal"],
)
def test_basal_segments_standard_orientation(angle, expected):
    # standard view: RV on the left, anterior insertion at 120 degrees
    assert segment_of_angle(angle, 120.0, "basal") == expected
    assert segment_of_angle(angle, 120.0, "mid") == expected + 6


def test_apical_septal_sector_is_centred_on_the_septum():
    assert segment_of_angle(np.array([180.0, 90.0, 0.0, 270.0]), 120.0, "apical").tolist() == [14, 13, 16, 15]
    # borders 45 degrees either side of the septum centre (insertion + 60)
    assert segment_of_angle(134.9, 120.0, "apical") == 13
    assert segment_of_angle(135.1, 120.0, "apical") == 14


def test_rotation_moves_segments_with_the_insertion():
    for rotation in (0.0, 37.0, 200.0):
        assert segment_of_angle(150 + rotation, 120.0 + rotation, "basal") == 2


def test_every_segment_gets_pixels_on_a_ring():
    shape = (64, 64)
    angles = pixel_angles_deg(shape, (32.0, 32.0))
    rows, cols = np.indices(shape)
    radius = np.hypot(rows - 32, cols - 32)
    ring = (radius > 10) & (radius < 16)
    for level, expected in (("basal", range(1, 7)), ("mid", range(7, 13)), ("apical", range(13, 17))):
        segments = aha_segment_map(ring, (32.0, 32.0), 75.0, level)
        assert set(np.unique(segments)) == {0, *expected}
        assert np.all(segments[~ring] == 0)
    assert angles[32, 60] == pytest.approx(0.0) and angles[4, 32] == pytest.approx(90.0)


def test_sector_boundaries_and_territories():
    assert sector_boundaries_deg(120.0, "basal").tolist() == [120, 180, 240, 300, 0, 60]
    assert [territory_of(s) for s in (1, 3, 5, 14, 15, 16)] == ["LAD", "RCA", "LCx", "LAD", "RCA", "LCx"]
    with pytest.raises(ValueError, match="1-16"):
        territory_of(17)
    with pytest.raises(ValueError, match="level must be one of"):
        segment_of_angle(0.0, 0.0, "apex")
