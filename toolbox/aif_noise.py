"""The LV blood pool's mean signal at low SNR: Rician first-moment correction of magnitude images.

A magnitude pixel M = |A + n| with complex Gaussian noise n (SD ``sigma`` per real / imaginary part)
is Rician: E[M] = sigma sqrt(pi/2) L_1/2(-A^2 / (2 sigma^2)) (Rice 1944; Gudbjartsson & Patz, MRM 34:910,
1995, eq. 6), with L_1/2 the Laguerre polynomial of order 1/2, and E[M^2] = A^2 + 2 sigma^2.

``toolbox.aif.magnitude_floor_corrected_curve`` (the chain's) uses the second moment: it takes
2 sigma^2 from the pre-bolus frames and returns sqrt(mean(M^2) - 2 sigma^2), exact when the pool's
extra variance is the same in every frame; a pool spread that grows with the signal (per-pixel gains)
reads as signal there. :func:`rician_corrected_pool_curve` is the first-moment alternative: it averages
M over the pool and inverts E[M](A; sigma), with sigma from the pre-bolus frames whose true level is
known (the table's ratio at Gd = 0), so a zero-mean spread does not bias it.

Measured on the chain's AIF (docs/preprocessing.md, "AIF noise floor, session 8"): NOT adopted. Over 10
noise realizations of 8 large-pool dev scans the chain's second-moment floor is unbiased against the
noise-free recon (+0.3 points of area / truth), this first-moment curve reads the area 1.2 points
higher, and on the 52 dev scans it moves the area / truth from 0.998 to 1.009 (mean |x - 1| 0.069 ->
0.072). The large pools' excess comes from the TSENSE coil maps, the per-frame T2* factor and the dev
set's noise realization, not from the floor.

Mean over pixels of different sigma: E[M] is close to linear in sigma at low SNR and to
A + sigma^2 / (2 A) at high SNR, so one pool sigma fitted to the baseline mean is right where the
correction is large (baseline, foot) and a spread of sigma matters little where it is small.
"""

from __future__ import annotations

import logging
import math

import numpy as np
from scipy import optimize, special

logger = logging.getLogger(__name__)

# E[M] / sigma on a grid of A / sigma: dense near 0, where the inverse is steepest
_SNR_GRID = np.concatenate([np.linspace(0.0, 4.0, 801), np.linspace(4.0, 40.0, 721)[1:]])
_RICIAN_MEAN_MIN = math.sqrt(math.pi / 2.0)  # E[M] / sigma at A = 0 (Rayleigh)


class AifNoiseError(ValueError):
    """Inputs of the Rician correction with the wrong shape, sign or an empty pool."""


def rician_mean(amplitude: np.ndarray | float, sigma: float) -> np.ndarray:
    """Expected magnitude E[|A + n|] of a true amplitude A >= 0 under complex Gaussian noise.

    Args:
        amplitude: true amplitudes A (any shape, any unit; the unit of ``sigma``), >= 0.
        sigma: noise SD of each of the real and imaginary parts, same unit, >= 0.

    Returns:
        float64 array of ``amplitude``'s shape: sigma sqrt(pi/2) [(1 + 2y) I0e(y) + 2y I1e(y)] with
        y = A^2 / (4 sigma^2) (the Laguerre form with exponentially scaled Bessel functions, stable
        for large y); A itself where sigma = 0.
    """
    values = np.asarray(amplitude, dtype=np.float64)
    if sigma < 0 or not math.isfinite(sigma):
        raise AifNoiseError(f"sigma must be finite and >= 0, got {sigma}")
    if np.any(values < 0):
        raise AifNoiseError("amplitudes must be >= 0")
    if sigma == 0:
        return values.copy()
    y = values**2 / (4.0 * sigma**2)
    return sigma * _RICIAN_MEAN_MIN * ((1.0 + 2.0 * y) * special.i0e(y) + 2.0 * y * special.i1e(y))


