"""Partial-volume correction of a small LV blood pool in the low-resolution AIF image.

The AIF image has pixels of about 5-6 mm. In a small LV (blood-pool radius 12-15 mm at the base,
papillary muscles inside it) only one to five pixels hold blood alone; the others mix blood with
myocardium or papillary muscle, and the pool mean reads the first-pass peak 20-40 % low (MBF
then reads 20-55 % high; docs/integration.md, session 8). Choosing fewer, purer pixels
(``toolbox.aif.purest_pixels``) stops at the handful of pixels needed against noise and still mixes.

Here every pool pixel i is a two-compartment mixture of the same two curves,

    c_i(t) = m(t) + a_i (b(t) - m(t)),      0 <= a_i <= 1,

with b the blood curve wanted, m the tissue around it (myocardium and papillary muscle enhance
alike) and a_i the pixel's blood fraction. A pixel's first-pass enhancement e_i (mean over the
first pass minus its baseline) is then affine in a_i, so the per-frame regression of c_i(t) on
e_i is a straight line whose value at the enhancement of a pure pixel is b(t). The pure-pixel
enhancement is taken as the mean enhancement of the ``top_pixels`` most enhancing pixels (the
pool's purest, assumed pure; where none is pure the correction stops short; gain differences
between pixels, e.g. coil-shading residuals, read as partial volume and make it overshoot: 5-8 %
on two of ten small dev pools, +5 to +20 % on large pools, hence the pool-size limit of the
gadget). The line's value there is a fixed linear combination of the pixel curves,
``b(t) = sum_i w_i c_i(t)`` with ``sum_i w_i = 1``: no extra nonlinearity, so the magnitude-floor
handling of the pool mean (``toolbox.aif.magnitude_floor_corrected_curve``) carries over by
adding the zero-sum part ``sum_i (w_i - 1/N) c_i(t)`` to the floor-corrected pool mean. In the
late frames blood and tissue enhance alike (b ~ m) and that part is ~0: the correction acts on
the first pass, where the partial volume error is.

Not applied (uniform weights) where the pool's enhancement spread is within noise (a large pure
pool: the correction would only fit noise) or the implied first-pass gain is implausibly large.
The linear-mixing model of signals (SR/PD ratios) is the partial-volume model of the AIF
literature (e.g. Hansen et al., MRM 2009, for the partial volume of AIFs; Kellman et al.,
JCMR 2017, dual-sequence AIF); the regression form and its use here are this project's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from perfline.toolbox.aif import AifError, magnitude_floor_corrected_curve

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PartialVolumeWeights:
    """Per-pixel weights of the partial-volume-corrected blood curve of one pool.

    Attributes:
        weights: float64 [N] for the pool's pixels in ``np.flatnonzero(mask)`` order; they sum to 1
            (uniform ``1/N`` when not applied).
        enhancement: float64 [N] each pixel's first-pass enhancement (frames' units).
        gain: the pure-pixel enhancement over the pool's mean enhancement (1 when not applied): how
            much the pool mean under-reads the first pass.
        spread_snr: (pure-pixel enhancement - mean enhancement) over its noise SE.
        applied: whether the weights differ from the plain mean.
        reason: why not applied ("" when applied).
    """

    weights: np.ndarray
    enhancement: np.ndarray
    gain: float
    spread_snr: float
    applied: bool
    reason: str = ""


def partial_volume_weights(frames: np.ndarray, mask: np.ndarray, *, baseline: slice, first_pass: slice,
                           top_pixels: int = 2, min_spread_snr: float = 4.0,
                           max_gain: float = 2.0) -> PartialVolumeWeights:
    """Weights ``w`` [N] so that ``sum_i w_i c_i(t)`` is the blood curve of a pure pixel.

    Args:
        frames: [time, rows, cols] SR/PD ratio (signal-linear) images of the AIF series.
        mask: bool [rows, cols] the LV pool (N >= 4 pixels), blood mixed with tissue at the rim.
        baseline: pre-bolus frames (at least 2).
        first_pass: frames of the first pass (e.g. foot .. twice the rise time after the peak).
        top_pixels: the pure-pixel enhancement is the mean of this many most enhancing pixels.
        min_spread_snr: apply only when that enhancement exceeds the pool's mean enhancement by at
            least this many standard errors (per-pixel baseline noise, frames of both windows).
        max_gain: apply only when the pure-pixel over mean enhancement is at most this.

    Returns:
        :class:`PartialVolumeWeights`.

    Raises:
        AifError: frames / mask of other shapes, fewer than 4 pool pixels, empty windows.
    """
    values = np.asarray(frames, dtype=np.float64)
    pool = np.asarray(mask, dtype=bool)
    if values.ndim != 3 or values.shape[1:] != pool.shape:
        raise AifError(f"frames must be [time, rows, cols] with rows, cols of the mask {pool.shape}, "
                       f"got {values.shape}")
    n = int(pool.sum())
    if n < 4:
        raise AifError(f"a partial-volume fit needs at least 4 pool pixels, found {n}")
    curves = values[:, pool]
    base, passing = curves[baseline], curves[first_pass]
    if base.shape[0] < 2 or passing.shape[0] < 1:
        raise AifError(f"need >= 2 baseline and >= 1 first-pass frames, got {base.shape[0]} and {passing.shape[0]}")
    if not 1 <= top_pixels < n:
        raise AifError(f"top_pixels must lie in 1 .. {n - 1}, got {top_pixels}")
    enhancement = passing.mean(axis=0) - base.mean(axis=0)
    uniform = np.full(n, 1.0 / n)
    noise = float(np.median(base.std(axis=0, ddof=1)))
    se = noise * np.sqrt(1.0 / passing.shape[0] + 1.0 / base.shape[0]) * np.sqrt(1.0 / top_pixels + 1.0 / n)
    mean = float(enhancement.mean())
    top = float(np.sort(enhancement)[::-1][:top_pixels].mean())
    spread_snr = (top - mean) / se if se > 0 else np.inf
    if mean <= 0:
        return PartialVolumeWeights(uniform, enhancement, 1.0, spread_snr, False, "the pool does not enhance")
    gain = top / mean
    if spread_snr < min_spread_snr:
        return PartialVolumeWeights(uniform, enhancement, 1.0, spread_snr, False,
                                    f"enhancement spread within noise ({spread_snr:.1f} SE < {min_spread_snr})")
    if gain > max_gain:
        return PartialVolumeWeights(uniform, enhancement, 1.0, spread_snr, False,
                                    f"first-pass gain {gain:.2f} > {max_gain}: not a blood pool with tissue at its rim")
    centred = enhancement - mean
    weights = uniform + (top - mean) * centred / float(centred @ centred)
    return PartialVolumeWeights(weights, enhancement, gain, spread_snr, True)


def partial_volume_corrected_curve(frames: np.ndarray, mask: np.ndarray, weights: PartialVolumeWeights, *,
                                   baseline: slice, zero_level: float | None) -> np.ndarray:
    """The pool's blood curve float64 [time] with the partial-volume weights applied.

    The magnitude-floor-corrected pool mean (:func:`toolbox.aif.magnitude_floor_corrected_curve`,
    or the plain mean when ``zero_level`` is None) plus the zero-sum part of the weights,
    ``sum_i (w_i - 1/N) c_i(t)``. ``frames`` may be other frames of the same pixels than those the
    weights came from (e.g. the acquired frames before resampling).
    """
    values = np.asarray(frames, dtype=np.float64)
    pool = np.asarray(mask, dtype=bool)
    curves = values[:, pool]
    if curves.shape[1] != weights.weights.size:
        raise AifError(f"weights for {weights.weights.size} pixels, the mask holds {curves.shape[1]}")
    mean = curves.mean(axis=1) if zero_level is None else magnitude_floor_corrected_curve(values, pool, baseline,
                                                                                           zero_level)
    return mean + curves @ (weights.weights - 1.0 / curves.shape[1])
