"""RV insertion placement: the main RV component, the arc, and the cross-slice check (synthetic label maps)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from perfline.toolbox.aha_report import SliceAnalysis, place_rv_insertions
from perfline.toolbox.rv_insertion import (
    InsertionNotFoundError, PlacementSettings, RvArc, SliceRv, angle_difference_deg, circular_mean_deg,
    drop_rv_extension, enhancing_rv_mask, extend_rv_tip, main_rv_mask, place_insertions, rv_arc, rv_first_pass,
    rv_insertion_deg,
)

SHAPE = (96, 96)
CENTER = (48.0, 48.0)
ENDO, EPI = 11.0, 17.0
NO_TIP = PlacementSettings(tip_correction_deg=0.0)  # exact angles in the rule tests


def heart_labels(rv_from_deg: float | None, rv_to_deg: float | None, *, rv_depth: float = 8.0) -> np.ndarray:
    """LV blood pool, myocardial ring and an RV blood pool filling the angles rv_from..rv_to
    (counter-clockwise) just outside the epicardium."""
    rows, cols = np.indices(SHAPE)
    radius = np.hypot(rows - CENTER[0], cols - CENTER[1])
    angle = np.degrees(np.arctan2(-(rows - CENTER[0]), cols - CENTER[1])) % 360
    labels = np.zeros(SHAPE, np.uint8)
    labels[radius < ENDO] = 1
    labels[(radius >= ENDO) & (radius < EPI)] = 2
    if rv_from_deg is not None and rv_to_deg is not None:
        inside = (angle - rv_from_deg) % 360 <= (rv_to_deg - rv_from_deg) % 360
        labels[inside & (radius >= EPI + 1) & (radius < EPI + 1 + rv_depth)] = 3
    return labels


def arc(anterior: float, inferior: float) -> RvArc:
    return RvArc(anterior_deg=anterior % 360, inferior_deg=inferior % 360, n_pixels=100)


def test_arc_ends_width_and_middle_across_zero():
    found = rv_arc(heart_labels(300.0, 60.0), CENTER)
    assert abs(angle_difference_deg(found.anterior_deg, 300.0)) < 3.0
    assert abs(angle_difference_deg(found.inferior_deg, 60.0)) < 3.0
    assert found.width_deg == pytest.approx(120.0, abs=5.0)
    assert abs(angle_difference_deg(found.mid_deg, 0.0)) < 3.0
    assert circular_mean_deg([350.0, 10.0]) == pytest.approx(0.0, abs=1e-9) or \
        circular_mean_deg([350.0, 10.0]) == pytest.approx(360.0, abs=1e-9)


def test_diagonal_one_pixel_chain_is_not_part_of_the_rv():
    # the simulator's truth keeps the largest 4-connected RV component; a CNN mask kept as one
    # 8-connected component can carry a diagonal chain along the epicardium (reference study 6)
    labels = heart_labels(120.0, 240.0)
    clean_insertion = rv_insertion_deg(labels, CENTER)
    rv_rows, rv_cols = np.nonzero(labels == 3)
    angles = np.degrees(np.arctan2(-(rv_rows - CENTER[0]), rv_cols - CENTER[1])) % 360
    start = int(np.argmin(np.abs(angles - clean_insertion)))
    r, c = int(rv_rows[start]), int(rv_cols[start])
    chained = labels.copy()
    for _ in range(8):  # diagonal steps up-right (clockwise about the LV centre at ~120 degrees)
        r, c = r - 1, c + 1
        assert labels[r, c] == 0 and not any(labels[r + dr, c + dc] == 3 for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1)))
        chained[r, c] = 3
    chain_end = math.degrees(math.atan2(-(r - CENTER[0]), c - CENTER[1])) % 360
    assert angle_difference_deg(clean_insertion, chain_end) > 10.0  # the chain reaches > 10 degrees further
    assert main_rv_mask(chained).sum() == (labels == 3).sum()      # the chain is dropped
    assert abs(angle_difference_deg(rv_insertion_deg(chained, CENTER), clean_insertion)) < 1e-9


def test_simulator_truth_rv_is_one_four_connected_component():
    # the definition change must leave the simulator's truth (computed by the same function) alone
    from perfline.simulator import anatomy, study

    for seed in (11, 12):
        parameters = study.sample_study(seed)
        for level in parameters.levels:
            sl = anatomy.render_slice(parameters.anatomy, level, study.MYO_SHAPE, study.MYO_PIXEL_MM,
                                      include_body=False)
            assert np.array_equal(main_rv_mask(sl.labels), sl.labels == 3)


def test_no_rv_raises():
    with pytest.raises(InsertionNotFoundError, match="RV"):
        rv_arc(heart_labels(None, None), CENTER)


def test_consistent_slices_keep_their_own_insertion_with_the_tip_correction():
    slices = [SliceRv("basal", arc(120, 250)), SliceRv("mid", arc(122, 250)), SliceRv("apical", arc(145, 225))]
    placed = place_insertions(slices, PlacementSettings(tip_correction_deg=2.0))
    assert [p.source for p in placed] == ["own"] * 3
    assert [p.flag for p in placed] == [None] * 3
    assert [round(p.insertion_deg, 6) for p in placed] == [118.0, 120.0, 143.0]


def test_basal_outlier_takes_the_mid_value_when_the_apical_agrees_with_mid():
    # reference study 5 stress: basal arc reaches 20 degrees too far anterior
    slices = [SliceRv("basal", arc(93, 226)), SliceRv("mid", arc(112, 225)), SliceRv("apical", arc(133, 202))]
    placed = place_insertions(slices, NO_TIP)
    assert placed[0].source == "other slices" and placed[0].insertion_deg == pytest.approx(112.0)
    assert "disagrees" in placed[0].flag
    assert placed[0].own_deg == pytest.approx(93.0)
    assert [p.source for p in placed[1:]] == ["own", "own"]


def test_majority_of_basal_and_mid_slices_wins():
    slices = [SliceRv("basal", arc(100, 230)), SliceRv("basal", arc(103, 230)), SliceRv("mid", arc(70, 230))]
    placed = place_insertions(slices, NO_TIP)
    assert [p.source for p in placed] == ["own", "own", "other slices"]
    assert placed[2].insertion_deg == pytest.approx(101.5, abs=0.01)


def test_disagreeing_basal_and_mid_without_a_decider_take_their_mean():
    # reference study 6 rest: the apical prediction lies between the two
    slices = [SliceRv("basal", arc(82, 223)), SliceRv("mid", arc(69, 223)), SliceRv("apical", arc(101, 190))]
    placed = place_insertions(slices, NO_TIP)
    assert [p.source for p in placed] == ["mean of slices", "mean of slices", "own"]
    assert placed[0].insertion_deg == pytest.approx(75.5) and placed[1].insertion_deg == pytest.approx(75.5)
    # two slices alone: the mean as well
    placed = place_insertions(slices[:2], NO_TIP)
    assert [p.source for p in placed] == ["mean of slices"] * 2


def test_apical_far_from_the_prediction_is_replaced_and_a_near_one_is_kept():
    basal, mid = SliceRv("basal", arc(100, 240)), SliceRv("mid", arc(100, 240))
    # prediction: middle 170 minus 0.63 x 70 = 125.9 degrees
    far = place_insertions([basal, mid, SliceRv("apical", arc(170, 230))], NO_TIP)[2]
    assert far.source == "other slices" and far.insertion_deg == pytest.approx(125.9, abs=0.01)
    near = place_insertions([basal, mid, SliceRv("apical", arc(140, 200))], NO_TIP)[2]
    assert near.source == "own" and near.insertion_deg == pytest.approx(140.0)


def test_slice_without_rv_takes_the_others_value():
    placed = place_insertions([SliceRv("basal", arc(100, 240)), SliceRv("mid", None), SliceRv("apical", None)], NO_TIP)
    assert placed[1].source == "other slices" and placed[1].insertion_deg == pytest.approx(100.0)
    assert placed[2].insertion_deg == pytest.approx(125.9, abs=0.01)
    assert "RV not found" in placed[1].flag and math.isnan(placed[1].own_deg)
    nothing = place_insertions([SliceRv("mid", None)], NO_TIP)[0]
    assert nothing.source == "none" and math.isnan(nothing.insertion_deg)


def test_given_insertion_is_used_without_labels_rv():
    placed = place_insertions([SliceRv("mid", None, given_deg=120.0)], PlacementSettings(tip_correction_deg=2.0))
    assert placed[0].insertion_deg == pytest.approx(120.0) and placed[0].source == "own"


def test_report_slices_placed_from_their_label_maps():
    mbf = np.ones(SHAPE, np.float32)
    slices = [SliceAnalysis(slice_index=i, mbf_ml_min_g=mbf, labels=labels, lv_center_rc=CENTER,
                            rv_insertion_deg=given)
              for i, (labels, given) in enumerate([(heart_labels(120.0, 240.0), 120.0),
                                                   (heart_labels(90.0, 240.0), 90.0),
                                                   (heart_labels(140.0, 210.0), 140.0),
                                                   (np.zeros(SHAPE, np.uint8), math.nan)])]
    placed = place_rv_insertions(slices, ["basal", "mid", "apical", "mid"], PlacementSettings(tip_correction_deg=1.0))
    assert placed[0].rv_insertion_source == "own"
    assert abs(angle_difference_deg(placed[0].rv_insertion_deg, 119.0)) < 3.0
    # mid arc reaches 30 degrees further anterior than basal's; the apical arc decides for basal
    assert placed[1].rv_insertion_source == "other slices"
    assert placed[1].rv_insertion_deg == pytest.approx(placed[0].rv_insertion_deg)
    assert any("disagrees" in flag for flag in placed[1].flags)
    assert placed[3] is slices[3]  # no myocardium: left alone, it fails for its own reason


def enhancement_series(labels: np.ndarray, peaks: dict[int, float], n_frames: int = 40) -> np.ndarray:
    """float [time, rows, cols]: a first-pass bolus (peak at frame 12) scaled per pixel class."""
    t = np.arange(n_frames, dtype=np.float64)
    bolus = np.where(t > 5, ((t - 5) / 7) ** 2 * np.exp(2 - 2 * (t - 5) / 7), 0.0)
    scale = np.zeros(labels.shape)
    for label, peak in peaks.items():
        scale[labels == label] = peak
    return bolus[:, None, None] * scale[None]



def anterior_epicardial_band(labels: np.ndarray) -> np.ndarray:
    """bool [rows, cols]: a 2.5-pixel band outside the epicardium at 70-121 deg, in the background."""
    rows, cols = np.indices(SHAPE)
    radius = np.hypot(rows - CENTER[0], cols - CENTER[1])
    angle = np.degrees(np.arctan2(-(rows - CENTER[0]), cols - CENTER[1])) % 360
    return (angle >= 70.0) & (angle < 121.0) & (radius >= EPI) & (radius < EPI + 2.5) & (labels == 0)

def test_non_enhancing_band_merged_into_the_rv_is_dropped():
    # fresh study 2**30 + 107: a thin band along the anterior epicardium, 8 % of the RV's
    # enhancement, merged into the RV mask moved the insertion by 25-41 degrees
    labels = heart_labels(120.0, 240.0)
    band = anterior_epicardial_band(labels)
    series = enhancement_series(np.where(band, 9, labels), {1: 4.0, 2: 0.6, 3: 5.0, 9: 0.4})
    merged = labels.copy()
    merged[band] = 3
    assert angle_difference_deg(rv_insertion_deg(labels, CENTER), rv_insertion_deg(merged, CENTER)) > 40.0
    cleaned, shift = drop_rv_extension(merged, series, CENTER)
    assert shift > 40.0
    assert abs(angle_difference_deg(rv_insertion_deg(cleaned, CENTER), rv_insertion_deg(labels, CENTER))) < 1.0
    assert np.array_equal(cleaned == 3, labels == 3)


def test_partial_volume_wedge_of_a_correct_rv_is_kept():
    # the thin RV wedge at the insertion enhances weakly (partial volume) but is RV: a trim that
    # moves the insertion by less than min_shift_deg leaves the labels alone
    labels = heart_labels(120.0, 240.0)
    rows, cols = np.indices(SHAPE)
    angle = np.degrees(np.arctan2(-(rows - CENTER[0]), cols - CENTER[1])) % 360
    wedge = (labels == 3) & (angle < 128.0)
    series = enhancement_series(np.where(wedge, 9, labels), {1: 4.0, 2: 0.6, 3: 5.0, 9: 1.0})
    trimmed = np.where((labels == 3) & ~enhancing_rv_mask(labels, series), 0, labels)
    would_move = angle_difference_deg(rv_insertion_deg(trimmed, CENTER), rv_insertion_deg(labels, CENTER))
    assert 2.0 < would_move < 15.0  # the weak wedge would be trimmed, moving the end a few degrees ...
    cleaned, shift = drop_rv_extension(labels, series, CENTER)
    assert shift == 0.0 and np.array_equal(cleaned, labels)  # ... so the labels are left alone


def test_rv_mask_check_rejects_a_series_of_another_shape():
    with pytest.raises(ValueError, match="expected series"):
        enhancing_rv_mask(heart_labels(120.0, 240.0), np.zeros((10, 5, 5)))


def test_failed_slice_with_an_rv_does_not_vote():
    # a mid slice with RV labels but no LV or myocardium (a failed segmentation keeps the crop centre):
    # the good basal slice keeps its own insertion instead of being averaged with the failed one
    mbf = np.ones(SHAPE, np.float32)
    failed = np.where(heart_labels(150.0, 250.0) == 3, 3, 0).astype(np.uint8)
    slices = [SliceAnalysis(slice_index=0, mbf_ml_min_g=mbf, labels=heart_labels(100.0, 220.0), lv_center_rc=CENTER,
                            rv_insertion_deg=100.0),
              SliceAnalysis(slice_index=1, mbf_ml_min_g=mbf, labels=failed, lv_center_rc=CENTER,
                            rv_insertion_deg=150.0)]
    placed = place_rv_insertions(slices, ["basal", "mid"], NO_TIP)
    assert placed[0].rv_insertion_source == "own"
    assert abs(angle_difference_deg(placed[0].rv_insertion_deg, 100.0)) < 3.0
    assert placed[1] is slices[1]


def wedge_heart(strip_from_deg: float, strip_to_deg: float = 126.0) -> tuple[np.ndarray, np.ndarray]:
    """(labels as the CNN sees them, mask of the thin RV wedge it leaves out): an RV from 120 to 240
    degrees (one background pixel off the epicardium) and a one-pixel strip of RV blood along the
    epicardium (strip_from_deg .. strip_to_deg) that runs on from under the RV's anterior end, as
    at the simulator's insertions."""
    labels = heart_labels(120.0, 240.0)
    rows, cols = np.indices(SHAPE)
    radius = np.hypot(rows - CENTER[0], cols - CENTER[1])
    angle = np.degrees(np.arctan2(-(rows - CENTER[0]), cols - CENTER[1])) % 360
    strip = (angle >= strip_from_deg) & (angle < strip_to_deg) & (radius >= EPI) & (radius < EPI + 1.0) & (labels == 0)
    return labels, strip


