"""AHA report on synthetic rings whose MBF is set per true segment (angle computed here)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from scipy import ndimage

from perfline.toolbox.aha_report import (
    PerfusionReport, ReportInputError, ReportSettings, SliceAnalysis, StudyInfo, assign_slice_levels,
    build_report, perfusion_reserve, report_json_schema, sector_wall_thickness_mm, with_reserve,
)

SHAPE = (96, 96)
CENTER = (48.0, 50.0)


def ring_labels(inner: float = 12.0, outer: float = 19.0, center=CENTER) -> np.ndarray:
    rows, cols = np.indices(SHAPE)
    radius = np.hypot(rows - center[0], cols - center[1])
    labels = np.zeros(SHAPE, np.uint8)
    labels[radius < inner] = 1
    labels[(radius >= inner) & (radius < outer)] = 2
    labels[(np.hypot(rows - center[0], cols - (center[1] - 26)) < 10) & (labels == 0)] = 3
    return labels


def relative_angle(rv_deg: float, center=CENTER) -> np.ndarray:
    rows, cols = np.indices(SHAPE)
    angle = np.degrees(np.arctan2(-(rows - center[0]), cols - center[1])) % 360
    return (angle - rv_deg) % 360


def mbf_by_segment(level: str, rv_deg: float, values: dict[int, float]) -> np.ndarray:
    """MBF map whose value at each pixel is ``values[segment]`` of the true AHA segment."""
    a = relative_angle(rv_deg)
    if level == "apical":
        index = ((a - 15) % 360 // 90).astype(int)
        numbers = np.array([14, 15, 16, 13])[index]
    else:
        index = (a // 60).astype(int)
        first = 1 if level == "basal" else 7
        numbers = np.array([first + 1, first + 2, first + 3, first + 4, first + 5, first])[index]
    return np.vectorize(values.get)(numbers).astype(np.float32)


def three_slices(rv_deg: float = 120.0, values: dict[int, float] | None = None) -> list[SliceAnalysis]:
    values = values or {seg: 1.0 + 0.1 * seg for seg in range(1, 17)}
    slices = []
    for index, level in enumerate(("basal", "mid", "apical")):
        slices.append(SliceAnalysis(slice_index=index, mbf_ml_min_g=mbf_by_segment(level, rv_deg, values),
                                    labels=ring_labels(), lv_center_rc=CENTER, rv_insertion_deg=rv_deg,
                                    slice_position_mm=-10.0 + 10.0 * index, pixel_spacing_mm=(1.5, 1.5),
                                    ps_ml_min_g=np.full(SHAPE, 1.3, np.float32),
                                    vp=np.full(SHAPE, 0.07, np.float32)))
    return slices


@pytest.mark.parametrize("positions, basal_at, expected", [
    ([0.0], "lowest", ["mid"]),
    ([5.0, -5.0], "lowest", ["apical", "basal"]),
    ([-10.0, 0.0, 10.0], "lowest", ["basal", "mid", "apical"]),
    ([-10.0, 0.0, 10.0], "highest", ["apical", "mid", "basal"]),
    ([3.0, 1.0, 2.0, 0.0, 4.0, 5.0], "lowest", ["mid", "basal", "mid", "basal", "apical", "apical"]),
], ids=["one", "two", "three", "three-flipped", "six"])
def test_assign_slice_levels(positions, basal_at, expected):
    assert assign_slice_levels(positions, basal_at=basal_at) == expected


def test_assign_slice_levels_rejects_nan():
    with pytest.raises(ReportInputError, match="finite"):
        assign_slice_levels([0.0, float("nan")])


@pytest.mark.parametrize("rv_deg", [120.0, 95.0, 200.0], ids=["standard", "rotated-95", "rotated-200"])
def test_segment_values_recovered(rv_deg):
    values = {seg: 1.0 + 0.1 * seg for seg in range(1, 17)}
    report = build_report(three_slices(rv_deg, values), study=StudyInfo(patient_id="p", scan="stress"))
    assert len(report.segments) == 16
    for seg in report.segments:
        assert seg.mbf_median_ml_min_g == pytest.approx(values[seg.segment], abs=1e-6)
        # mean may include a few border pixels whose angle falls on a boundary: still close
        assert seg.mbf_mean_ml_min_g == pytest.approx(values[seg.segment], abs=0.02)
        assert seg.flags == []
        assert seg.ps_mean_ml_min_g == pytest.approx(1.3)
    assert report.missing_levels == [] and not report.partial
    lad = next(t for t in report.territories if t.territory == "LAD")
    assert lad.segments == [1, 2, 7, 8, 13, 14]
    assert min(values[s] for s in lad.segments) < lad.mbf_mean_ml_min_g < max(values[s] for s in lad.segments)


def test_anterior_defect_lands_in_anterior_segments():
    """A defect drawn at the top of the image (anterior, above the LV) must show in segments 1/7/13."""
    slices = []
    rows, _ = np.indices(SHAPE)
    for index in range(3):
        mbf = np.full(SHAPE, 3.0, np.float32)
        cols = np.indices(SHAPE)[1]
        top = (rows < CENTER[0] - 8) & (np.abs(cols - CENTER[1]) < 6)
        mbf[top] = 1.0
        slices.append(SliceAnalysis(slice_index=index, mbf_ml_min_g=mbf, labels=ring_labels(), lv_center_rc=CENTER,
                                    rv_insertion_deg=120.0, slice_position_mm=float(index)))
    report = build_report(slices)
    lowest = sorted(report.segments, key=lambda s: s.mbf_mean_ml_min_g)[:3]
    assert {s.segment for s in lowest} == {1, 7, 13}
    assert report.global_values.mbf_mean_ml_min_g < 3.0


def test_global_mean_and_median_over_pixels():
    report = build_report(three_slices(), settings=ReportSettings(border_exclusion_px=0))
    pooled = np.concatenate([s.mbf_ml_min_g[s.labels == 2] for s in three_slices()])
    assert report.global_values.mbf_mean_ml_min_g == pytest.approx(float(pooled.mean()), rel=1e-6)
    assert report.global_values.mbf_median_ml_min_g == pytest.approx(float(np.median(pooled)), rel=1e-6)
    assert report.global_values.n_pixels == pooled.size
    assert report.global_values.vp_mean == pytest.approx(0.07)


def test_headline_global_is_the_pixel_weighted_mean_of_segment_medians():
    # a defect in 4 of the 16 segments with a noisy pixel in every segment: the pooled median is the
    # normal value, the pooled mean is pulled by the noisy pixels; the headline global estimates the
    # myocardial mean from the segment medians
    values = {seg: (1.0 if seg in (1, 7, 8, 13) else 3.0) for seg in range(1, 17)}
    slices = three_slices(values=values)
    for item in slices:
        rows, cols = np.nonzero(item.labels == 2)
        item.mbf_ml_min_g[rows[::40], cols[::40]] = 50.0
    report = build_report(slices, settings=ReportSettings(border_exclusion_px=0, exclude_fit_limit=False))
    counts = np.array([s.n_pixels for s in report.segments], dtype=np.float64)
    medians = np.array([s.mbf_median_ml_min_g for s in report.segments])
    expected = float(np.dot(counts, medians) / counts.sum())
    assert report.global_values.mbf_ml_min_g == pytest.approx(expected)
    assert 1.5 < report.global_values.mbf_ml_min_g < 2.9
    assert report.global_values.mbf_median_ml_min_g == pytest.approx(3.0)
    assert report.global_values.mbf_mean_ml_min_g > report.global_values.mbf_ml_min_g + 0.3


def test_border_pixels_are_left_out_of_the_statistics():
    import scipy.ndimage as ndi

    slices = three_slices()
    # a partial-volume rim fitted at the top of the flow range must not reach the report
    for item in slices:
        rim = (item.labels == 2) & ~ndi.binary_erosion(item.labels == 2)
        item.mbf_ml_min_g[rim] = 6.0
    report = build_report(slices)  # default: one border pixel left out
    pooled = np.concatenate([s.mbf_ml_min_g[ndi.binary_erosion(s.labels == 2)] for s in slices])
    assert report.global_values.n_pixels == pooled.size
    assert report.global_values.mbf_mean_ml_min_g == pytest.approx(float(pooled.mean()), rel=1e-6)
    assert np.nanmax(pooled) < 6.0


def test_failed_slice_and_missing_level_flagged():
    slices = three_slices()
    broken = slices[2]
    slices[2] = SliceAnalysis(slice_index=2, mbf_ml_min_g=broken.mbf_ml_min_g, labels=broken.labels,
                              lv_center_rc=CENTER, rv_insertion_deg=float("nan"), slice_position_mm=10.0)
    report = build_report(slices)
    assert report.partial
    assert report.missing_levels == ["apical"]
    assert report.slices[2].failed and "no RV insertion found" in report.slices[2].flags
    for seg in report.segments[12:]:
        assert seg.mbf_mean_ml_min_g is None and seg.flags and seg.flags[0].startswith("missing")
    assert report.segment(7).mbf_mean_ml_min_g is not None
    assert any("slice 2" in flag for flag in report.flags)


def test_no_fit_slice_fails():
    slices = three_slices()
    slices[0] = SliceAnalysis(slice_index=0, mbf_ml_min_g=np.full(SHAPE, np.nan, np.float32),
                              labels=ring_labels(), lv_center_rc=CENTER, rv_insertion_deg=120.0,
                              slice_position_mm=-10.0)
    report = build_report(slices)
    assert report.slices[0].failed and report.missing_levels == ["basal"]
    assert report.slices[0].fit_limit_fraction is None and report.slices[1].fit_limit_fraction == 0.0


def test_slice_mostly_at_the_fit_limit_fails():
    # held-out rest study 2**30 + 5: the CNN put the apical "myocardium" outside the heart, and the
    # fit ran to the top of its grid (6.0 ml/min/g) on every pixel
    slices = three_slices()
    apical = np.asarray(slices[2].mbf_ml_min_g).copy()
    apical[: SHAPE[0] // 2 + 8] = 6.0  # the top part of the ring and more: > 50 % of the pixels
    slices[2] = SliceAnalysis(slice_index=2, mbf_ml_min_g=apical, labels=ring_labels(), lv_center_rc=CENTER,
                              rv_insertion_deg=120.0, slice_position_mm=10.0)
    report = build_report(slices)
    assert report.slices[2].failed and report.missing_levels == ["apical"]
    assert any("fit limit" in flag for flag in report.slices[2].flags)
    assert report.slices[2].fit_limit_fraction > 0.5 and report.slices[0].fit_limit_fraction == 0.0
    assert report.global_values.mbf_mean_ml_min_g < 2.5
    # below the fraction the slice stays (a few pixels at the limit are fit noise)
    apical = np.asarray(three_slices()[2].mbf_ml_min_g).copy()
    apical[: SHAPE[0] // 2 - 8] = 6.0
    slices[2] = SliceAnalysis(slice_index=2, mbf_ml_min_g=apical, labels=ring_labels(), lv_center_rc=CENTER,
                              rv_insertion_deg=120.0, slice_position_mm=10.0)
    assert not build_report(slices).slices[2].failed


def test_pixels_at_the_fit_limit_are_left_out_of_the_statistics():
    slices = three_slices(values={seg: 2.0 for seg in range(1, 17)})
    rng = np.random.default_rng(0)
    for item in slices:
        item.mbf_ml_min_g[rng.random(SHAPE) < 0.2] = 6.0  # fits on the top of the grid: no estimate
    report = build_report(slices)
    assert report.global_values.mbf_mean_ml_min_g == pytest.approx(2.0)
    assert all(s.mbf_mean_ml_min_g == pytest.approx(2.0) for s in report.segments)
    # the report says how many it left out: the share of each slice's analysed (core) pixels at the limit
    for item, summary in zip(slices, report.slices):
        core = ndimage.binary_erosion(np.asarray(item.labels) == 2)
        assert summary.fit_limit_fraction == pytest.approx(float(np.mean(item.mbf_ml_min_g[core] >= 5.9)))
        assert 0.15 < summary.fit_limit_fraction < 0.25
    kept = build_report(slices, settings=ReportSettings(exclude_fit_limit=False))
    assert kept.global_values.mbf_mean_ml_min_g == pytest.approx(2.0 + 0.2 * 4.0, abs=0.15)
    assert report.segment(1).n_pixels < kept.segment(1).n_pixels


def test_the_fit_limit_is_tested_on_the_fit_values_before_a_noise_bias_correction():
    # flow-map with simex_pairs divides the map by the slice's SIMEX ratio: a valid fit at 5.8 divided by
    # 0.95 reads 6.1 but is no fit-limit pixel; a fit at the grid's top (6.0) still is
    slices = three_slices(values={seg: 5.8 / 0.95 for seg in range(1, 17)})
    rng = np.random.default_rng(0)
    for item in slices:
        item.mbf_ml_min_g[rng.random(SHAPE) < 0.2] = 6.0 / 0.95
    corrected = [dataclasses.replace(item, mbf_noise_ratio=0.95) for item in slices]
    report = build_report(corrected)
    assert report.global_values.mbf_mean_ml_min_g == pytest.approx(5.8 / 0.95, rel=1e-5)
    assert [s.mbf_noise_ratio for s in report.slices] == [0.95] * 3
    assert not any(s.failed for s in report.slices)
    uncorrected = build_report(slices)  # without the ratio every pixel is at or above the limit
    assert all(s.failed for s in uncorrected.slices) and uncorrected.slices[0].mbf_noise_ratio is None


def test_thin_wall_and_few_pixels_flagged():
    thin = SliceAnalysis(slice_index=0, mbf_ml_min_g=np.full(SHAPE, 2.0, np.float32),
                         labels=ring_labels(inner=15.0, outer=16.2), lv_center_rc=CENTER, rv_insertion_deg=120.0,
                         pixel_spacing_mm=(1.0, 1.0))
    report = build_report([thin], levels=["mid"], settings=ReportSettings(min_wall_thickness_mm=3.0,
                                                                         min_sector_pixels=30))
    flags = report.segment(8).flags
    assert any(f.startswith("thin wall") for f in flags)
    assert any(f.startswith("few pixels") for f in flags)
    thick = build_report(three_slices())
    assert all(not s.flags for s in thick.segments)


def test_wall_thickness_matches_ring():
    labels = ring_labels(inner=12.0, outer=19.0)
    segment_map = np.where(labels == 2, 1, 0).astype(np.uint8)
    thickness = sector_wall_thickness_mm(segment_map, CENTER, (2.0, 2.0))
    assert thickness[1] == pytest.approx(14.0, abs=2.5)  # 7 px ring at 2 mm


def test_shape_mismatch_rejected():
    item = SliceAnalysis(slice_index=0, mbf_ml_min_g=np.zeros((10, 10)), labels=ring_labels(),
                         lv_center_rc=CENTER, rv_insertion_deg=120.0)
    with pytest.raises(ReportInputError, match="expected the labels' shape"):
        build_report([item])


def test_reserve_and_json_round_trip():
    stress = build_report(three_slices(values={s: 3.0 for s in range(1, 17)}),
                          study=StudyInfo(patient_id="P1", study_id="S", scan="stress"))
    rest = build_report(three_slices(values={s: 0.75 for s in range(1, 17)}),
                        study=StudyInfo(patient_id="P1", study_id="R", scan="rest"))
    combined = with_reserve(rest, stress)
    assert combined.reserve is not None and combined.reserve.global_mpr == pytest.approx(4.0)
    assert all(s.mpr == pytest.approx(4.0) for s in combined.reserve.segments)
    assert combined.reserve.stress_global_mbf_ml_min_g == pytest.approx(stress.global_values.mbf_ml_min_g)
    restored = PerfusionReport.model_validate_json(combined.model_dump_json())
    assert restored == combined
    with pytest.raises(ReportInputError, match="same patient"):
        perfusion_reserve(stress, rest.model_copy(update={"study": StudyInfo(patient_id="P2", scan="rest")}))
    with pytest.raises(ReportInputError, match="one stress and one rest"):
        with_reserve(stress, stress)


def test_schema_file_is_current():
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "docs" / "report_schema.json"
    assert json.loads(path.read_text()) == report_json_schema()


def test_lv_corner_exclusion_leaves_out_the_pixels_that_touch_the_lv_pool_diagonally():
    """The border ring (edge neighbours) keeps the pixels that touch the LV blood pool only at a corner; their
    curves carry LV blood (docs/mapping.md "Session 28"). With ``lv_corner_exclusion`` the statistics leave
    them out; the epicardial side is unchanged."""
    labels = ring_labels()
    myocardium = labels == 2
    lv = labels == 1
    ring = myocardium & ~ndimage.binary_erosion(myocardium)
    edge_touching = ndimage.binary_dilation(lv) & myocardium          # the LV border ring (edge neighbours)
    corners = ndimage.binary_dilation(lv, np.ones((3, 3), bool)) & myocardium & ~edge_touching
    assert corners.sum() > 8 and not (corners & ring).any()           # the border ring keeps them
    slices = three_slices(values={seg: 2.0 for seg in range(1, 17)})
    for item in slices:
        item.mbf_ml_min_g[corners] = 0.5                              # what blood-contaminated corner pixels read
    plain = build_report(slices)
    excluded = build_report(slices, settings=ReportSettings(lv_corner_exclusion=True))
    analysed = int((myocardium & ~ring).sum())
    assert plain.slices[1].n_myocardium_pixels == excluded.slices[1].n_myocardium_pixels == int(myocardium.sum())
    assert plain.global_values.n_pixels == 3 * analysed
    assert excluded.global_values.n_pixels == 3 * (analysed - int(corners.sum()))
    assert plain.global_values.mbf_mean_ml_min_g < 2.0
    assert excluded.global_values.mbf_mean_ml_min_g == pytest.approx(2.0)
