"""Report image: shape, bull's-eye layout (anterior up, septum left) and values changing pixels."""

from __future__ import annotations

import numpy as np
import pytest

from perfline.toolbox.aha_report import (
    GlobalValues, PerfusionReport, SegmentValues, StudyInfo, TerritoryValues, with_reserve,
)
from perfline.toolbox.aha import SEGMENT_NAMES, territory_of
from perfline.toolbox.report_figure import render_report, save_png, segment_wedge_angles


def make_report(values: dict[int, float | None], scan: str = "stress", patient: str = "P") -> PerfusionReport:
    segments = [SegmentValues(segment=s, name=SEGMENT_NAMES[s], territory=territory_of(s),
                              level="basal" if s <= 6 else "mid" if s <= 12 else "apical",
                              n_pixels=50, mbf_mean_ml_min_g=values.get(s), mbf_median_ml_min_g=values.get(s),
                              flags=[] if values.get(s) is not None else ["missing: level not imaged"])
                for s in range(1, 17)]
    finite = [v for v in values.values() if v is not None]
    mean = float(np.mean(finite)) if finite else None
    return PerfusionReport(study=StudyInfo(patient_id=patient, scan=scan), slices=[], segments=segments,
                           territories=[TerritoryValues(territory=t, segments=[]) for t in ("LAD", "RCA", "LCx")],
                           global_values=GlobalValues(n_pixels=800, mbf_mean_ml_min_g=mean, mbf_median_ml_min_g=mean))




@pytest.mark.parametrize("segment, centre_deg", [(1, 90), (2, 150), (4, 270), (6, 30), (7, 90), (14, 180),
                                                 (15, 270), (16, 0)],
                         ids=lambda v: str(v))
def test_wedge_layout(segment, centre_deg):
    _, _, start, end = segment_wedge_angles(segment)
    assert ((start + end) / 2) % 360 == pytest.approx(centre_deg)


def test_wedge_rejects_bad_segment():
    with pytest.raises(ValueError, match="1-16"):
        segment_wedge_angles(17)


def test_render_shape_and_content(tmp_path):
    image = render_report(make_report({s: 2.5 for s in range(1, 17)}))
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert image.shape[:2] == (700, 1200)
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 20  # not blank
    save_png(image, tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_defect_changes_bullseye_pixels_only_left():
    normal = render_report(make_report({s: 2.5 for s in range(1, 17)}))
    values = {s: 2.5 for s in range(1, 17)}
    values[4] = 0.8
    defect = render_report(make_report(values))
    changed = np.any(normal != defect, axis=2)
    rows, cols = np.nonzero(changed)
    assert rows.size > 500  # a whole wedge recoloured
    # the inferior wedge (segment 4) lies below the bull's-eye centre: the changed region's centroid
    # must be in the lower half of the bull's-eye, in the left part of the figure
    assert np.median(cols) < image_width_fraction(normal, 0.45)
    assert np.median(rows) > normal.shape[0] * 0.5


def image_width_fraction(image: np.ndarray, fraction: float) -> float:
    return image.shape[1] * fraction


def test_missing_segments_and_reserve_render():
    rest = make_report({s: 0.7 for s in range(1, 17)}, scan="rest")
    stress = make_report({s: (2.8 if s < 13 else None) for s in range(1, 17)}, scan="stress")
    combined = render_report(with_reserve(stress, rest))
    alone = render_report(stress)
    assert combined.shape == alone.shape and np.any(combined != alone)
    assert render_report(make_report({})).shape == (700, 1200, 3)


def test_save_png_rejects_float():
    with pytest.raises(ValueError, match="uint8"):
        save_png(np.zeros((4, 4, 3)), "/tmp/never.png")


def test_map_panels_drawn_with_contours():
    from perfline.toolbox.report_figure import SliceMapView
    from perfline.toolbox.sector_contours import sector_contours

    rows, cols = np.indices((64, 64))
    myocardium = (np.hypot(rows - 32, cols - 32) >= 10) & (np.hypot(rows - 32, cols - 32) < 16)
    mbf = np.where(myocardium, 2.5, np.nan)
    report = make_report({s: 2.5 for s in range(1, 17)})
    plain = SliceMapView("slice 0 (mid)", mbf)
    outlined = SliceMapView("slice 0 (mid)", mbf, sector_contours(myocardium, (32.0, 32.0), 120.0, "mid"))
    without, with_plain, with_contours = (render_report(report), render_report(report, slice_maps=[plain]),
                                          render_report(report, slice_maps=[outlined]))
    assert without.shape == (700, 1200, 3) and with_plain.shape == (1020, 1200, 3)
    top_plain, top_contours = with_plain[:330], with_contours[:330]
    # territory colours appear only where contours are drawn: pure red (LCx) pixels
    red = lambda image: np.sum((image[..., 0] > 200) & (image[..., 1] < 60) & (image[..., 2] < 60))  # noqa: E731
    assert red(top_contours) > red(top_plain) + 20


def test_table_cells_carry_territory_colours_and_red_flags():
    """The segment table (right of the bull's-eye): every segment's territory cell in its colour, and a
    segment's flags in red only where it has flags."""
    from matplotlib.colors import to_rgb

    table = lambda image: image[:, 620:]  # noqa: E731  (the bull's-eye and its colour bar end left of this)

    def count(image: np.ndarray, colour: str, tolerance: int = 6) -> int:
        rgb = np.array([round(255 * v) for v in to_rgb(colour)])
        return int(np.sum(np.all(np.abs(table(image).astype(int) - rgb) <= tolerance, axis=2)))

    plain = render_report(make_report({s: 2.5 for s in range(1, 17)}))
    flagged = render_report(make_report({s: (2.5 if s != 7 else None) for s in range(1, 17)}))
    cell = count(plain, "#e6c700") / 6  # six LAD segments
    assert cell > 300  # a filled cell, not a glyph's worth
    assert count(plain, "#2ca02c") == pytest.approx(5 * cell, rel=0.1)  # five RCA segments
    assert count(plain, "#d62728") == pytest.approx(5 * cell, rel=0.1)  # five LCx segments
    red = lambda image: int(np.sum((table(image)[..., 0] > 150) & (table(image)[..., 1] < 20)  # noqa: E731
                                   & (table(image)[..., 2] < 20)))  # the flags colour #b00000, not LCx
    assert red(flagged) > red(plain) + 50
