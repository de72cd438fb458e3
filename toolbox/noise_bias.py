"""Correction of the noise bias of a pixel-wise flow fit by simulation-extrapolation (SIMEX).

A nonlinear fit of noisy curves is biased: under the noise of a stress perfusion scan the BTEX
pixel fit reads myocardial flow low (docs/mapping.md, "Session 14: SIMEX"). SIMEX (Cook and
Stefanski, J Am Stat Assoc 1994;89:1314-1328) measures the bias on the data themselves: the
curves are fitted again with white noise of the measured noise SD added (twice the noise
variance), and the change of the statistic from noise variance sigma^2 to 2 sigma^2 is
extrapolated back to no noise. Here the statistic is the median flow over the pixels that the
report summarises, and the extrapolation is multiplicative: with ``r = median(noisier) /
median(measured)`` the corrected map is ``measured / r``.

The refits use antithetic pairs: each noise draw ``e`` is added and subtracted (``y + e`` and
``y - e``). Both have the doubled noise variance, but the first-order response of the fit to
``e``, which is what makes one draw's ratio noisy, cancels between them, while the second-order
response (the bias being measured) does not. The ratio is taken between the medians of all the
refits' values (the empirical distribution at the doubled noise) and of the measured values, on
the same pixels, each without the values at the top of the flow grid (the report leaves them out
of its sector medians too).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)


class NoiseBiasError(ValueError):
    """The inputs of the SIMEX ratio are inconsistent."""


@dataclass(frozen=True)
class SimexOptions:
    """How a flow mapper measures its noise bias (:func:`simex_ratio`).

    ``pairs``: antithetic noise pairs per pixel; ``max_pixels``: refit at most this many pixels
    (drawn at random; None: all); ``seed``: of the noise and the draw (the same data give the same
    maps); ``pixels``: bool mask on the map's spatial grid of the pixels the ratio is taken on (e.g.
    the myocardium without its border ring, as the report summarises it; None: every fitted pixel).
    """

    pairs: int = 1
    max_pixels: int | None = None
    seed: int = 0
    pixels: np.ndarray | None = None


@dataclass(frozen=True)
class NoiseBias:
    """The SIMEX ratio of one slice.

    ``ratio``: median flow at twice the noise variance / median measured flow (the corrected flow
    is the measured flow divided by ``applied``, which is ``ratio`` clipped to the allowed range,
    or 1 where too few pixels were usable); ``n_pixels``: pixels refitted; ``noise_sd_mmol_l``: SD
    of the added noise; ``pairs``: antithetic noise pairs per pixel.
    """

    ratio: float
    applied: float
    n_pixels: int
    noise_sd_mmol_l: float
    pairs: int


def simex_ratio(
    curves: np.ndarray,
    measured: np.ndarray,
    refit: Callable[[np.ndarray, np.ndarray], np.ndarray],
    noise_sd_mmol_l: float,
    rng: np.random.Generator,
    *,
    pairs: int = 1,
    max_pixels: int | None = None,
    upper_limit: float = np.inf,
    min_pixels: int = 20,
    ratio_range: tuple[float, float] = (0.8, 1.25),
) -> NoiseBias:
    """SIMEX ratio of a median flow under doubled noise variance.

    Args:
        curves: ``[P, T]`` tissue curves (mmol/L) of the candidate pixels (e.g. the myocardial core).
        measured: ``[P]`` their fitted flow (ml/min/g; NaN where not fitted).
        refit: ``refit(noisy_curves [n, T], pixels [n])`` returns the flow ``[n]`` of those curves
            fitted as the measured ones were (``pixels``: indices into ``curves``, for per-pixel
            fit inputs such as a delay prior).
        noise_sd_mmol_l: SD of the white noise added to every sample (the curves' own noise SD).
        rng: source of the noise (seed it for a reproducible report).
        pairs: antithetic pairs of noise draws per pixel (2 ``pairs`` refits of each pixel).
        max_pixels: refit at most this many pixels, drawn at random (None: all usable ones).
        upper_limit: flow values at or above this (the top of the fit grid) are left out of both
            medians. Pixels measured at or above it are not refitted, while refits that reach it are
            dropped: the noisier median can lose high values but not regain them (a small downward pull
            on the ratio; refitting every finite pixel would be the consistent form, docs/mapping.md).
        min_pixels: fewer usable pixels give no correction (``applied`` = 1).
        ratio_range: ``applied`` is ``ratio`` clipped to this range.

    Returns:
        The :class:`NoiseBias` of these pixels.
    """
    curves = np.asarray(curves, dtype=np.float64)
    measured = np.asarray(measured, dtype=np.float64)
    if curves.ndim != 2 or measured.shape != curves.shape[:1]:
        raise NoiseBiasError(f"curves must be [P, T] and measured [P], got {curves.shape} and {measured.shape}")
    if not (np.isfinite(noise_sd_mmol_l) and noise_sd_mmol_l >= 0):
        raise NoiseBiasError(f"noise_sd_mmol_l must be a finite SD >= 0, got {noise_sd_mmol_l}")
    if pairs < 1:
        raise NoiseBiasError(f"pairs must be >= 1, got {pairs}")
    low, high = ratio_range
    if not 0 < low <= 1 <= high:
        raise NoiseBiasError(f"ratio_range must contain 1 and be positive, got {ratio_range}")
    usable = np.flatnonzero(np.isfinite(measured) & (measured < upper_limit) & np.all(np.isfinite(curves), axis=1))
    if max_pixels is not None and usable.size > max_pixels:
        usable = np.sort(rng.choice(usable, size=max_pixels, replace=False))
    if usable.size < min_pixels or noise_sd_mmol_l == 0:
        return NoiseBias(float("nan"), 1.0, int(usable.size), float(noise_sd_mmol_l), pairs)
    values = []
    for _ in range(pairs):
        noise = rng.normal(0.0, noise_sd_mmol_l, size=(usable.size, curves.shape[1]))
        for sign in (1.0, -1.0):
            fitted = np.asarray(refit(curves[usable] + sign * noise, usable), dtype=np.float64)
            if fitted.shape != usable.shape:
                raise NoiseBiasError(f"refit returned {fitted.shape} values for {usable.size} curves")
            values.append(fitted)
    noisier = np.concatenate(values)
    noisier = noisier[np.isfinite(noisier) & (noisier < upper_limit)]
    base = measured[usable]
    if noisier.size < min_pixels or np.median(base) <= 0:
        return NoiseBias(float("nan"), 1.0, int(usable.size), float(noise_sd_mmol_l), pairs)
    ratio = float(np.median(noisier) / np.median(base))
    applied = float(np.clip(ratio, low, high))
    if applied != ratio:
        logger.warning("SIMEX ratio %.3f outside %s: clipped to %.3f", ratio, ratio_range, applied)
    return NoiseBias(ratio, applied, int(usable.size), float(noise_sd_mmol_l), pairs)
