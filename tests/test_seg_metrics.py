"""Metrics, post-processing and RV insertion on synthetic label maps with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from perfline.toolbox import seg_metrics
from perfline.toolbox.rv_insertion import InsertionNotFoundError, rv_arc_deg, rv_insertion_deg
from perfline.toolbox.segmentation_post import is_closed_ring, postprocess, single_component


def phantom_labels(shape=(96, 96), center=(48.0, 48.0), blood_r=10.0, epi_r=16.0,
                   rv_from_deg=120.0, rv_to_deg=240.0, shift=(0, 0)) -> np.ndarray:
    rows, cols = np.indices(shape, dtype=float)
    r0, c0 = center[0] + shift[0], center[1] + shift[1]
    radius = np.hypot(rows - r0, cols - c0)
    angle = np.degrees(np.arctan2(-(rows - r0), cols - c0)) % 360
    labels = np.zeros(shape, np.uint8)
    labels[radius < epi_r] = 2
    labels[radius < blood_r] = 1
    labels[(radius > epi_r + 1) & (radius < epi_r + 12) & (angle >= rv_from_deg)
           & (angle <= rv_to_deg)] = 3
    return labels


def test_dice_and_rates_known_values():
    a = np.zeros((10, 10), bool); a[:, :5] = True          # 50 px
    m = np.zeros((10, 10), bool); m[:, 2:7] = True         # 50 px, overlap 30
    assert seg_metrics.dice(a, m) == pytest.approx(0.6)
    rates = seg_metrics.overlap_rates(a, m)
    assert rates["false_positive"] == pytest.approx(0.4)
    assert rates["false_negative"] == pytest.approx(0.4)
    assert rates["precision"] == pytest.approx(0.6)
    assert seg_metrics.dice(np.zeros((4, 4)), np.zeros((4, 4))) == 1.0


def test_shifted_ring_distances_scale_with_spacing():
    truth = phantom_labels()
    auto = phantom_labels(shift=(0, 2))
    same = seg_metrics.slice_metrics(truth, truth, 1.0)
    assert same.dice == 1.0 and same.boundary_error_mm == 0.0 and same.hausdorff_epi_mm == 0.0
    one = seg_metrics.slice_metrics(auto, truth, 1.0)
    two = seg_metrics.slice_metrics(auto, truth, 2.0)
    assert one.hausdorff_epi_mm == pytest.approx(2.0)
    assert one.hausdorff_endo_mm == pytest.approx(2.0)
    assert two.hausdorff_epi_mm == pytest.approx(4.0)
    assert 0 < one.boundary_error_mm < 2.0
    assert two.boundary_error_mm == pytest.approx(2 * one.boundary_error_mm)
    assert one.hausdorff95_epi_mm <= one.hausdorff_epi_mm
    assert one.dice < 1.0


def test_empty_auto_gives_nan_distances_not_crash():
    truth = phantom_labels()
    result = seg_metrics.slice_metrics(np.zeros_like(truth), truth, 1.0)
    assert result.dice == 0.0 and np.isnan(result.boundary_error_mm)


def test_angle_error_wraps():
    assert seg_metrics.angle_error_deg(359.0, 1.0) == pytest.approx(2.0)
    assert seg_metrics.angle_error_deg(10.0, 190.0) == pytest.approx(180.0)


def test_summarize_interval():
    stats = seg_metrics.summarize(np.r_[np.arange(101.0), np.nan])
    assert stats["n"] == 101 and stats["mean"] == pytest.approx(50.0)
    assert stats["p05"] == pytest.approx(5.0) and stats["p95"] == pytest.approx(95.0)


@pytest.mark.parametrize("start,stop", [(120.0, 240.0), (100.0, 200.0), (300.0, 420.0)],
                         ids=["standard", "rotated", "wraps-zero"])
def test_rv_insertion_is_anterior_end(start, stop):
    labels = phantom_labels(rv_from_deg=start % 360, rv_to_deg=stop % 360) if stop < 360 else None
    if labels is None:  # arc across 0 degrees: union of two pieces
        labels = np.maximum(phantom_labels(rv_from_deg=start, rv_to_deg=360.0),
                            phantom_labels(rv_from_deg=0.0, rv_to_deg=stop - 360.0))
    anterior, inferior = rv_arc_deg(labels)
    assert seg_metrics.angle_error_deg(anterior, start) < 3.0
    assert seg_metrics.angle_error_deg(inferior, stop) < 3.0
    assert rv_insertion_deg(labels) == anterior


def test_rv_insertion_missing_rv_raises():
    labels = phantom_labels()
    labels[labels == 3] = 0
    with pytest.raises(InsertionNotFoundError, match="RV"):
        rv_insertion_deg(labels)


def probabilities_from(labels: np.ndarray, confidence: float = 0.9) -> np.ndarray:
    probabilities = np.full((4, *labels.shape), (1 - confidence) / 3, np.float32)
    for label in range(4):
        probabilities[label][labels == label] = confidence
    return probabilities


def test_postprocess_removes_spurious_component_and_keeps_ring():
    truth = phantom_labels()
    noisy = truth.copy()
    noisy[2:6, 2:6] = 2                                     # spurious myocardium blob
    result = postprocess(probabilities_from(noisy))
    assert np.array_equal(result.labels, truth)
    assert result.closed_ring and not result.missing and not result.empty


def test_threshold_rises_until_one_component_remains():
    probability = np.zeros((20, 20), np.float32)
    probability[5:15, 2:8] = 0.9
    probability[5:15, 12:18] = 0.7                          # weaker second component
    mask, threshold = single_component(probability)
    assert 0.7 <= threshold < 0.9 and mask[5:15, 2:8].all() and not mask[:, 12:].any()
    probability[5:15, 12:18] = 0.9                          # equal: no threshold separates
    probability[5:15, 2:4] = 0.0
    mask, threshold = single_component(probability)
    assert threshold == 0.5 and mask[5:15, 12:18].all() and not mask[:, :12].any()


def test_postprocess_flags_empty_and_open_ring():
    empty = postprocess(probabilities_from(np.zeros((32, 32), np.uint8)))
    assert empty.empty and len(empty.missing) == 3 and not empty.closed_ring
    opened = phantom_labels()
    opened[40:56, 56:70][opened[40:56, 56:70] == 2] = 0     # cut the lateral wall
    assert not is_closed_ring(opened)
    with pytest.raises(ValueError, match="NaN"):
        postprocess(np.full((4, 8, 8), np.nan, np.float32))
