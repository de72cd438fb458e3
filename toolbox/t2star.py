"""T2* correction of the dual-echo AIF series.

At the peak of the first pass the LV blood holds several mmol/L of gadolinium, and T2* decay
during the echo time lowers the signal of the AIF image: left uncorrected it underestimates the
AIF peak and overestimates MBF by about 10 % (Kellman et al., JCMR 2017; REFERENCES.md
section 2). With two echoes TE1 < TE2 the decay rate is

    R2*(t) = ln(S1(t) / S2(t)) / (TE2 - TE1)      where S1 > S2 > 0, else 0,

and the echo-1 signal extrapolated to TE = 0 is S1 * exp(TE1 * R2*). Per frame that rate is noisy
where the signal is low; :func:`t2star_correct_gd_model` instead fits R2*(t) = R2*_0 + k Gd(t) per
pixel over all frames (docs/preprocessing.md, "AIF T2* correction by a pool model"), and
:func:`t2star_correct_blood_line` fits one such line for all the blood of the image (docs/preprocessing.md,
"One R2* line for the image's blood").
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import ndimage

logger = logging.getLogger(__name__)


class EchoError(ValueError):
    """Echo images or echo times that cannot be used for a T2* estimate."""


def r2star_per_s(echo1: np.ndarray, echo2: np.ndarray, te1_ms: float, te2_ms: float, *,
                 smoothing_px: int = 0, max_r2star_per_s: float = 2000.0) -> np.ndarray:
    """Pixel-wise R2* in 1/s from two magnitude echoes.

    Args:
        echo1, echo2: float magnitude images of identical shape (any axes, e.g.
            [time, rows, cols]), echo1 at ``te1_ms``, echo2 at ``te2_ms``.
        te1_ms, te2_ms: echo times in ms, te2_ms > te1_ms.
        smoothing_px: if > 0, box-average both echoes over this many pixels in the last two
            axes before the ratio (lowers noise bias at low SNR).
        max_r2star_per_s: upper clip (1/s) against ratios blown up by noise.

    Returns:
        float32 R2* in 1/s, 0 where the ratio is undefined or S2 >= S1 (no measurable decay).
    """
    echo1, echo2 = _checked_echoes(echo1, echo2, te1_ms, te2_ms, series=False)
    echo1, echo2 = _box(echo1, smoothing_px), _box(echo2, smoothing_px)
    valid = (echo2 > 0) & (echo1 > echo2)
    rate = np.zeros(echo1.shape, dtype=np.float64)
    rate[valid] = np.log(echo1[valid] / echo2[valid]) / ((te2_ms - te1_ms) * 1e-3)
    return np.clip(rate, 0.0, max_r2star_per_s).astype(np.float32)


def t2star_correct(echo1: np.ndarray, echo2: np.ndarray, te1_ms: float, te2_ms: float, *,
                   smoothing_px: int = 0, max_r2star_per_s: float = 2000.0) -> np.ndarray:
    """Echo-1 signal extrapolated to TE = 0: ``S1 * exp(TE1 * R2*)`` (same shape, float32).

    See :func:`r2star_per_s` for the arguments; the correction factor is 1 where no decay is
    measurable.
    """
    rate = r2star_per_s(echo1, echo2, te1_ms, te2_ms, smoothing_px=smoothing_px,
                        max_r2star_per_s=max_r2star_per_s)
    factor = np.exp(rate.astype(np.float64) * te1_ms * 1e-3)
    logger.debug("T2* correction: max factor %.3f", float(factor.max()))
    return (np.asarray(echo1, dtype=np.float64) * factor).astype(np.float32)


def r2star_linear_in_gd_per_s(echo1: np.ndarray, echo2: np.ndarray, te1_ms: float, te2_ms: float,
                              gd_mmol_l: np.ndarray, *, smoothing_px: int = 3,
                              max_r2star_per_s: float = 2000.0) -> np.ndarray:
    """R2* (1/s) of every pixel and frame from a per-pixel fit ``R2*(t) = R2*_0 + k * Gd(t)``.

    The relaxation rate of blood grows about linearly with its gadolinium concentration
    (R2* = R2*_0 + r2* [Gd]; Kellman et al., JCMR 2017; REFERENCES.md section 2). The two-echo
    estimate of one frame, ``ln(S1 / S2) / (TE2 - TE1)``, is noisy where the signal is low (echoes
    1 ms apart: a few per cent of noise in S1 and S2 is tens of 1/s in R2*), and ``exp(TE1 R2*)``
    of a noisy rate, clipped at R2* = 0, reads high on average. Here every frame's log ratio
    (unclipped, so its noise stays zero-mean) enters a weighted least-squares line against the
    pixel's Gd estimate over all frames, weighted by the inverse variance of the log ratio,
    ``1 / (1 / S1^2 + 1 / S2^2)`` (PD frames at full signal fix the intercept; frames near the
    noise floor count little). The fitted line, not the frame's own ratio, gives each frame's
    R2*: two numbers per pixel from all frames instead of one per frame. Neither the intercept
    nor the slope is assumed (field strength, contrast agent and the scanner set them).

    Args:
        echo1, echo2: float magnitude series [time, rows, cols], echo1 at ``te1_ms``, echo2 at
            ``te2_ms`` (PD frames included).
        te1_ms, te2_ms: echo times in ms, 0 <= te1_ms < te2_ms.
        gd_mmol_l: the regressor, [time, rows, cols] (or [time], one curve for all pixels): an
            estimate of each frame's Gd in mmol/L (0 for the PD frames and before the bolus). Its
            scale does not matter (the slope absorbs it), only that R2* is linear in it.
        smoothing_px: box average of both echoes (and of the regressor) over this many pixels in
            the last two axes before the ratio, as in :func:`r2star_per_s` (pass an unsmoothed
            regressor: it gets the same kernel as the rates).
        max_r2star_per_s: the fitted rate is clipped to [0, max_r2star_per_s].

    Returns:
        float32 [time, rows, cols] fitted R2* in 1/s. A pixel whose regressor does not vary
        (weighted variance ~ 0) gets the weighted mean of its rates (k = 0).

    Raises:
        EchoError: shapes or echo times that cannot be used, non-finite values.
    """
    echo1, echo2 = _checked_echoes(echo1, echo2, te1_ms, te2_ms)
    regressor = np.asarray(gd_mmol_l, dtype=np.float64)
    if regressor.ndim == 1 and regressor.shape[0] == echo1.shape[0]:
        regressor = np.broadcast_to(regressor[:, None, None], echo1.shape)
    if regressor.shape != echo1.shape:
        raise EchoError(f"Gd regressor must be [time] or the echoes' shape {echo1.shape}, found {regressor.shape}")
    if not np.all(np.isfinite(regressor)):
        raise EchoError("the Gd regressor contains non-finite values")
    rate, weight = _log_ratio_rate_and_weight(_box(echo1, smoothing_px), _box(echo2, smoothing_px), te1_ms, te2_ms)
    fitted = _weighted_line(rate, weight, _box(regressor, smoothing_px))
    return np.clip(fitted, 0.0, max_r2star_per_s).astype(np.float32)


def t2star_correct_gd_model(echo1: np.ndarray, echo2: np.ndarray, te1_ms: float, te2_ms: float,
                            n_pd_frames: int, ratio_to_gd: Callable[[np.ndarray], np.ndarray], *,
                            smoothing_px: int = 3, iterations: int = 2,
                            max_r2star_per_s: float = 2000.0, combine_echoes: bool = False) -> np.ndarray:
    """Echo 1 extrapolated to TE = 0 with the fitted R2* of :func:`r2star_linear_in_gd_per_s`.

    The Gd regressor comes from the series itself: echo 1 (box-smoothed with the rates' kernel,
    and not smoothed again) corrected with the current R2* estimate, divided by each pixel's mean
    PD frame (the SR/PD ratio), through ``ratio_to_gd`` (e.g. the blood table continued below
    Gd = 0, so noise stays zero-mean); PD frames are Gd 0. The first fit starts from the
    uncorrected echo 1 (its Gd reads ~10 % low at the peak but still rises monotonically with the
    truth); each further iteration re-estimates Gd with the corrected signal and refits (on
    simulated studies one fit and two agree within 0.3 % of the AIF's area: docs/preprocessing.md).

    Args:
        echo1, echo2: float magnitude series [time, rows, cols], PD frames first.
        te1_ms, te2_ms: echo times in ms.
        n_pd_frames: proton-density frames at the start of ``time`` (>= 1, fewer than all).
        ratio_to_gd: maps SR/PD ratios (any shape) to Gd in mmol/L.
        smoothing_px, max_r2star_per_s: as in :func:`r2star_linear_in_gd_per_s`.
        iterations: fits (>= 1).
        combine_echoes: return the inverse-variance weighted mean of BOTH echoes extrapolated to TE = 0,
            ``sum_i w_i S_i exp(TE_i R2*) / sum_i w_i`` with ``w_i = exp(-2 TE_i R2*)`` (the echoes carry
            independent noise of the same SD, and extrapolating echo i multiplies its noise by
            ``exp(TE_i R2*)``): the same signal with less noise (about 1 / sqrt(2) of echo 1's where R2*
            TE is small), as multi-echo images are combined; it leans on the fitted R2* model for echo 2
            as well.

    Returns:
        float32 [time, rows, cols]: ``echo1 * exp(TE1 * R2*_fit)`` (or the combination above).

    Raises:
        EchoError: echoes or echo times that cannot be used, or no PD / no SR frames.
    """
    echo1, echo2 = _checked_echoes(echo1, echo2, te1_ms, te2_ms)
    if n_pd_frames < 1 or n_pd_frames >= echo1.shape[0]:
        raise EchoError(f"need 1 <= n_pd_frames < frames, found {n_pd_frames} PD frames of {echo1.shape[0]}")
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, found {iterations}")
    smooth1 = _box(echo1, smoothing_px)
    rate, weight = _log_ratio_rate_and_weight(smooth1, _box(echo2, smoothing_px), te1_ms, te2_ms)
    fitted = np.zeros(echo1.shape)
    for _ in range(iterations):
        gd = _gd_regressor(smooth1, fitted, te1_ms, n_pd_frames, ratio_to_gd)
        # gd comes from the box-smoothed echo 1, so it has the rates' kernel already: smoothing it again
        # (as r2star_linear_in_gd_per_s does once for a raw regressor) would give it a wider one
        fitted = np.clip(_weighted_line(rate, weight, gd), 0.0, max_r2star_per_s)
    logger.debug("T2* linear-in-Gd model: factor at the series' largest R2* %.3f",
                 float(np.exp(fitted.max() * te1_ms * 1e-3)))
    return _extrapolated(echo1, echo2, fitted, te1_ms, te2_ms, combine_echoes)


@dataclass(frozen=True)
class BloodLine:
    """The image's blood R2* line ``R2* = r2star_0_per_s + slope_per_mmol_l * Gd`` and where it came from.

    Attributes:
        r2star_0_per_s: R2* of blood without gadolinium, 1/s.
        slope_per_mmol_l: the blood's R2* relaxivity, 1/s per mmol/L of the regressor's Gd.
        blood_pixels: pixels the line was fitted on.
    """

    r2star_0_per_s: float
    slope_per_mmol_l: float
    blood_pixels: int


def blood_line_r2star_per_s(echo1: np.ndarray, echo2: np.ndarray, te1_ms: float, te2_ms: float,
                            n_pd_frames: int, ratio_to_gd: Callable[[np.ndarray], np.ndarray], *,
                            box_px: int = 3, blood_fraction: float = 0.5, pd_fraction: float = 0.25,
                            max_gd_mmol_l: float = 30.0, min_blood_pixels: int = 4, min_gd_fraction: float = 0.25,
                            iterations: int = 4, max_r2star_per_s: float = 2000.0,
                            regressor: Literal["class-box", "own"] = "class-box") -> tuple[np.ndarray, BloodLine]:
    """R2* (1/s) of every pixel and frame from ONE line ``R2* = R2*_0 + k Gd`` shared by the image's blood.

    :func:`r2star_linear_in_gd_per_s` fits the line per pixel and needs box-averaged echoes against its
    noise; in a small LV (8-12 AIF pixels of 5-6 mm) a 7 x 7 box reaches into the myocardium, whose R2*
    rises less with its (lower) Gd, and the pool's first pass reads low (docs/preprocessing.md, "One R2*
    line for the image's blood"). Blood's R2* relaxivity is one number for all blood of a scan (LV, RV,
    vessels; Kellman et al., JCMR 2017; REFERENCES.md section 2): here the two numbers are fitted once on
    the image's blood pixels (hundreds of pixel-frames) and every pixel's R2* is that line at its Gd, with
    no averaging across the blood's border.

    Steps: (1) the blood: pixels inside the body (the PD image, echo 1 box-averaged over ``box_px``, at
    least ``pd_fraction`` of its 99th percentile, eroded by one pixel: a box at the body's edge mixes in
    air, whose magnitude floor reads as high Gd) whose Gd (box-averaged echo 1 over its mean PD frame,
    through ``ratio_to_gd``, 3-frame running mean) stays below ``max_gd_mmol_l`` and rises by at least
    ``blood_fraction`` of the 99th percentile of that rise (maximum minus minimum: the rise, unlike the
    level, ignores the magnitude floor of the dark pre-contrast blood). (2) Both echoes averaged over each
    pixel's neighbours of its own class (blood or not, ``box_px``): less noise, and no myocardium in a
    small pool's blood. (3) The inverse-variance weighted least-squares line of the blood pixel-frames'
    two-echo rates on their Gd (weights as in :func:`r2star_linear_in_gd_per_s`); SR frames under
    ``min_gd_fraction`` of the pixel's peak Gd are left out (their signal sits at the magnitude floor, where
    the echo ratio tends to 1 whatever the R2*); the PD frames (full signal, Gd 0) fix the intercept. Gd
    comes from the class-averaged echo 1 corrected with the current line; the first fit starts from the
    uncorrected echo 1 (as :func:`t2star_correct_gd_model`).

    Args:
        echo1, echo2: float magnitude series [time, rows, cols], PD frames first.
        te1_ms, te2_ms: echo times in ms, 0 <= TE1 < TE2.
        n_pd_frames: proton-density frames at the start of ``time`` (>= 1, fewer than all).
        ratio_to_gd: maps SR/PD ratios (any shape) to Gd in mmol/L.
        box_px: box of the class averages (pixels).
        blood_fraction, pd_fraction, max_gd_mmol_l, min_gd_fraction: above.
        min_blood_pixels: fewer blood pixels raise :class:`EchoError`.
        iterations: fits (>= 1).
        max_r2star_per_s: the rate is clipped to [0, max_r2star_per_s].
        regressor: where the fitted line is evaluated. ``"class-box"``: at each pixel's class-averaged Gd (the
            regressor of the fit). ``"own"``: at each pixel's own Gd, echo 1 not averaged in space but over 3
            frames in time (running mean), corrected with the line (two passes): the class average carries a
            pool's interior Gd onto its rim pixels (blood by the rise, partly myocardium), whose R2* the line
            then over-reads (session 26: large pools' first pass 1-2 % high without noise; docs/preprocessing.md
            "One R2* line for the image's blood", "The AIF's low peak is the T2* step's 7 x 7 box"). The line
            itself is fitted as above either way.

    Returns:
        (float64 [time, rows, cols] R2* in 1/s: the line at each pixel's Gd (``regressor``), :class:`BloodLine`).

    Raises:
        EchoError: echoes that cannot be used, fewer than ``min_blood_pixels`` blood pixels, or a line
            whose slope is not positive (no enhancing blood in the image).
    """
    echo1, echo2 = _checked_echoes(echo1, echo2, te1_ms, te2_ms)
    if n_pd_frames < 1 or n_pd_frames >= echo1.shape[0]:
        raise EchoError(f"need 1 <= n_pd_frames < frames, found {n_pd_frames} PD frames of {echo1.shape[0]}")
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, found {iterations}")
    if regressor not in ("class-box", "own"):
        raise ValueError(f"regressor must be 'class-box' or 'own', found {regressor!r}")
    blood = _blood_pixels(_box(echo1, box_px), n_pd_frames, ratio_to_gd, blood_fraction=blood_fraction,
                          pd_fraction=pd_fraction, max_gd_mmol_l=max_gd_mmol_l)
    if int(blood.sum()) < min_blood_pixels:
        raise EchoError(f"need >= {min_blood_pixels} blood pixels for the blood R2* line, found {int(blood.sum())}")
    smooth1, smooth2 = _class_box(echo1, blood, box_px), _class_box(echo2, blood, box_px)
    rate, weight = _log_ratio_rate_and_weight(smooth1, smooth2, te1_ms, te2_ms)
    fitted = np.zeros(echo1.shape)
    line = BloodLine(0.0, 0.0, 0)
    for _ in range(iterations):
        gd = _gd_regressor(smooth1, fitted, te1_ms, n_pd_frames, ratio_to_gd)
        used = gd >= min_gd_fraction * gd.max(axis=0)
        used[:n_pd_frames] = True
        w, x, y = weight[:, blood] * used[:, blood], gd[:, blood], rate[:, blood]
        total = w.sum()
        mean_x, mean_y = float((w * x).sum() / total), float((w * y).sum() / total)
        sxx = float((w * (x - mean_x) ** 2).sum())
        slope = float((w * (x - mean_x) * (y - mean_y)).sum() / sxx) if sxx > 0 else 0.0
        if not slope > 0:
            raise EchoError(f"the blood R2* line has slope {slope:.3g} 1/s per mmol/L (must be > 0): no enhancing "
                            f"blood in the AIF image")
        line = BloodLine(mean_y - slope * mean_x, slope, int(blood.sum()))
        fitted = np.clip(line.r2star_0_per_s + slope * gd, 0.0, max_r2star_per_s)
    if regressor == "own":
        # SR frames averaged over 3 frames in time only; the PD frames keep their own mean (Gd 0 anyway)
        own1 = echo1.copy()
        own1[n_pd_frames:] = ndimage.uniform_filter1d(echo1[n_pd_frames:], 3, axis=0, mode="nearest")
        fitted = np.zeros(echo1.shape)
        for _ in range(2):
            gd = _gd_regressor(own1, fitted, te1_ms, n_pd_frames, ratio_to_gd)
            fitted = np.clip(line.r2star_0_per_s + line.slope_per_mmol_l * gd, 0.0, max_r2star_per_s)
    return fitted, line


def _blood_pixels(smooth1: np.ndarray, n_pd_frames: int, ratio_to_gd: Callable[[np.ndarray], np.ndarray], *,
                  blood_fraction: float, pd_fraction: float, max_gd_mmol_l: float) -> np.ndarray:
    """bool [rows, cols]: the blood of :func:`blood_line_r2star_per_s` step (1) from box-averaged echo 1."""
    pd_image = smooth1[:n_pd_frames].mean(axis=0)
    pd_level = np.percentile(pd_image, 99)
    if not pd_level > 0:
        raise EchoError("the AIF image's PD frames have no signal: cannot find the image's blood")
    body = ndimage.binary_erosion(pd_image >= pd_fraction * pd_level, iterations=1)
    gd = _gd_regressor(smooth1, 0.0, 0.0, n_pd_frames, ratio_to_gd)[n_pd_frames:]  # uncorrected echo 1
    running = ndimage.uniform_filter1d(gd, 3, axis=0, mode="nearest")
    top = running.max(axis=0)
    rise = top - running.min(axis=0)
    candidates = body & (top < max_gd_mmol_l)
    if not candidates.any():
        raise EchoError("no AIF pixel inside the body with a plausible Gd: cannot find the image's blood")
    return candidates & (rise >= blood_fraction * np.percentile(rise[candidates], 99))


def t2star_correct_blood_line(echo1: np.ndarray, echo2: np.ndarray, te1_ms: float, te2_ms: float,
                              n_pd_frames: int, ratio_to_gd: Callable[[np.ndarray], np.ndarray], *,
                              combine_echoes: bool = False, **line_options: float | str
                              ) -> tuple[np.ndarray, BloodLine]:
    """The AIF series at TE = 0 with :func:`blood_line_r2star_per_s`'s R2*: echo 1 extrapolated, or with
    ``combine_echoes`` both echoes combined as in :func:`t2star_correct_gd_model`. ``line_options`` go to
    :func:`blood_line_r2star_per_s`. Returns (float32 [time, rows, cols], :class:`BloodLine`)."""
    fitted, line = blood_line_r2star_per_s(echo1, echo2, te1_ms, te2_ms, n_pd_frames, ratio_to_gd, **line_options)
    logger.debug("T2* blood line: R2*_0 %.1f 1/s, slope %.2f 1/s per mmol/L, %d blood pixels",
                 line.r2star_0_per_s, line.slope_per_mmol_l, line.blood_pixels)
    # the echoes were checked by the fit
    return _extrapolated(np.asarray(echo1, dtype=np.float64), np.asarray(echo2, dtype=np.float64), fitted,
                         te1_ms, te2_ms, combine_echoes), line


def _class_box(series: np.ndarray, member: np.ndarray, size_px: int) -> np.ndarray:
    """Box average over the last two axes within each pixel's class: members (``member`` True) over their
    member neighbours, the others over theirs (normalised convolution; as is for ``size_px`` <= 1)."""
    series = np.asarray(series, dtype=np.float64)
    if size_px <= 1:
        return series
    inside = member.astype(np.float64)
    out = np.empty_like(series)
    for weight, where in ((inside, member), (1.0 - inside, ~member)):
        norm = _box(weight, size_px)
        out[:, where] = (_box(series * weight, size_px)[:, where] / norm[where])
    return out


def _gd_regressor(smooth1: np.ndarray, fitted: np.ndarray | float, te1_ms: float, n_pd_frames: int,
                  ratio_to_gd: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Each pixel's Gd per frame: echo 1 corrected with the current R2* ``fitted`` (1/s, per pixel and frame,
    or one number), over its mean PD frame, through ``ratio_to_gd``; PD frames are Gd 0."""
    corrected = smooth1 * np.exp(fitted * (te1_ms * 1e-3))
    pd_image = corrected[:n_pd_frames].mean(axis=0)
    ratio = corrected / np.where(pd_image > 0, pd_image, np.inf)
    gd = np.asarray(ratio_to_gd(ratio), dtype=np.float64)
    gd[:n_pd_frames] = 0.0
    if not np.all(np.isfinite(gd)):
        raise EchoError("ratio_to_gd returned non-finite Gd")
    return gd


def _extrapolated(echo1: np.ndarray, echo2: np.ndarray, fitted: np.ndarray, te1_ms: float, te2_ms: float,
                  combine_echoes: bool) -> np.ndarray:
    """float32 echo 1 at TE = 0 with R2* ``fitted``, or (``combine_echoes``) both echoes at TE = 0 combined
    with inverse-variance weights ``exp(-2 TE_i R2*)``."""
    if not combine_echoes:
        return (echo1 * np.exp(fitted * (te1_ms * 1e-3))).astype(np.float32)
    # w_i S0_i = exp(-TE_i R2*) S_i: the weighted sum needs only the decay factors
    decay1 = np.exp(-fitted * (te1_ms * 1e-3))
    decay2 = np.exp(-fitted * (te2_ms * 1e-3))
    return ((decay1 * echo1 + decay2 * echo2) / (decay1 * decay1 + decay2 * decay2)).astype(np.float32)


def _checked_echoes(echo1: np.ndarray, echo2: np.ndarray, te1_ms: float, te2_ms: float, *, series: bool = True
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Both echoes as float64 after the checks shared by every estimate: one shape (``series``: a
    [time, rows, cols] series; else any axes), finite values, finite echo times 0 <= TE1 < TE2."""
    echo1 = np.asarray(echo1, dtype=np.float64)
    echo2 = np.asarray(echo2, dtype=np.float64)
    expected = "two echo series [time, rows, cols]" if series else "two echo images"
    if echo1.shape != echo2.shape:
        raise EchoError(f"need {expected} of one shape; the echo images differ in shape: echo 1 {echo1.shape}, "
                        f"echo 2 {echo2.shape}")
    if series and echo1.ndim != 3:
        raise EchoError(f"need {expected} of one shape, found shape {echo1.shape}")
    if not (np.isfinite(te1_ms) and np.isfinite(te2_ms) and 0 <= te1_ms < te2_ms):
        raise EchoError(f"need finite echo times 0 <= TE1 < TE2, found TE1 {te1_ms} ms, TE2 {te2_ms} ms")
    if not (np.all(np.isfinite(echo1)) and np.all(np.isfinite(echo2))):
        raise EchoError("echo images contain non-finite values")
    return echo1, echo2


def _box(series: np.ndarray, size_px: int) -> np.ndarray:
    """Box average over the last two axes (rows, cols) of an image or series, e.g. [time, rows, cols],
    edges by the nearest value (``size_px`` <= 1: as is, float64)."""
    series = np.asarray(series, dtype=np.float64)
    if size_px <= 1:
        return series
    size = (1,) * (series.ndim - 2) + (size_px, size_px)
    return ndimage.uniform_filter(series, size=size, mode="nearest")


def _log_ratio_rate_and_weight(echo1: np.ndarray, echo2: np.ndarray, te1_ms: float, te2_ms: float
                               ) -> tuple[np.ndarray, np.ndarray]:
    """Unclipped two-echo rate ln(S1/S2)/(TE2-TE1) (1/s) and its inverse-variance weight (0 where S <= 0).

    The weights are computed from the same noisy signals as the rates (the true S1, S2 are unknown), so
    frames whose noise happens to raise the signal count a little more: a small second-order bias of the
    weighted line, well below the first-order bias of exp(TE1 R2*) of clipped per-frame rates.
    """
    usable = (echo1 > 0) & (echo2 > 0)
    safe1 = np.where(usable, echo1, 1.0)
    safe2 = np.where(usable, echo2, 1.0)
    rate = np.log(safe1 / safe2) * (1e3 / (te2_ms - te1_ms))
    weight = np.where(usable, (safe1 * safe1 * safe2 * safe2) / (safe1 * safe1 + safe2 * safe2), 0.0)
    return rate, weight


def _weighted_line(rate: np.ndarray, weight: np.ndarray, regressor: np.ndarray) -> np.ndarray:
    """Per pixel weighted least-squares line of ``rate`` on ``regressor`` over time, evaluated at every frame."""
    total = weight.sum(axis=0)
    safe_total = np.where(total > 0, total, 1.0)
    mean_x = np.einsum("tij,tij->ij", weight, regressor) / safe_total
    mean_y = np.einsum("tij,tij->ij", weight, rate) / safe_total
    dx = regressor - mean_x
    weighted_dx = weight * dx
    sxx = np.einsum("tij,tij->ij", weighted_dx, dx)
    sxy = np.einsum("tij,tij->ij", weighted_dx, rate)
    # a regressor that does not vary (air, a pixel without enhancement) leaves the slope undefined
    scale = np.maximum(np.abs(regressor).max(axis=0), 1e-12)
    defined = sxx > 1e-9 * scale**2 * safe_total
    slope = np.where(defined, sxy / np.where(defined, sxx, 1.0), 0.0)
    return mean_y + slope * dx
