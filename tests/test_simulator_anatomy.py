"""Variety of the phantom anatomy over 1,000 seeds: no degenerate slice, plausible ranges.

Labels are rendered on an 80 x 80 window around the heart (1.875 mm pixels, the myocardial
grid's spacing) so that 3,000 slices take a few seconds. Run with ``-s`` to see the summary.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
from scipy import ndimage

from perfline.simulator import study as st
from perfline.simulator.anatomy import render_slice
from perfline.toolbox.rv_insertion import rv_arc_deg

logger = logging.getLogger(__name__)
N_SEEDS = 1000
WINDOW = (80, 80)
FOUR = ndimage.generate_binary_structure(2, 1)


def _touches(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pixels of ``a`` 4-adjacent to a pixel of ``b``."""
    return a & ndimage.binary_dilation(b, FOUR)


def _problems(labels: np.ndarray, center_rc: tuple[float, float]) -> list[str]:
    problems = []
    lv, myo, rv = labels == 1, labels == 2, labels == 3
    for name, mask in (("LV blood", lv), ("myocardium", myo), ("RV blood", rv)):
        n = ndimage.label(mask, FOUR)[1]
        if n != 1:
            problems.append(f"{name}: {n} connected components")
    if _touches(lv, labels == 0).any() or _touches(lv, rv).any():
        problems.append("myocardial ring not closed (LV blood touches background or RV)")
    if labels[0].any() or labels[-1].any() or labels[:, 0].any() or labels[:, -1].any():
        problems.append("heart cut by the render window")
    contact = _touches(rv, myo)
    if not contact.any():
        problems.append("RV does not touch the LV")
    else:
        angles = np.sort(np.degrees(np.arctan2(-(np.nonzero(contact)[0] - center_rc[0]),
                                               np.nonzero(contact)[1] - center_rc[1])) % 360)
        gaps = np.diff(np.concatenate([angles, angles[:1] + 360]))
        if gaps.max() < 120:
            problems.append(f"RV contact is not one arc with two ends (largest gap {gaps.max():.0f} deg)")
    return problems


def _wall_thickness_mm(labels: np.ndarray, pixel_mm: float) -> float:
    """Mean wall thickness from the label areas: (r_epi - r_endo) of the equal-area circles."""
    r_endo = np.sqrt((labels == 1).sum() / np.pi)
    r_epi = np.sqrt(((labels == 1) | (labels == 2)).sum() / np.pi)
    return float((r_epi - r_endo) * pixel_mm)


def test_one_thousand_seeds_give_no_degenerate_slice():
    summary: dict[str, list[float]] = {"lv_diameter_mm": [], "wall_mm": [], "rv_insertion_deg": [],
                                       "rv_arc_deg": [], "snr": [], "mbf_stress": [], "mbf_rest": []}
    failures = []
    for seed in range(N_SEEDS):
        study = st.sample_study(seed)
        summary["snr"].append(study.snr_blood_peak)
        summary[f"mbf_{study.kind}"].append(study.perfusion.normal_mbf_ml_min_g * study.perfusion.diffuse_factor)
        for level in ("basal", "mid", "apical"):
            sl = render_slice(study.anatomy, level, WINDOW, st.MYO_PIXEL_MM, study.anatomy.heart.lv_center_xy_mm,
                              include_body=False)
            problems = _problems(sl.labels, sl.lv_center_rc)
            if problems:
                failures.append((seed, level, problems))
                continue
            # labels agree with the tissue fractions they are drawn from
            assert np.all(sl.fractions["myocardium"][sl.labels == 2] >= 0.45)
            assert np.all(sl.fractions["rv_blood"][sl.labels == 3] >= 0.45)
            anterior, inferior = rv_arc_deg(sl.labels, sl.lv_center_rc)
            summary["rv_insertion_deg"].append(anterior)
            summary["rv_arc_deg"].append((inferior - anterior) % 360)
            summary["wall_mm"].append(_wall_thickness_mm(sl.labels, st.MYO_PIXEL_MM))
            if level == "mid":
                summary["lv_diameter_mm"].append(2 * np.sqrt((sl.labels == 1).sum() / np.pi) * st.MYO_PIXEL_MM)
    lines = [f"{name}: n={len(v)} min={np.min(v):.2f} p5={np.percentile(v, 5):.2f} median={np.median(v):.2f} "
             f"p95={np.percentile(v, 95):.2f} max={np.max(v):.2f}" for name, v in summary.items()]
    print("\n" + "\n".join(lines))
    print(f"degenerate slices: {len(failures)} of {3 * N_SEEDS}: {failures[:5]}")
    assert not failures, f"{len(failures)} degenerate slices, e.g. {failures[:3]}"
    wall = np.array(summary["wall_mm"])
    assert 4.0 <= np.percentile(wall, 1) and np.percentile(wall, 99) <= 22.0
    assert np.percentile(wall, 95) - np.percentile(wall, 5) > 6.0, "too little variety in wall thickness"
    insertion = np.array(summary["rv_insertion_deg"])
    assert 80 <= np.median(insertion) <= 150, "RV insertion should centre near 120 deg (docs/conventions.md)"
    assert np.percentile(insertion, 95) - np.percentile(insertion, 5) > 40, "RV insertion must vary"
    diameter = np.array(summary["lv_diameter_mm"])
    assert 20 <= np.percentile(diameter, 5) and np.percentile(diameter, 95) <= 65
    stress, rest = np.array(summary["mbf_stress"]), np.array(summary["mbf_rest"])
    assert 2.5 <= np.median(stress) <= 3.5 and 0.6 <= np.median(rest) <= 1.2
    assert len(stress) > 400 and len(rest) > 400


@pytest.mark.parametrize("seed", [0, 1, 2], ids=["seed0", "seed1", "seed2"])
def test_full_grid_slices_match_the_window_render(seed):
    study = st.sample_study(seed)
    full = render_slice(study.anatomy, "mid", st.MYO_SHAPE, st.MYO_PIXEL_MM)
    assert not _problems(full.labels, full.lv_center_rc)
    # the same heart on the full grid and in the window: equal label counts
    window = render_slice(study.anatomy, "mid", WINDOW, st.MYO_PIXEL_MM, study.anatomy.heart.lv_center_xy_mm)
    full_counts = np.bincount(full.labels.ravel(), minlength=4)[1:]
    window_counts = np.bincount(window.labels.ravel(), minlength=4)[1:]
    assert np.allclose(full_counts, window_counts, rtol=0.05, atol=3)