def rician_amplitude(mean_magnitude: np.ndarray, sigma: float) -> np.ndarray:
    """The amplitude A whose expected magnitude is ``mean_magnitude`` (inverse of :func:`rician_mean`).

    Means below the Rayleigh mean sigma sqrt(pi/2) (possible for an average of noisy pixels) give 0, as
    the second-moment floor clips at 0; above 40 sigma the high-SNR form E[M]^2 = A^2 + sigma^2 is used
    (its error there is < 1e-5 sigma).

    Args:
        mean_magnitude: averages of magnitude pixels (any shape), same unit as ``sigma``.
        sigma: noise SD of each of the real and imaginary parts, >= 0 (0: returned unchanged).

    Returns:
        float64 array of ``mean_magnitude``'s shape, >= 0 where sigma > 0.
    """
    values = np.asarray(mean_magnitude, dtype=np.float64)
    if sigma < 0 or not math.isfinite(sigma):
        raise AifNoiseError(f"sigma must be finite and >= 0, got {sigma}")
    if sigma == 0:
        return values.copy()
    ratio = values / sigma
    table = rician_mean(_SNR_GRID, 1.0)
    inside = np.interp(ratio, table, _SNR_GRID)
    high = np.sqrt(np.maximum(ratio**2 - 1.0, 0.0))
    return sigma * np.where(ratio > table[-1], high, inside)


def rician_sigma_from_baseline(baseline_mean: float, zero_level: float) -> float:
    """The noise SD that lifts a true level ``zero_level`` to the observed mean magnitude ``baseline_mean``.

    Solves rician_mean(zero_level, sigma) = baseline_mean (increasing in sigma). A mean at or below the
    true level shows no floor: 0.

    Args:
        baseline_mean: mean magnitude of pre-bolus frames (unit of the images), >= 0.
        zero_level: their true amplitude (e.g. the blood table's SR/PD ratio at Gd = 0), >= 0.

    Returns:
        sigma >= 0, unit of the images.
    """
    if zero_level < 0 or baseline_mean < 0:
        raise AifNoiseError(f"baseline mean and zero level must be >= 0, got {baseline_mean}, {zero_level}")
    if baseline_mean <= zero_level:
        return 0.0
    upper = baseline_mean / _RICIAN_MEAN_MIN  # rician_mean(A, s) >= s sqrt(pi/2): the root lies below
    return float(optimize.brentq(lambda s: float(rician_mean(zero_level, s)) - baseline_mean, 0.0, upper,
                                 xtol=1e-12 * max(upper, 1e-30)))


def rician_corrected_pool_curve(series: np.ndarray, mask: np.ndarray, baseline: slice,
                                zero_level: float) -> np.ndarray:
    """Mean curve of magnitude-derived images over ``mask`` with the Rician bias of the mean removed.

    Drop-in alternative to ``toolbox.aif.magnitude_floor_corrected_curve`` (same arguments, same
    units): per frame the pool's mean magnitude m(t); sigma from the baseline frames
    (:func:`rician_sigma_from_baseline` of their mean of m and ``zero_level``); the curve is
    :func:`rician_amplitude` (m(t), sigma). Uses only the first moment, so a pool spread that grows with
    the signal does not read as signal (module docstring).

    Args:
        series: [time, rows, cols] magnitude or SR/PD ratio images (non-negative).
        mask: bool [rows, cols] pixels averaged.
        baseline: frames before the bolus arrival (at least 2).
        zero_level: true pre-contrast value of the images in the mask, >= 0.

    Returns:
        float64 [time] curve (the plain mean where the baseline is shorter than 2 frames).
    """
    values = np.asarray(series, dtype=np.float64)
    pool = np.asarray(mask, dtype=bool)
    if values.ndim != 3 or values.shape[1:] != pool.shape:
        raise AifNoiseError(f"series must be [time, rows, cols] with rows, cols of the mask {pool.shape}, "
                            f"got {values.shape}")
    if not pool.any():
        raise AifNoiseError("the AIF mask is empty")
    mean = values[:, pool].mean(axis=1)
    frames = mean[baseline]
    if frames.size < 2:
        return mean
    sigma = rician_sigma_from_baseline(max(float(frames.mean()), 0.0), max(float(zero_level), 0.0))
    logger.debug("AIF pool: Rician sigma %.4g from %d baseline frames (zero level %.4g)", sigma, frames.size,
                 zero_level)
    return rician_amplitude(np.maximum(mean, 0.0), sigma)
