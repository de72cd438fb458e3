"""AIF pool purity: the purest LV pixels cross-fitted on even / odd frames (perfline.toolbox.aif,
aif-extract ``lv_pool_selection``; docs/preprocessing.md, "AIF pool purity")."""

from __future__ import annotations

import numpy as np
import pytest

from perfline.gadgets.mapping import AifExtract, AifExtractSettings
from perfline.gadgets.perfusion_items import AifCurve, AifSeries, ImageGeometry
from perfline.toolbox.aif import AifError, cross_fitted_pool_curve, purest_pixels

N = 60
PEAK_FRAME = 24


def _blood(n: int = N) -> np.ndarray:
    """Pure LV blood Gd, mmol/L [time]: a first pass peaking at 6.0 on PEAK_FRAME, then recirculation."""
    x = np.clip(np.arange(n) - 18.0, 0.0, None)
    bolus = x**2 * np.exp(-x / 3.0)
    return 6.0 * bolus / bolus[PEAK_FRAME] + 0.6 * (1.0 - np.exp(-x / 6.0))


def _myocardium(n: int = N) -> np.ndarray:
    """Myocardium Gd [time]: enhances ~10x less and later than the blood."""
    x = np.clip(np.arange(n) - 21.0, 0.0, None)
    return 0.7 * (1.0 - np.exp(-x / 5.0))


def _pool(fractions: np.ndarray) -> np.ndarray:
    """Noise-free frames [time, rows, cols]: each pixel f x blood + (1 - f) x myocardium."""
    return (fractions[None] * _blood()[:, None, None] + (1.0 - fractions[None]) * _myocardium()[:, None, None])


def _small_mixed_pool() -> np.ndarray:
    """Blood fraction per pixel [8, 8]: 4 pure pixels and a rim of 10 mixed ones (f 0.35-0.7), as a
    small LV at the AIF image's resolution (the chain averaged 8-14 such pixels)."""
    f = np.zeros((8, 8))
    f[3:5, 3:5] = 1.0
    rim = [(2, 3), (2, 4), (5, 3), (5, 4), (3, 2), (4, 2), (3, 5), (4, 5), (2, 2), (5, 5)]
    for (row, col), value in zip(rim, np.linspace(0.35, 0.7, len(rim))):
        f[row, col] = value
    return f


def test_small_pool_of_mixed_pixels_reads_the_pure_blood_peak():
    fractions = _small_mixed_pool()
    mask = fractions > 0
    rng = np.random.default_rng(3)
    plain, crossed = [], []
    for _ in range(20):
        frames = _pool(fractions) + rng.normal(0.0, 0.3, (N,) + fractions.shape)
        plain.append(frames[PEAK_FRAME][mask].mean())
        pool = cross_fitted_pool_curve(frames, mask, baseline=slice(1, 17), zero_level=None)
        crossed.append(pool.curve[PEAK_FRAME])
        assert not np.any(pool.mask & (fractions < 0.6))  # the most mixed rim pixels never enter
    true_peak = _blood()[PEAK_FRAME]
    assert np.mean(plain) / true_peak < 0.8  # what the whole small pool reads (the current aif-extract path)
    assert abs(np.mean(crossed) / true_peak - 1.0) < 0.05


def test_large_pure_pool_is_not_read_high_by_the_choice_of_pixels():
    """40 pure blood pixels, noise 13 % of the peak: choosing the pixels on the frames averaged reads the
    peak high (winner's curse); choosing them on the other frames does not."""
    rows, cols = np.mgrid[:10, :10]
    mask = (rows - 4.5) ** 2 + (cols - 4.5) ** 2 <= 13
    assert 36 <= mask.sum() <= 48
    fractions = mask.astype(np.float64)
    rng = np.random.default_rng(7)
    same_frames, crossed = [], []
    for _ in range(60):
        frames = _pool(fractions) + rng.normal(0.0, 0.8, (N,) + mask.shape)
        chosen = purest_pixels(frames, mask)
        same_frames.append(frames[PEAK_FRAME][chosen].mean())
        crossed.append(cross_fitted_pool_curve(frames, mask, baseline=slice(1, 17), zero_level=None).curve[PEAK_FRAME])
    true_peak = _blood()[PEAK_FRAME]
    assert np.mean(same_frames) / true_peak > 1.015  # measured +2.8 %
    assert abs(np.mean(crossed) / true_peak - 1.0) < 0.012  # measured +0.1 % (standard error 0.4 %)