def test_blurred_thin_rv_wedge_joins_the_rv():
    # dev studies 2**30 + 201 / + 228: the one-pixel RV wedge along the epicardium reaches 10-30 % of
    # the RV core's enhancement in the chain's series and the CNN stops 9-14 degrees short of it
    labels, strip = wedge_heart(106.0)
    series = enhancement_series(np.where(strip, 9, labels), {1: 4.0, 2: 0.6, 3: 5.0, 9: 1.25})
    before = rv_insertion_deg(labels, CENTER)
    grown, added = extend_rv_tip(labels, series, CENTER)
    joined = (grown == 3) & (labels != 3)
    assert added == int(joined.sum()) >= int(strip.sum()) - 1  # a pixel only diagonally connected stays out
    assert not (joined & ~strip).any()
    assert np.array_equal(grown == 1, labels == 1)
    after = rv_insertion_deg(grown, CENTER)
    truth = rv_insertion_deg(np.where(strip, 3, labels), CENTER)  # the truth's definition: 4-connected
    assert angle_difference_deg(before, after) > 8.0
    assert abs(angle_difference_deg(after, truth)) < 1.0


def test_rv_bolus_at_the_start_of_the_series_takes_its_trough_as_baseline():
    # held-out rest 2**30+2067: the contrast reached the RV before the series' first frame, so the
    # RV core sat at its peak in the "baseline" frames; the first-pass check then found no
    # enhancement and the tip growth did nothing (the CNN's RV stopped 12-20 deg short)
    from perfline.toolbox.rv_insertion import baseline_window

    labels, strip = wedge_heart(106.0)
    series = enhancement_series(np.where(strip, 9, labels), {1: 4.0, 2: 0.6, 3: 5.0, 9: 1.25})
    late_rv = np.where(np.isin(labels, (3,)) | strip, series, 0.0)
    early = series.copy()
    early[:, (labels == 3) | strip] = np.roll(late_rv, -12, axis=0)[:, (labels == 3) | strip]  # RV peak at frame 0
    early[-12:, (labels == 3) | strip] = late_rv[-1, (labels == 3) | strip]  # the RV's late level after the roll
    core_curve = np.median(early[:, labels == 3], axis=1)
    window = baseline_window(core_curve, 3)
    assert window.start > 3 and core_curve[window].mean() < 0.1 * core_curve.max()
    assert rv_first_pass(labels, early) is not None
    grown, added = extend_rv_tip(labels, early, CENTER)
    assert added >= int(strip.sum()) - 1
    assert angle_difference_deg(rv_insertion_deg(labels, CENTER), rv_insertion_deg(grown, CENTER)) > 8.0
    # a series with its pre-contrast frames keeps them (the test above, unchanged)
    assert baseline_window(np.median(series[:, labels == 3], axis=1), 3) == slice(0, 3)
    noisy = np.median(series[:, labels == 3], axis=1) + np.random.default_rng(0).normal(0, 0.02, series.shape[0])
    assert baseline_window(noisy, 3) == slice(0, 3)


