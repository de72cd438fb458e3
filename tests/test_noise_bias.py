"""SIMEX correction of a fit's noise bias (perfline.toolbox.noise_bias) and its use by map_btex / flow-map."""

from __future__ import annotations

import numpy as np
import pytest

from perfline.toolbox import flow_models as fm
from perfline.toolbox.btex import map_btex
from perfline.toolbox.flow_fit import MappingInputError
from perfline.toolbox.noise_bias import NoiseBiasError, SimexOptions, simex_ratio

CENTRE = 2.0


def _quadratic_loss(curves: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """An estimator whose noise bias is known: CENTRE - |y - 1|^2 of 2-sample curves y = 1 + noise
    reads CENTRE - sigma^2 chi2_2, median CENTRE - 1.386 sigma^2: linear in the noise variance."""
    return CENTRE - np.sum((curves - 1.0) ** 2, axis=1)


def test_simex_removes_a_bias_linear_in_the_noise_variance():
    sd = 0.3
    rng = np.random.default_rng(0)
    curves = 1.0 + rng.normal(0.0, sd, (2000, 2))
    measured = _quadratic_loss(curves, np.arange(curves.shape[0]))
    bias = simex_ratio(curves, measured, _quadratic_loss, sd, np.random.default_rng(1))
    assert np.median(measured) / CENTRE - 1 < -0.05  # the bias: -1.386 sd^2 / 2 = -6 %
    assert abs(np.median(measured) / bias.applied / CENTRE - 1) < 0.01
    assert bias.applied == bias.ratio and bias.n_pixels == 2000 and bias.pairs == 1


def test_antithetic_pairs_cancel_a_linear_response():
    # a linear estimator has no noise bias; each pixel's pair of refits straddles its measured value
    rng = np.random.default_rng(2)
    curves = rng.uniform(0.5, 1.5, (300, 40))
    linear = lambda y, pixels: y.mean(axis=1) + 2.0  # noqa: E731
    bias = simex_ratio(curves, linear(curves, None), linear, 1.0, np.random.default_rng(3))
    assert abs(bias.ratio - 1.0) < 0.01


def test_refit_gets_at_most_max_pixels_valid_indices_and_a_seed_repeats_the_result():
    rng = np.random.default_rng(4)
    curves = 1.0 + rng.normal(0.0, 0.3, (500, 2))
    measured = _quadratic_loss(curves, None)
    measured[:10] = np.nan  # not fitted: never refitted
    seen = []

    def refit(noisy, pixels):
        seen.append(pixels.copy())
        assert noisy.shape == (pixels.size, 2)
        return _quadratic_loss(noisy, pixels)

    first = simex_ratio(curves, measured, refit, 0.3, np.random.default_rng(5), pairs=2, max_pixels=100)
    assert len(seen) == 4 and all(p.size == 100 and p.min() >= 10 for p in seen)
    assert all(np.array_equal(p, seen[0]) for p in seen)  # the same pixels in every refit
    again = simex_ratio(curves, measured, refit, 0.3, np.random.default_rng(5), pairs=2, max_pixels=100)
    assert again == first


def test_values_at_the_grid_top_are_left_out_and_extreme_ratios_are_clipped(caplog):
    curves = np.ones((100, 3))
    measured = np.full(100, 2.0)
    measured[:5] = 6.0  # at the top of the grid
    to_top = lambda y, pixels: np.where(pixels % 2 == 0, 6.0, 1.0)  # noqa: E731  half the refits at the top
    bias = simex_ratio(curves, measured, to_top, 0.1, np.random.default_rng(0), upper_limit=5.9)
    assert bias.n_pixels == 95
    assert bias.ratio == pytest.approx(0.5)  # only the refits below the top count: median 1 / median 2
    assert bias.applied == 0.8
    assert "clipped" in caplog.text


def test_too_few_pixels_or_no_noise_give_no_correction():
    curves = np.ones((10, 3))
    bias = simex_ratio(curves, np.ones(10), lambda y, p: y[:, 0], 0.1, np.random.default_rng(0))
    assert np.isnan(bias.ratio) and bias.applied == 1.0 and bias.n_pixels == 10
    bias = simex_ratio(np.ones((50, 3)), np.ones(50), lambda y, p: y[:, 0], 0.0, np.random.default_rng(0))
    assert bias.applied == 1.0


@pytest.mark.parametrize("kwargs, match", [
    ({"curves": np.ones((5, 3)), "measured": np.ones(4)}, r"curves must be \[P, T\] and measured \[P\]"),
    ({"noise_sd_mmol_l": -1.0}, "noise_sd_mmol_l must be a finite SD"),
    ({"pairs": 0}, "pairs must be >= 1"),
    ({"ratio_range": (1.1, 1.3)}, "ratio_range must contain 1"),
])
def test_bad_inputs_say_what_was_expected(kwargs, match):
    args = {"curves": np.ones((30, 3)), "measured": np.ones(30), "refit": lambda y, p: y[:, 0],
            "noise_sd_mmol_l": 0.1, "rng": np.random.default_rng(0)}
    args.update(kwargs)
    with pytest.raises(NoiseBiasError, match=match):
        simex_ratio(**args)


def test_a_refit_returning_the_wrong_number_of_values_is_an_error():
    with pytest.raises(NoiseBiasError, match="refit returned"):
        simex_ratio(np.ones((30, 3)), np.ones(30), lambda y, p: y[:5, 0], 0.1, np.random.default_rng(0))



def _stress_slice(seed: int, noise_sd: float = 0.02, size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """A uniform stress slice (Fp 3.5 ml/min/g) with white noise of ``noise_sd`` mmol/L (2 % of its peak)."""
    time_s = np.arange(60) * 0.5
    x = np.clip(time_s - 8.0, 0.0, None)
    bolus = x**3 * np.exp(-x / 1.5)
    plasma = (5.0 * bolus / bolus.max() + 0.4 * (1.0 - np.exp(-x / 8.0))) / (1.0 - 0.42)
    curve = fm.btex_tissue_curves(plasma, 0.5, [3.5], [1.3], [0.06], [0.25], [1.0])[0]
    series = curve[:, None, None] + np.random.default_rng(seed).normal(0.0, noise_sd, (60, size, size))
    return plasma, series


@pytest.mark.parametrize("seed", [0, 1])
def test_simex_lifts_the_noisy_stress_under_read_of_the_btex_fit(seed):
    # noise-free this slice reads 3.5 (tests/test_mapping.py); with 2 % noise about -9 %; SIMEX takes
    # about 3.5 points of it off (the bias grows less than linearly in the noise variance here, so the
    # linear extrapolation under-corrects)
    plasma, series = _stress_slice(seed)
    plain = map_btex(series, plasma, 0.5, delay_prior_sd_s=0.5)
    corrected = map_btex(series, plasma, 0.5, delay_prior_sd_s=0.5, simex=SimexOptions(pairs=1, seed=seed))
    before = float(np.median(plain.mbf_ml_min_g)) / 3.5 - 1
    after = float(np.median(corrected.mbf_ml_min_g)) / 3.5 - 1
    assert before < -0.05
    assert before + 0.02 < after < 0.0
    bias = corrected.noise_bias
    assert plain.noise_bias is None and bias.n_pixels == 256 and bias.noise_sd_mmol_l == pytest.approx(0.02, rel=0.15)
    np.testing.assert_allclose(corrected.mbf_ml_min_g, plain.mbf_ml_min_g / bias.applied, rtol=1e-6)
    np.testing.assert_array_equal(corrected.ps_ml_min_g, plain.ps_ml_min_g)  # only MBF is corrected


def test_simex_pixels_of_another_shape_are_an_error():
    plasma, series = _stress_slice(0, size=8)
    with pytest.raises(MappingInputError, match=r"simex.pixels must have the spatial shape \(8, 8\)"):
        map_btex(series, plasma, 0.5, simex=SimexOptions(pixels=np.ones((6, 6), dtype=bool)))