def test_magnitude_floor_is_removed_for_each_pixel_set():
    fractions = _small_mixed_pool()
    mask = fractions > 0
    rng = np.random.default_rng(5)
    zero = 0.05
    frames = np.abs(zero + _pool(fractions) + rng.normal(0.0, 0.3, (N,) + mask.shape))  # magnitude: Rician-like floor
    floor = cross_fitted_pool_curve(frames, mask, baseline=slice(1, 17), zero_level=zero)
    plain = cross_fitted_pool_curve(frames, mask, baseline=slice(1, 17), zero_level=None)
    assert abs(floor.curve[1:17].mean() - zero) < abs(plain.curve[1:17].mean() - zero)
    np.testing.assert_array_equal(floor.mask, plain.mask)


@pytest.mark.parametrize(("frames", "mask", "kwargs", "match"), [
    (np.ones((4, 3, 3)), np.ones((3, 3), bool), {}, "time >= 8"),
    (np.ones((10, 3, 3)), np.zeros((3, 3), bool), {}, "empty"),
    (np.ones((10, 3, 3)), np.ones((3, 4), bool), {}, "rows, cols of the mask"),
    (np.ones((10, 3, 3)), np.ones((3, 3), bool), {"fraction": 1.0}, "fraction"),
], ids=["too-few-frames", "empty-mask", "shape", "fraction"])
def test_bad_input_is_a_clear_error(frames, mask, kwargs, match):
    with pytest.raises(AifError, match=match):
        cross_fitted_pool_curve(frames, mask, baseline=slice(1, 4), zero_level=None, **kwargs)


def _aif_series_small_lv(seed: int) -> tuple[AifSeries, np.ndarray]:
    """A Gd AIF series acquired once per heartbeat (0.62 s) with a small LV pool of mixed pixels next to
    a pure RV pool, through temporal-resample as in the chain (acquired frames kept)."""
    from perfline.gadgets.perfusion_preprocessing import TemporalResample

    times = 0.1 + 0.62 * np.arange(56)
    fine = np.arange(0.0, 40.0, 0.05)
    blood = np.interp(fine, 0.5 * np.arange(N) + 1.0, _blood())
    myocardium = np.interp(fine, 0.5 * np.arange(N) + 1.0, _myocardium())
    lv = np.zeros((32, 32))
    lv[12:20, 14:22] = _small_mixed_pool()
    rows, cols = np.mgrid[:32, :32]
    rv = (rows - 16) ** 2 / 9 + (cols - 6) ** 2 / 4 <= 1
    gd = (lv[None] * np.interp(times, fine, blood)[:, None, None]
          + ((lv > 0) * (1.0 - lv))[None] * np.interp(times, fine, myocardium)[:, None, None])
    gd[:, rv] = np.interp(times + 2.5, fine, blood)[:, None]
    gd += np.random.default_rng(seed).normal(0.0, 0.3, gd.shape)
    series = AifSeries(data=gd[None].astype(np.float32), time_s=times, echo_times_ms=(1.0,), units="gd_mmol_l",
                       n_pd_frames=0, geometry=ImageGeometry(field_of_view_mm=(180.0, 180.0, 8.0)))
    (resampled,) = list(TemporalResample().process(iter([series])))
    assert resampled.acquired_data is not None
    true_on_grid = np.interp(resampled.time_s, times, np.interp(times, fine, blood))
    return resampled, true_on_grid


def test_aif_extract_cross_fitted_reads_the_small_pools_peak_and_keeps_samples_consistent():
    settings = AifExtractSettings(lv_hint=False, lv_pool_selection="cross-fitted")
    core, crossed = [], []
    for seed in range(6):
        series, true_on_grid = _aif_series_small_lv(seed)
        (default,) = [item for item in AifExtract(AifExtractSettings(lv_hint=False)).process(iter([series]))
                      if isinstance(item, AifCurve)]
        (aif,) = [item for item in AifExtract(settings).process(iter([series])) if isinstance(item, AifCurve)]
        core.append(default.blood_gd_mmol_l.max() / true_on_grid.max())
        crossed.append(aif.blood_gd_mmol_l.max() / true_on_grid.max())
        assert aif.mask.sum() < default.mask.sum() and not np.any(aif.mask[:, :10])  # purer, never the RV
        np.testing.assert_allclose(np.interp(aif.time_s, aif.sample_time_s, aif.sample_blood_gd_mmol_l),
                                   aif.blood_gd_mmol_l, atol=1e-9)
    assert np.mean(core) < 0.85
    assert abs(np.mean(crossed) - 1.0) < 0.05


def test_default_selection_is_the_core():
    assert AifExtractSettings().lv_pool_selection == "core"