def test_non_enhancing_strip_along_the_epicardium_is_not_joined():
    # the same geometry with epicardial fat (5 % of the RV's enhancement, below min_peak_fraction)
    labels, strip = wedge_heart(106.0)
    series = enhancement_series(np.where(strip, 9, labels), {1: 4.0, 2: 0.6, 3: 5.0, 9: 0.25})
    grown, added = extend_rv_tip(labels, series, CENTER)
    assert added == 0 and grown is labels


def test_rv_tip_growth_stops_after_max_steps():
    # an enhancing band all the way round the epicardium must not carry the RV round the LV
    labels, band = wedge_heart(0.0, 360.0)
    series = enhancement_series(np.where(band, 9, labels), {1: 4.0, 2: 0.6, 3: 5.0, 9: 2.0})
    grown, added = extend_rv_tip(labels, series, CENTER, max_steps=3)
    assert 0 < added < band.sum()
    joined = (grown == 3) & (labels != 3)
    distance_from_rv = ndimage.distance_transform_cdt(labels != 3, metric="taxicab")
    assert distance_from_rv[joined].max() <= 3
    assert abs(angle_difference_deg(rv_insertion_deg(labels, CENTER), rv_insertion_deg(grown, CENTER))) < 20.0


def test_rv_tip_growth_needs_an_rv_and_a_first_pass():
    labels = heart_labels(None, None)
    series = enhancement_series(labels, {1: 4.0, 2: 0.6})
    assert extend_rv_tip(labels, series, CENTER) == (labels, 0)
    rv_labels = heart_labels(120.0, 240.0)
    assert extend_rv_tip(rv_labels, np.zeros((20, *SHAPE)), CENTER)[1] == 0  # the core does not enhance
    with pytest.raises(ValueError, match="expected series"):
        extend_rv_tip(rv_labels, np.zeros((10, 5, 5)), CENTER)


