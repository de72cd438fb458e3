"""Pixel spacing unknown: the label-free spacing search of ``Segmenter.segment(...,
spacing_factors=...)`` (docs/segmentation.md, "Pixel spacing unknown") on synthetic
probabilities, on a QPerf-format phantom slice shown at a wrong spacing, and through
``perfline segment --spacing-search``."""

from __future__ import annotations

import numpy as np
import pytest

from perfline.models.inference import SPACING_FACTORS, Segmenter
from perfline.toolbox.seg_metrics import dice
from perfline.toolbox.segmentation_post import MYOCARDIUM, is_closed_ring


def ring(shape=(40, 37), center=(19.0, 18.0), blood_px=8.0, wall_px=6.0, gap=False):
    """Probabilities [4, rows, cols] of an LV disc and a myocardial annulus ``wall_px`` wide;
    ``gap``: no wall at all in a 60 deg sector (an open ring nothing can close)."""
    rows, cols = np.indices(shape, dtype=np.float64)
    radius = np.hypot(rows - center[0], cols - center[1])
    angle = np.degrees(np.arctan2(-(rows - center[0]), cols - center[1])) % 360
    probabilities = np.zeros((4, *shape), dtype=np.float32)
    probabilities[1][radius < blood_px] = 0.95
    wall = (radius >= blood_px) & (radius < blood_px + wall_px)
    if gap:
        wall &= ~((angle > 150) & (angle < 210))
    probabilities[2][wall] = 0.95
    probabilities[0] = 1.0 - probabilities[1:].sum(axis=0)
    return probabilities


def test_nominal_spacing_kept_when_its_ring_is_closed():
    candidates = [(1.52, ring(wall_px=6)), (1.9, ring(wall_px=3)), (2.28, ring(wall_px=4))]
    chosen, table = Segmenter.choose_spacing(candidates, nominal_mm=1.9)
    assert chosen == 1.9
    assert [row[0] for row in table] == [1.52, 1.9, 2.28] and all(row[1] for row in table)


def test_open_ring_takes_the_closing_spacing_with_a_physiological_wall():
    # a slice whose true spacing is 1.5 mm, told 1.9 mm: open at the nominal spacing; two
    # assumed spacings close it, the 6-px wall reads 9.1 mm at 1.52 mm and 13.7 mm at 2.28 mm
    candidates = [(1.52, ring(wall_px=6)), (1.9, ring(wall_px=6, gap=True)),
                  (2.28, ring(wall_px=6))]
    chosen, table = Segmenter.choose_spacing(candidates, nominal_mm=1.9)
    assert chosen == 1.52
    walls = {spacing: wall for spacing, _, wall in table}
    assert walls[1.52] == pytest.approx(9.1, abs=0.8)
    assert walls[2.28] == pytest.approx(13.7, abs=1.2)
    assert not dict((s, c) for s, c, _ in table)[1.9]


def test_no_closing_spacing_keeps_the_nominal_one():
    candidates = [(1.52, ring(gap=True)), (1.9, ring(gap=True))]
    assert Segmenter.choose_spacing(candidates, nominal_mm=1.9)[0] == 1.9
    with pytest.raises(ValueError, match="nominal"):
        Segmenter.choose_spacing(candidates, nominal_mm=2.0)


def qperf_phantom_slice(seed, number, kind, field, spacing_mm, matrix):
    from perfline.models.real_data import QPERF_FRAMES, qperf_format
    from perfline.simulator import simulate_image_study

    slice_ = simulate_image_study(seed, kind=kind, field_strength_t=field)[number]
    offset = np.random.default_rng([seed, number]).uniform(-3, 3, 2)
    return qperf_format(slice_.gd, slice_.time_s[slice_.n_pd_frames:], slice_.labels,
                        slice_.pixel_spacing_mm, slice_.lv_center_rc, matrix=matrix,
                        spacing_mm=spacing_mm, n_frames=QPERF_FRAMES[kind],
                        offset_rc=tuple(offset))


@pytest.fixture(scope="module")
def segmenter():
    from perfline.models.weights import default_model

    return Segmenter(default_model("gd"), runtime="onnxruntime")  # fp32 on every CPU


def test_search_closes_a_phantom_ring_shown_at_a_wrong_spacing(segmenter):
    from perfline.models.data import resample_frames_to_interval

    # development seed of docs/segmentation.md "Pixel spacing unknown": a 40 x 37 crop at a true
    # 1.5 mm, told 1.9 mm; the ring is open at 1.9 mm and closes at 1.52 mm
    formatted = qperf_phantom_slice(2 ** 30 + 4008, 1, "stress", 1.5, 1.5, (40, 37))
    series = resample_frames_to_interval(formatted.series, 0.5)
    plain = segmenter.segment(series, 1.9)
    searched = segmenter.segment(series, 1.9, spacing_factors=SPACING_FACTORS)
    assert not plain.closed_ring and np.isclose(plain.pixel_spacing_mm, 1.9)
    assert searched.closed_ring and is_closed_ring(searched.labels)
    assert len(searched.spacing_search) == len(SPACING_FACTORS)
    assert abs(searched.pixel_spacing_mm - 1.5) <= 0.1  # the true spacing, within one step
    truth = formatted.labels == MYOCARDIUM
    assert (dice(searched.labels == MYOCARDIUM, truth)
            >= dice(plain.labels == MYOCARDIUM, truth) - 0.01)


def test_search_leaves_a_closed_ring_unchanged(segmenter):
    from perfline.models.data import resample_frames_to_interval

    formatted = qperf_phantom_slice(2 ** 30 + 4001, 0, "rest", 1.5, 1.9, (51, 47))
    series = resample_frames_to_interval(formatted.series, 0.5)
    plain = segmenter.segment(series, 1.9)
    searched = segmenter.segment(series, 1.9, spacing_factors=SPACING_FACTORS)
    assert plain.closed_ring
    assert np.array_equal(plain.labels, searched.labels)
    assert searched.pixel_spacing_mm == 1.9 and len(searched.spacing_search) == 1


def test_segment_command_with_spacing_search(tmp_path, capsys):
    from perfline.cli import main

    formatted = qperf_phantom_slice(2 ** 30 + 4008, 1, "stress", 1.5, 1.5, (40, 37))
    np.save(tmp_path / "series.npy", np.moveaxis(formatted.series, 0, 2))  # [rows, cols, time]
    out = tmp_path / "labels.npy"
    assert main(["segment", str(tmp_path / "series.npy"), "--pixel-spacing", "1.9", "--dt",
                 "0.5", "--spacing-search", "--runtime", "onnxruntime", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "closed ring: True" in printed
    used = float(printed.split("pixel spacing used:")[1].split("mm")[0])
    assert abs(used - 1.5) <= 0.1
    assert np.load(out).shape == formatted.labels.shape


def test_evaluate_spacing_search_needs_the_qperf_format():
    from perfline.cli import main

    with pytest.raises(SystemExit, match="--format qperf"):
        main(["evaluate", "--studies", "1", "--spacing-search", "on"])
