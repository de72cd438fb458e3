"""Ring completion from the image (``complete_ring_from_image``): an open ring whose gap the
network does not see is completed where the series shows a wall, and left open where it
shows none; closed rings are never changed; the slice is flagged."""

from __future__ import annotations

import numpy as np
import pytest

from perfline.models.inference import Segmenter
from perfline.toolbox.seg_metrics import dice
from perfline.toolbox.segmentation_post import (LV_BLOOD, MYOCARDIUM, complete_ring_from_image,
                                                is_closed_ring, postprocess,
                                                unmix_blood_and_tissue)

SHAPE, CENTER = (40, 37), (19.0, 18.0)
TIME_S = np.arange(48, dtype=np.float64)


def _gamma_variate(peak_s: float, width_s: float, height: float) -> np.ndarray:
    shifted = np.clip(TIME_S - 4.0, 0.0, None)  # bolus arrives after 4 s: a clean baseline
    curve = (shifted / peak_s) ** (peak_s / width_s) * np.exp((1.0 - shifted / peak_s)
                                                               * peak_s / width_s)
    return height * curve


# first pass in mmol/L: blood high and early, myocardium low, later and with a tail
BLOOD_CURVE = _gamma_variate(6.0, 2.0, 6.0)
TISSUE_CURVE = _gamma_variate(11.0, 6.0, 0.9) + 0.15 * (TIME_S > 12)


def _phantom(wall_on_left: bool, seed: int = 0):
    """Gd series float32 [time, 40, 37] of an LV disc (radius 9 px) in a myocardial annulus
    (9-14 px) in non-enhancing lung; ``wall_on_left=False`` removes the annulus' left half
    from the image (lung there). Also the network's probabilities [4, rows, cols], which see
    the wall only on the right half (none at all on the left), and the true annulus."""
    rows, cols = np.indices(SHAPE, dtype=np.float64)
    radius = np.hypot(rows - CENTER[0], cols - CENTER[1])
    blood = radius < 9
    annulus = (radius >= 9) & (radius < 14)
    left = cols < CENTER[1] - 3
    tissue = annulus & (~left | wall_on_left)
    noise = np.random.default_rng(seed).normal(0.0, 0.03, (TIME_S.size, *SHAPE))
    series = (blood[None] * BLOOD_CURVE[:, None, None]
              + tissue[None] * TISSUE_CURVE[:, None, None] + noise).astype(np.float32)
    probabilities = np.zeros((4, *SHAPE), dtype=np.float32)
    probabilities[1][blood] = 0.9
    probabilities[2][annulus & ~left] = 0.9
    probabilities[0] = 1.0 - probabilities[1:].sum(axis=0)
    return series, probabilities, annulus


def test_unmixing_recovers_the_amounts_of_blood_and_tissue():
    series, _, annulus = _phantom(wall_on_left=True)
    rows, cols = np.indices(SHAPE)
    blood = np.hypot(rows - CENTER[0], cols - CENTER[1]) < 8
    mixed = series.copy()
    mixed[:, 2, 2] = 0.3 * BLOOD_CURVE + 0.7 * TISSUE_CURVE  # a partial-volume pixel
    alpha, beta = unmix_blood_and_tissue(mixed, blood, annulus)
    assert alpha[2, 2] == pytest.approx(0.3, abs=0.02) and beta[2, 2] == pytest.approx(0.7, abs=0.03)
    assert np.median(alpha[blood]) == pytest.approx(1.0, abs=0.02)
    assert np.median(beta[annulus]) == pytest.approx(1.0, abs=0.05)
    assert np.median(alpha[annulus]) < 0.05
    lung = ~(blood | annulus) & (np.hypot(rows - CENTER[0], cols - CENTER[1]) > 15)
    assert np.percentile(beta[lung], 95) < 0.2 and (alpha >= 0).all() and (beta >= 0).all()
    # a "myocardium" that enhances exactly like blood cannot be told apart: no amounts
    assert unmix_blood_and_tissue(np.stack([blood * c for c in BLOOD_CURVE]), blood,
                                  annulus | blood) is None


def test_gap_where_the_image_has_a_wall_is_completed_and_flagged():
    series, probabilities, annulus = _phantom(wall_on_left=True)
    plain = postprocess(probabilities, close_ring=True)
    assert not plain.closed_ring  # ray closing finds no wall on the left: none is there
    completed = postprocess(probabilities, close_ring=True, complete_ring=True, series=series)
    assert completed.closed_ring and is_closed_ring(completed.labels)
    assert 100 <= completed.completed_rays <= 200  # the left half, not the seen right half
    assert dice(completed.labels == MYOCARDIUM, annulus) > 0.85
    assert dice(plain.labels == MYOCARDIUM, annulus) < 0.75
    # only unclaimed pixels are changed: the blood pool is kept
    assert (completed.labels[plain.labels == LV_BLOOD] == LV_BLOOD).all()
    result = Segmenter._finish(probabilities, CENTER, close_ring=True, series=series)
    assert result.closed_ring
    assert (f"myocardial ring completed from the image on {completed.completed_rays} of 360 "
            "rays") in result.flags
    assert "myocardial ring not closed" not in result.flags


def test_gap_where_the_image_has_no_wall_stays_open():
    series, probabilities, _ = _phantom(wall_on_left=False)
    labels = postprocess(probabilities, close_ring=True).labels
    assert complete_ring_from_image(labels, probabilities[MYOCARDIUM], series) is None
    result = postprocess(probabilities, close_ring=True, complete_ring=True, series=series)
    assert not result.closed_ring and result.completed_rays == 0
    assert result.labels[19, 2] != MYOCARDIUM
    flags = Segmenter._finish(probabilities, CENTER, close_ring=True, series=series).flags
    assert "myocardial ring not closed" in flags
    assert not any("completed from the image" in flag for flag in flags)


def test_closed_rings_are_never_changed():
    series, probabilities, _ = _phantom(wall_on_left=True)
    probabilities[2][(probabilities[1] < 0.5) & (probabilities[0] > 0.99)] = 0.0
    rows, cols = np.indices(SHAPE)
    radius = np.hypot(rows - CENTER[0], cols - CENTER[1])
    probabilities[2][(radius >= 9) & (radius < 14)] = 0.9  # the network sees the whole ring
    probabilities[0] = 1.0 - probabilities[1:].sum(axis=0)
    plain = postprocess(probabilities)
    assert plain.closed_ring
    with_completion = postprocess(probabilities, close_ring=True, complete_ring=True,
                                  series=np.zeros_like(series))
    assert np.array_equal(with_completion.labels, plain.labels)
    assert with_completion.completed_rays == 0


def test_series_on_another_grid_is_rejected():
    series, probabilities, _ = _phantom(wall_on_left=True)
    labels = postprocess(probabilities).labels
    with pytest.raises(ValueError, match=r"expected series \[time, 40, 37\]"):
        complete_ring_from_image(labels, probabilities[MYOCARDIUM], series[:, :-1])