def test_rv_first_pass_peak_fraction_is_relative_to_the_rv_core():
    labels = heart_labels(120.0, 240.0)
    marked = np.where(labels == 0, 9, labels)
    series = enhancement_series(marked, {1: 4.0, 2: 0.6, 3: 5.0, 9: 1.5}) + 0.7  # a pre-contrast baseline
    first_pass = rv_first_pass(labels, series)
    assert first_pass is not None and first_pass.core.sum() < first_pass.rv.sum()
    assert np.allclose(first_pass.peak_fraction[first_pass.rv], 1.0)
    assert np.allclose(first_pass.peak_fraction[labels == 0], 0.3)
    assert np.allclose(first_pass.peak_fraction[labels == 2], 0.12)
    assert rv_first_pass(heart_labels(None, None), series) is None


def test_refine_rv_mask_does_not_grow_back_a_trimmed_weakly_enhancing_band():
    from perfline.toolbox.rv_insertion import angle_difference_deg, refine_rv_mask

    labels = heart_labels(120.0, 240.0)
    band = anterior_epicardial_band(labels)
    truth = rv_insertion_deg(labels, CENTER)
    for fraction in (0.08, 0.18, 0.22):  # under the trim's 25 %, above the growth's 15 % for two
        series = enhancement_series(np.where(band, 9, labels), {1: 4.0, 2: 0.6, 3: 5.0, 9: 5.0 * fraction})
        merged = labels.copy()
        merged[band] = 3
        refined, trimmed, added = refine_rv_mask(merged, series, CENTER)
        assert trimmed > 15 and added == 0
        assert abs(angle_difference_deg(rv_insertion_deg(refined, CENTER), truth)) < 2.0
