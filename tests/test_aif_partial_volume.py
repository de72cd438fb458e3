"""Partial-volume correction of small LV pools in the AIF image (toolbox.aif_partial_volume)."""

from __future__ import annotations

import numpy as np
import pytest

from perfline.toolbox.aif import AifError
from perfline.toolbox.aif_partial_volume import partial_volume_corrected_curve, partial_volume_weights

T = 60
TIME = np.arange(T) * 0.8
FOOT = 12


def _gamma(peak: float, t0: float, width: float) -> np.ndarray:
    x = np.clip(TIME - t0, 0, None) / width
    curve = x**2 * np.exp(-x)
    return peak * curve / curve.max()


BLOOD = 0.03 + _gamma(0.9, FOOT * 0.8, 1.6) + 0.12 * (TIME > 16)  # SR/PD-like ratio: bolus + recirculation level
TISSUE = 0.03 + _gamma(0.15, FOOT * 0.8 + 1.0, 4.0) + 0.10 * (TIME > 18)


def _pool(fractions: np.ndarray, noise: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Frames [T, rows, cols] of pixels mixing BLOOD and TISSUE by ``fractions`` plus white noise; the pool mask."""
    frames = (fractions[None] * BLOOD[:, None, None] + (1 - fractions[None]) * TISSUE[:, None, None])
    frames = frames + rng.normal(0.0, noise, frames.shape)
    return frames, fractions > 0.02


def _windows() -> dict:
    peak = int(np.argmax(BLOOD))
    return {"baseline": slice(1, FOOT), "first_pass": slice(FOOT, peak + (peak - FOOT) + 1)}


def test_small_mixed_pool_reads_the_pure_blood_first_pass() -> None:
    # a small LV in 5.6 mm pixels: two pure pixels, the rest blood mixed with myocardium / papillary muscle
    fractions = np.zeros((6, 6))
    fractions[2:4, 2:4] = [[1.0, 1.0], [0.85, 0.6]]
    fractions[1, 2:4] = [0.45, 0.3]
    fractions[2:4, 1] = [0.5, 0.2]
    fractions[4, 2] = 0.35
    errors_mean, errors_pv, applied = [], [], []
    for seed in range(20):
        frames, mask = _pool(fractions, 0.01, np.random.default_rng(seed))
        weights = partial_volume_weights(frames, mask, **_windows())
        applied.append(weights.applied)
        corrected = partial_volume_corrected_curve(frames, mask, weights, baseline=slice(1, FOOT), zero_level=None)
        plain = frames[:, mask].mean(axis=1)
        errors_mean.append((plain.max() - 0.03) / (BLOOD.max() - 0.03) - 1)
        errors_pv.append((corrected.max() - 0.03) / (BLOOD.max() - 0.03) - 1)
        assert np.isclose(weights.weights.sum(), 1.0)
        # late frames (blood ~ tissue): the correction leaves the pool mean nearly unchanged
        assert abs(np.mean(corrected[-10:] - plain[-10:])) < 0.02
    assert all(applied)
    assert np.mean(errors_mean) < -0.3          # the plain pool mean reads the first-pass peak far too low
    assert abs(np.mean(errors_pv)) < 0.04       # the corrected curve reads the pure blood


def test_large_pure_pool_is_left_as_the_plain_mean() -> None:
    fractions = np.ones((6, 6))
    frames, mask = _pool(fractions, 0.01, np.random.default_rng(3))
    weights = partial_volume_weights(frames, mask, **_windows())
    assert not weights.applied and "noise" in weights.reason
    corrected = partial_volume_corrected_curve(frames, mask, weights, baseline=slice(1, FOOT), zero_level=None)
    np.testing.assert_allclose(corrected, frames[:, mask].mean(axis=1))


def test_implausible_gain_is_refused() -> None:
    # a "pool" whose mean barely enhances next to two strong pixels: not blood with tissue at its rim
    fractions = np.full((5, 5), 0.03)
    fractions[2, 2:4] = 1.0
    frames, mask = _pool(fractions, 0.002, np.random.default_rng(0))
    weights = partial_volume_weights(frames, mask, **_windows())
    assert not weights.applied and "gain" in weights.reason


def test_bad_inputs_raise_clear_errors() -> None:
    frames = np.ones((T, 4, 4))
    with pytest.raises(AifError, match="at least 4 pool pixels"):
        partial_volume_weights(frames, np.eye(4, dtype=bool)[:, ::-1] & np.eye(4, dtype=bool), **_windows())
    with pytest.raises(AifError, match="rows, cols of the mask"):
        partial_volume_weights(frames, np.ones((3, 3), bool), **_windows())
    with pytest.raises(AifError, match="baseline"):
        partial_volume_weights(frames, np.ones((4, 4), bool), baseline=slice(1, 2), first_pass=slice(12, 20))


def _aif_series(lv_fractions: np.ndarray, seed: int):
    """A Gd AIF series (5.625 mm pixels) acquired once per heartbeat (0.62 s), an LV pool of the given blood
    fractions (the rest of each pool pixel myocardium) next to a pure RV pool, through temporal-resample as in
    the chain; and the true blood Gd on its grid."""
    from perfline.gadgets.perfusion_items import AifSeries, ImageGeometry
    from perfline.gadgets.perfusion_preprocessing import TemporalResample

    times = 0.1 + 0.62 * np.arange(56)
    x = np.clip(times - 9.0, 0.0, None)
    blood = 6.0 * (x / 2.0) ** 2 * np.exp(-x / 2.0) / (4 * np.exp(-2.0)) + 0.6 * (1.0 - np.exp(-x / 4.0))
    myocardium = 0.7 * (1.0 - np.exp(-np.clip(times - 10.5, 0.0, None) / 3.0))
    lv = np.zeros((32, 32))
    lv[13:13 + lv_fractions.shape[0], 15:15 + lv_fractions.shape[1]] = lv_fractions
    rows, cols = np.mgrid[:32, :32]
    rv = (rows - 16) ** 2 / 9 + (cols - 6) ** 2 / 4 <= 1
    gd = lv[None] * blood[:, None, None] + ((lv > 0) * (1.0 - lv))[None] * myocardium[:, None, None]
    gd[:, rv] = np.interp(times + 2.5, times, blood)[:, None]
    gd += np.random.default_rng(seed).normal(0.0, 0.15, gd.shape)
    series = AifSeries(data=gd[None].astype(np.float32), time_s=times, echo_times_ms=(1.0,), units="gd_mmol_l",
                       n_pd_frames=0, geometry=ImageGeometry(field_of_view_mm=(180.0, 180.0, 8.0),
                                                             pixel_spacing_mm=(5.625, 5.625)))
    (resampled,) = list(TemporalResample().process(iter([series])))
    return resampled, np.interp(resampled.time_s, times, blood)


def test_aif_extract_partial_volume_reads_a_small_lvs_peak_and_leaves_large_pools_alone() -> None:
    from perfline.gadgets.mapping import AifExtract, AifExtractSettings
    from perfline.gadgets.perfusion_items import AifCurve

    def extract(series, **settings) -> AifCurve:
        (curve,) = [item for item in AifExtract(AifExtractSettings(lv_hint=False, **settings)).process(iter([series]))
                    if isinstance(item, AifCurve)]
        return curve

    small = np.array([[0.3, 0.6, 0.4], [0.7, 1.0, 1.0], [0.2, 0.8, 0.5]])  # 9 pixels of 5.6 mm, two pure
    plain, corrected = [], []
    for seed in range(6):
        series, truth = _aif_series(small, seed)
        default = extract(series)
        aif = extract(series, lv_partial_volume=True)
        plain.append(default.blood_gd_mmol_l.max() / truth.max())
        corrected.append(aif.blood_gd_mmol_l.max() / truth.max())
        assert np.array_equal(aif.mask, default.mask) and not np.any(aif.mask[:, :10])  # same pool, never the RV
        np.testing.assert_allclose(np.interp(aif.time_s, aif.sample_time_s, aif.sample_blood_gd_mmol_l),
                                   aif.blood_gd_mmol_l, atol=1e-6)
    assert np.mean(plain) < 0.85
    assert abs(np.mean(corrected) - 1.0) < 0.06
    # a large pool (6 x 6 pixels, 1139 mm^2 > 300 mm^2): exactly the default curve
    series, _ = _aif_series(np.ones((6, 6)), 0)
    np.testing.assert_array_equal(extract(series, lv_partial_volume=True).blood_gd_mmol_l,
                                  extract(series).blood_gd_mmol_l)
