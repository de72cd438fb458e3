"""Rician first-moment correction of the AIF pool curve (perfline.toolbox.aif_noise)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import integrate, special

from perfline.toolbox.aif import magnitude_floor_corrected_curve
from perfline.toolbox.aif_noise import (
    AifNoiseError, rician_amplitude, rician_corrected_pool_curve, rician_mean, rician_sigma_from_baseline,
)


def _magnitude(amplitude: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    noise = rng.standard_normal((2, *np.shape(amplitude))) * sigma
    return np.hypot(amplitude + noise[0], noise[1])


@pytest.mark.parametrize("snr", [0.0, 0.5, 1.0, 2.0, 5.0, 20.0], ids=lambda s: f"A/sigma={s}")
def test_rician_mean_matches_the_integral_of_the_rice_density(snr: float) -> None:
    sigma = 0.05
    amplitude = snr * sigma

    def density(m: float) -> float:  # Rice density, with the scaled Bessel function for large arguments
        return m / sigma**2 * np.exp(-((m - amplitude) ** 2) / (2 * sigma**2)) * special.i0e(m * amplitude / sigma**2)

    expected = integrate.quad(lambda m: m * density(m), 0.0, amplitude + 12 * sigma, limit=200)[0]
    assert float(rician_mean(amplitude, sigma)) == pytest.approx(expected, rel=1e-8)


def test_rician_mean_matches_monte_carlo() -> None:
    rng = np.random.default_rng(1)
    samples = _magnitude(np.full(200_000, 0.05), 0.05, rng)
    standard_error = samples.std() / np.sqrt(samples.size)
    assert abs(float(rician_mean(0.05, 0.05)) - samples.mean()) < 4 * standard_error


def test_rician_mean_limits() -> None:
    assert float(rician_mean(0.0, 2.0)) == pytest.approx(2.0 * np.sqrt(np.pi / 2), rel=1e-12)
    # high SNR: E[M]^2 -> A^2 + sigma^2
    assert float(rician_mean(100.0, 1.0)) ** 2 == pytest.approx(100.0**2 + 1.0, rel=1e-6)
    np.testing.assert_array_equal(rician_mean(np.array([0.0, 3.0]), 0.0), [0.0, 3.0])


def test_rician_amplitude_inverts_the_mean() -> None:
    sigma = 0.02
    amplitude = sigma * np.concatenate([np.linspace(0.05, 5.0, 60), np.array([12.0, 39.0, 41.0, 300.0])])
    recovered = rician_amplitude(rician_mean(amplitude, sigma), sigma)
    np.testing.assert_allclose(recovered, amplitude, rtol=2e-3, atol=2e-3 * sigma)


def test_rician_amplitude_below_the_rayleigh_mean_is_zero() -> None:
    assert float(rician_amplitude(np.array(0.9 * np.sqrt(np.pi / 2)), 1.0)) == 0.0


@pytest.mark.parametrize("zero_level", [0.0, 0.03], ids=["zero 0", "zero 0.03"])
def test_sigma_from_baseline_recovers_sigma(zero_level: float) -> None:
    sigma = 0.04
    assert rician_sigma_from_baseline(float(rician_mean(zero_level, sigma)), zero_level) == pytest.approx(sigma,
                                                                                                         rel=1e-6)
    assert rician_sigma_from_baseline(0.5 * zero_level, zero_level) == 0.0


def _pool_series(rng: np.random.Generator, spread: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """[time, rows, cols] Rician magnitudes of a 30-pixel pool whose true curve is a bolus on a 0.03
    baseline; each pixel's signal above the baseline carries a fixed factor 1 + spread * N(0, 1)."""
    frames = np.arange(60)
    x = np.clip(frames - 12.0, 0.0, None)
    truth = 0.03 + 0.6 * (x / 4.0) ** 2 * np.exp(2.0 - x / 2.0) / 4.0 + 0.12 * (1.0 - np.exp(-x / 8.0))
    mask = np.zeros((8, 8), dtype=bool)
    mask[1:7, 1:6] = True
    gains = 1.0 + spread * rng.standard_normal(int(mask.sum()))
    amplitude = np.zeros((frames.size, 8, 8))
    amplitude[:, mask] = 0.03 + (truth[:, None] - 0.03) * gains[None, :]
    return _magnitude(amplitude, 0.04, rng), mask, truth, 0.03


def test_pool_curve_removes_the_rician_floor() -> None:
    rng = np.random.default_rng(7)
    curves, plain = [], []
    for _ in range(40):
        series, mask, truth, zero = _pool_series(rng, 0.0)
        curves.append(rician_corrected_pool_curve(series, mask, slice(1, 12), zero))
        plain.append(series[:, mask].mean(axis=1))
    curve, plain_mean = np.mean(curves, axis=0), np.mean(plain, axis=0)
    tail = slice(40, 60)  # low SNR (A / sigma ~ 4): the plain mean reads high, the corrected one not
    assert plain_mean[tail].mean() / truth[tail].mean() > 1.02
    assert curve[tail].mean() / truth[tail].mean() == pytest.approx(1.0, abs=0.01)
    assert curve[1:12].mean() == pytest.approx(zero, abs=0.005)


def test_pool_curve_ignores_a_spread_that_grows_with_the_signal() -> None:
    """A zero-mean per-pixel gain spread adds variance at the peak only: the second-moment floor
    (toolbox.aif) reads it as signal, the first moment does not."""
    rng = np.random.default_rng(3)
    first, second = [], []
    for _ in range(40):
        series, mask, truth, zero = _pool_series(rng, 0.3)
        first.append(rician_corrected_pool_curve(series, mask, slice(1, 12), zero))
        second.append(magnitude_floor_corrected_curve(series, mask, slice(1, 12), zero))
    peak = int(np.argmax(truth))
    assert np.mean(second, axis=0)[peak] / truth[peak] > 1.03
    assert np.mean(first, axis=0)[peak] / truth[peak] == pytest.approx(1.0, abs=0.015)


def test_pool_curve_short_baseline_gives_the_plain_mean() -> None:
    series, mask, _, zero = _pool_series(np.random.default_rng(0), 0.0)
    np.testing.assert_allclose(rician_corrected_pool_curve(series, mask, slice(1, 2), zero),
                               series[:, mask].mean(axis=1))


def test_bad_inputs_raise() -> None:
    series = np.ones((10, 4, 4))
    with pytest.raises(AifNoiseError, match="mask is empty"):
        rician_corrected_pool_curve(series, np.zeros((4, 4), dtype=bool), slice(1, 5), 0.0)
    with pytest.raises(AifNoiseError, match="rows, cols of the mask"):
        rician_corrected_pool_curve(series, np.ones((3, 4), dtype=bool), slice(1, 5), 0.0)
    with pytest.raises(AifNoiseError, match="sigma must be finite"):
        rician_mean(1.0, -1.0)
    with pytest.raises(AifNoiseError, match="amplitudes must be >= 0"):
        rician_mean(np.array([-1.0]), 1.0)
    with pytest.raises(AifNoiseError, match="must be >= 0"):
        rician_sigma_from_baseline(-1.0, 0.0)
