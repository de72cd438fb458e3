"""Arterial input function: LV blood-pool detection, foot/peak, baseline, blood to plasma.

REFERENCES.md section 3. The LV blood pool is found in the low-resolution AIF image series
[time, rows, cols] by its dynamics and shape, without a network: blood pools are the pixels
with a strong, transient first-pass enhancement; they split into connected pools; the RV
pool peaks first and the LV is the large pool that peaks after it next to it (QPerf uses a
CNN for this step; this classical method is its open replacement).

When the caller knows where the LV is (``lv_hint_rc``: the CNN's LV centre of the myocardial
slices projected into the AIF image plane, ``gadgets/mapping.py``), the LV is the enhancing
pool at that point, restricted to the LV's own disc; the dynamics-only choice is kept where it
agrees with the hint. Where no enhancing pool lies at the hint, the core of the enhancing
pixels inside the LV disc is taken (``AifResult.source`` says which path chose the pixels).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import scipy.ndimage as ndi
from pydantic import BaseModel, ConfigDict, Field

logger = logging.getLogger(__name__)


class AifError(ValueError):
    """The AIF series or curve does not show a usable first-pass bolus."""


class AifSettings(BaseModel):
    """Settings of the LV blood-pool detection and of the foot/peak search."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    smoothing_frames: int = Field(3, ge=1, description="moving-average width in time, frames")
    enhancement_fraction: float = Field(
        0.3, gt=0, lt=1, description="blood pixels enhance by at least this fraction of the 99th percentile"
    )
    min_relative_enhancement: float = Field(
        1.0, gt=0, description="and by at least this multiple of their own baseline signal"
    )
    min_washout_fraction: float = Field(
        0.25, ge=0, lt=1, description="first pass: the last quarter lies this fraction of the enhancement below the peak"
    )
    min_pool_pixels: int = Field(4, ge=1, description="smallest blood pool kept, pixels")
    min_blood_enhancement_fraction: float = Field(
        0.5, ge=0, le=1, description=(
            "a large pool can be the RV only if its 90th-percentile pixel enhancement reaches this fraction of the "
            "strongest large pool's")
    )
    min_peak_separation_frames: int = Field(1, ge=0, description="LV peaks at least this many frames after the RV")
    max_peak_separation_frames: int = Field(
        20, ge=1, description="and at most this many (pulmonary transit; later pools are recirculation or noise)"
    )
    min_split_frames: float = Field(
        4.0, gt=0, description="a pool whose pixels arrive in two groups this many frames apart holds both ventricles"
    )
    min_first_pass_contrast: float = Field(
        2.0, gt=1, description=(
            "arterial blood peaks at least this many times higher than its late level (first_pass_contrast: 3.1-13 "
            "on the AIF pools of 100 simulated dev scans, the myocardium about 1.5): at the CNN's LV, the later-"
            "arriving part of a split pool that stays below it is myocardium around the LV, not LV blood behind the "
            "RV, and the pool is not split; without a hint, LV candidates below it are dropped unless none reaches it "
            "(docs/preprocessing.md, 'Myocardium taken for the AIF')")
    )
    foot_fraction: float = Field(0.05, gt=0, lt=1, description="foot: last frame below this fraction of the upslope")
    skip_frames: int = Field(1, ge=0, description="first frames left out of the baseline (steady state)")
    spatial_smoothing_px: int = Field(
        3, ge=1, description="box width in pixels applied before the pool detection only (not to the curve)"
    )
    core_fraction: float = Field(
        0.0, ge=0, lt=1, description="LV pixels kept: enhancement at least this fraction of the pool's 90th percentile"
    )
    min_core_pixels: int = Field(
        8, ge=1, description=(
            "fewer core pixels than this: keep this many of the pool's most enhancing pixels instead (a small "
            "blurred pool has few pixels near its 90th percentile; averaging too few adds noise)")
    )
    hint_max_distance_px: float = Field(
        3.5, gt=0, description=(
            "with an LV hint: the dynamics-only LV choice is kept when its centre lies within this distance of "
            "the hint, AIF pixels (3.5 px = 20 mm at 5.6 mm pixels, the report's AIF-LV distance flag)")
    )
    hint_radius_px: float = Field(
        3.0, gt=0, description="with an LV hint and no LV radius given: LV blood-pool radius, AIF pixels"
    )
    hint_margin_px: float = Field(
        1.0, ge=0, description=(
            "the LV disc around the hint is the LV radius plus this margin, AIF pixels (projection across "
            "slices, blur of the low-resolution pool)")
    )


class _Pool(NamedTuple):
    """One connected enhancing pool of the AIF series (``detect_aif``)."""

    label: int            # its label in the connected-component image
    area: int             # pixels
    peak_frame: int       # frame of the peak of its mean curve
    enhancement: float    # 90th percentile of its pixels' enhancement over their 10th time percentile


AIF_SOURCE_POOLS = "pools"
AIF_SOURCE_POOLS_AT_HINT = "pools, agree with the LV hint"
AIF_SOURCE_POOL_AT_HINT = "pool at the LV hint"
AIF_SOURCE_HINT_REGION = "LV hint region, no enhancing pool there"


@dataclass(frozen=True)
class AifResult:
    """Detected AIF. ``mask`` is bool [rows, cols]; ``curve`` the mean LV signal [time].

    ``source`` says how the LV pixels were chosen: ``AIF_SOURCE_POOLS`` (dynamics only, no
    hint), ``AIF_SOURCE_POOLS_AT_HINT`` (dynamics-only choice within ``hint_max_distance_px``
    of the hint), ``AIF_SOURCE_POOL_AT_HINT`` (the pool covering the hint, another choice
    overruled) or ``AIF_SOURCE_HINT_REGION`` (no enhancing pool at the hint: the most enhancing
    pixels of the LV disc).
    """

    mask: np.ndarray
    rv_mask: np.ndarray  # the pool taken as RV (may be empty)
    curve: np.ndarray
    foot: int  # 0-based frame index of the bolus arrival
    peak: int  # 0-based frame index of the first-pass peak
    source: str = AIF_SOURCE_POOLS


def _smooth(curves: np.ndarray, width: int, axis: int = -1) -> np.ndarray:
    if width <= 1:
        return np.asarray(curves, dtype=np.float64)
    return ndi.uniform_filter1d(np.asarray(curves, dtype=np.float64), width, axis=axis, mode="nearest")


def aif_foot_peak(curve: np.ndarray, *, settings: AifSettings | None = None) -> tuple[int, int]:
    """Foot (bolus arrival) and first-pass peak of a blood curve, 0-based frame indices.

    The curve is smoothed; the peak is its maximum; the baseline is the median of the frames
    before the upslope; the foot is the last frame before the peak that is still within
    ``foot_fraction`` of the peak-to-baseline rise. Raises ``AifError`` when the curve has no
    bolus: non-finite values, a peak on the first frames, or a rise within the noise.
    """
    settings = settings or AifSettings()
    values = np.asarray(curve, dtype=np.float64).ravel()
    if values.size < 8:
        raise AifError(f"AIF curve needs at least 8 frames, got {values.size}")
    if not np.all(np.isfinite(values)):
        raise AifError("AIF curve contains NaN or infinite values")
    smooth = _smooth(values, settings.smoothing_frames)
    peak = int(np.argmax(smooth))
    start = min(settings.skip_frames, values.size - 1)
    if peak <= start + 1:
        raise AifError(f"AIF peaks at frame {peak}, before any baseline: no bolus in the curve")
    # baseline from the frames before the steepest upslope
    slope = np.gradient(smooth)
    upslope = start + int(np.argmax(slope[start : peak + 1]))
    baseline_frames = values[start : max(upslope - 1, start + 1)]
    baseline = float(np.median(baseline_frames))
    rise = smooth[peak] - baseline
    noise = float(np.median(np.abs(np.diff(values))) / 0.954 + 1e-12)  # sd of white noise
    if rise <= 5.0 * noise or rise <= 0:
        raise AifError(
            f"AIF rise {rise:.3g} is not above the noise ({noise:.3g}): no bolus in the curve"
        )
    below = np.flatnonzero(smooth[: peak + 1] <= baseline + settings.foot_fraction * rise)
    foot = int(below[-1]) if below.size else start
    return foot, peak


def sample_foot_time(time_s: np.ndarray, blood: np.ndarray, level: float, noise_level: float = 0.0) -> float:
    """Bolus arrival (s) on a baseline-subtracted blood curve at its acquisition times.

    The fractional time where the samples last cross ``level`` upwards before their maximum, by
    linear interpolation between the two samples around it; the first sample's time when no sample
    before the maximum is at or below ``level``. Unlike :func:`aif_foot_peak` it uses the acquired
    samples (once per heartbeat, 0.6-1.1 s apart) without smoothing or a grid: the 3-frame moving
    average on the 0.5 s grid merges a small pool's pre-bolus noise bumps with the upslope and puts
    that foot 0.5 s (median) to 3 s before the arrival (docs/preprocessing.md "AIF foot from the
    acquired samples").

    ``noise_level`` > ``level`` (e.g. a few times the samples' noise SD) makes pre-bolus noise above
    ``level`` count as baseline: the interval is the one after the last sample before the maximum at
    or below ``noise_level``, and where that sample lies above ``level`` it is read as zero, so the
    crossing of ``level`` is interpolated from zero at its time (it then lies after that sample, which
    the caller zeroes with the rest of the baseline). With ``noise_level <= level`` this is the plain
    crossing above.

    Args:
        time_s: [S] acquisition times (s), increasing.
        blood: [S] blood Gd (mmol/L), baseline subtracted.
        level: arrival level (mmol/L), e.g. 5 % of the first-pass peak.
        noise_level: level (mmol/L) below which a pre-bolus sample may be noise.
    """
    t = np.asarray(time_s, dtype=np.float64).ravel()
    values = np.asarray(blood, dtype=np.float64).ravel()
    if t.size != values.size or t.size < 2:
        raise AifError(f"need matching sample times and values (2 or more), got {t.size} and {values.size}")
    if not (np.all(np.isfinite(t)) and np.all(np.isfinite(values)) and math.isfinite(level)
            and math.isfinite(noise_level)):
        raise AifError("AIF samples or arrival level not finite")
    if np.any(np.diff(t) <= 0):
        raise AifError("AIF sample times must increase")
    peak = int(np.argmax(values))
    below = np.flatnonzero(values[:peak] <= max(level, noise_level))
    if not below.size:
        return float(t[0])
    i = int(below[-1])
    start = values[i] if values[i] <= level else 0.0
    step = values[i + 1] - start
    fraction = float((level - start) / step) if step > 0 else 0.0
    return float(t[i] + min(max(fraction, 0.0), 1.0) * (t[i + 1] - t[i]))


def first_pass_contrast(curve: np.ndarray, *, settings: AifSettings | None = None) -> float:
    """First-pass peak enhancement over the late enhancement of a curve [time] (any units linear in Gd
    at low Gd: signal, SR/PD, Gd), a dimensionless shape measure that separates arterial blood from tissue.

    The curve is smoothed (``smoothing_frames``); baseline = median of its first tenth (at least 3
    frames, after ``skip_frames``), peak = its maximum, late = mean of its last fifth. Arterial blood
    has a sharp first pass over a low recirculation level (3-13 on simulated scans, see
    ``AifSettings.min_first_pass_contrast``); myocardium rises to a plateau (about 1.5). A late level
    at or below the baseline (complete washout) gives ``inf``. Raises ``AifError`` for fewer than 10
    frames or no enhancement.
    """
    settings = settings or AifSettings()
    values = _smooth(np.asarray(curve, dtype=np.float64), settings.smoothing_frames)
    if values.ndim != 1 or values.size < 10:
        raise AifError(f"first_pass_contrast needs a curve of at least 10 frames, got shape {np.shape(curve)}")
    start = min(settings.skip_frames, values.size // 10)
    baseline = float(np.median(values[start:start + max(3, values.size // 10)]))
    rise = float(values.max()) - baseline
    if not rise > 0:
        raise AifError("first_pass_contrast: the curve does not rise above its baseline")
    late = float(values[-max(2, values.size // 5):].mean()) - baseline
    return float("inf") if late <= 0 else rise / late


def magnitude_floor_corrected_curve(series: np.ndarray, mask: np.ndarray, baseline: slice,
                                    zero_level: float) -> np.ndarray:
    """Mean curve of magnitude-derived images over ``mask`` with the noise floor removed.

    Magnitude images carry a Rician noise floor: E[M^2] = A^2 + 2 sigma^2 (Gudbjartsson &
    Patz, MRM 1995). Before the bolus a saturation-recovery AIF image has almost no signal, so
    the floor dominates the baseline (e.g. SR/PD 0.15 where the blood table gives 0.03 at
    Gd = 0), and subtracting that baseline from the Gd curve would remove it from every frame
    although the floor fades as the signal rises. Here 2 sigma^2 is estimated from the baseline
    frames, whose true level ``zero_level`` is known (the table's value at Gd = 0), and the
    curve is ``sqrt(mean_mask(M^2) - 2 sigma^2)``.

    Args:
        series: [time, rows, cols] magnitude or SR/PD ratio images.
        mask: bool [rows, cols] pixels averaged.
        baseline: frames before the bolus arrival (at least 2).
        zero_level: true pre-contrast value of the images in the mask.

    Returns:
        float64 [time] curve (the plain mean where the baseline is too short).
    """
    values = np.asarray(series, dtype=np.float64)[:, np.asarray(mask, dtype=bool)]
    if values.shape[1] == 0:
        raise AifError("the AIF mask is empty")
    second_moment = np.mean(values**2, axis=1)
    floor = _magnitude_floor(second_moment, baseline, zero_level)
    if floor is None:
        return values.mean(axis=1)
    return np.sqrt(np.maximum(second_moment - floor, 0.0))


def _magnitude_floor(second_moment: np.ndarray, baseline: slice, zero_level: float) -> float | None:
    """``2 sigma^2`` (>= 0) from the baseline frames of a pool's mean squared magnitude [time] whose true
    pre-contrast value is ``zero_level``; None when the baseline has fewer than 2 frames."""
    frames = second_moment[baseline]
    if frames.size < 2:
        return None
    return max(float(np.mean(frames)) - zero_level**2, 0.0)


def pool_frame_noise_sd(series: np.ndarray, mask: np.ndarray, baseline: slice, zero_level: float,
                        weights: np.ndarray | None = None) -> float:
    """SD of one frame of a pool curve from the white noise of its magnitude images (``series`` units).

    The baseline frames' magnitude floor (:func:`magnitude_floor_corrected_curve`: ``2 sigma^2 =
    mean_mask(M^2) - zero_level^2`` before the bolus, Gudbjartsson & Patz, MRM 1995) gives the noise
    ``sigma`` of one pixel in one frame; where the signal is well above it a pixel's magnitude has SD
    ``sigma``, and a pool curve ``sum_i w_i M_i`` (uniform ``1/N`` or the partial-volume weights of
    ``toolbox.aif_partial_volume``) has SD ``sigma * ||w||``. Frame noise only: it leaves out the noise
    of the pixel choice, of the weights and of the floor itself (on 100 simulated dev scans the AIF's
    first-pass area scatters about twice what this predicts; docs/mapping.md, "Session 22").

    Args:
        series: [time, rows, cols] magnitude or SR/PD ratio images.
        mask: bool [rows, cols] pool pixels (``weights`` in ``np.flatnonzero(mask)`` order).
        baseline: frames before the bolus arrival (at least 2, else NaN is returned).
        zero_level: true pre-contrast value of the images in the mask.
        weights: [N] pixel weights summing to 1; None: the plain mean.

    Returns:
        float: the SD (>= 0), NaN when the baseline has fewer than 2 frames.
    """
    values = np.asarray(series, dtype=np.float64)[:, np.asarray(mask, dtype=bool)]
    if values.shape[1] == 0:
        raise AifError("the AIF mask is empty")
    w = np.full(values.shape[1], 1.0 / values.shape[1]) if weights is None else np.asarray(weights, np.float64)
    if w.shape != (values.shape[1],):
        raise AifError(f"weights for {w.size} pixels, the mask holds {values.shape[1]}")
    floor = _magnitude_floor(np.mean(values**2, axis=1), baseline, zero_level)
    if floor is None:
        return math.nan
    return math.sqrt(floor / 2.0) * float(np.sqrt(w @ w))


def first_pass_area_noise_pct(time_s: np.ndarray, blood: np.ndarray, noise_sd: np.ndarray, arrival_s: float, *,
                              window_s: float = 8.0) -> float:
    """Relative SD (%) of an AIF's first-pass area from independent per-sample noise.

    The area is the trapezoid-weighted sum of the acquired samples (once per heartbeat) from the
    arrival to ``window_s`` after the peak, where the MBF fit reads the AIF (on simulated scans the
    global MBF moves about -0.9 % per % of that area, docs/mapping.md "Session 21"); each sample's
    noise SD ``noise_sd`` (e.g. :func:`pool_frame_noise_sd` through the Gd table's slope) is
    independent of the others.

    Args:
        time_s: [S] acquisition times (s), increasing.
        blood: [S] blood Gd (mmol/L), baseline subtracted.
        noise_sd: [S] SD of each sample (mmol/L).
        arrival_s: bolus arrival (s).
        window_s: the window's end after the peak (s).

    Returns:
        float: 100 * SD(area) / area; NaN when the window holds fewer than 2 samples or no area.
    """
    t = np.asarray(time_s, dtype=np.float64).ravel()
    b = np.asarray(blood, dtype=np.float64).ravel()
    sd = np.asarray(noise_sd, dtype=np.float64).ravel()
    if not (t.size == b.size == sd.size) or t.size < 2:
        raise AifError(f"need matching sample times, values and SDs (2 or more), got {t.size}, {b.size}, {sd.size}")
    peak = int(np.argmax(b))
    inside = (t >= arrival_s) & (t <= t[peak] + window_s)
    if inside.sum() < 2:
        return math.nan
    dt = np.gradient(t)[inside]
    area = float(np.sum(b[inside] * dt))
    if not area > 0:
        return math.nan
    return 100.0 * float(np.sqrt(np.sum((sd[inside] * dt) ** 2))) / area


def baseline_subtract(curve: np.ndarray, foot: int, *, skip_frames: int = 1) -> np.ndarray:
    """Subtract the mean of frames ``skip_frames .. foot`` (inclusive) from the curve."""
    values = np.asarray(curve, dtype=np.float64)
    first = min(skip_frames, foot)
    return values - values[first : foot + 1].mean()


def blood_to_plasma(curve: np.ndarray, hematocrit: float) -> np.ndarray:
    """Plasma concentration ``Cp = Cb / (1 - Hct)`` (REFERENCES.md section 3)."""
    if not 0.0 <= hematocrit < 1.0:
        raise AifError(f"hematocrit must be in [0, 1), got {hematocrit}")
    return np.asarray(curve, dtype=np.float64) / (1.0 - hematocrit)


def _candidate_pixels(series: np.ndarray, settings: AifSettings) -> np.ndarray:
    """Pixels with a strong, transient enhancement, bool [rows, cols]."""
    smooth = _smooth(series, settings.smoothing_frames, axis=0)
    n = smooth.shape[0]
    baseline = np.percentile(smooth, 10, axis=0)
    peak = smooth.max(axis=0)
    enhancement = peak - baseline
    late = smooth[-max(n // 4, 1) :].mean(axis=0)
    reference = np.percentile(enhancement, 99)
    if not reference > 0:
        raise AifError("the AIF series shows no enhancement")
    return (
        (enhancement >= settings.enhancement_fraction * reference)
        & (enhancement >= settings.min_relative_enhancement * np.maximum(baseline, 0))
        & (peak - late >= settings.min_washout_fraction * enhancement)
    )


def body_mask(pd_image: np.ndarray) -> np.ndarray:
    """Body (not air) pixels of a proton-density image [rows, cols], bool.

    Otsu threshold of the PD intensities; a closing (two 3 x 3 steps) and a hole fill before
    one opening, so that a thin or faint body wall broken into pieces by the threshold still
    encloses the body (fresh study 2**30 + 105: the opening cut the wall, the largest piece was
    433 of about 1,900 body pixels and held no heart); the largest connected component with its
    holes filled. Outside the body the SR/PD ratio is noise over noise and would dominate any
    enhancement statistics of the AIF series.
    """
    image = np.asarray(pd_image, dtype=np.float64)
    if image.ndim != 2 or not np.all(np.isfinite(image)):
        raise AifError(f"PD image must be a finite [rows, cols] array, got shape {image.shape}")
    counts, edges = np.histogram(image, 256)
    centres = 0.5 * (edges[:-1] + edges[1:])
    below = np.cumsum(counts).astype(np.float64)
    moment = np.cumsum(counts * centres)
    total, total_moment = below[-1], moment[-1]
    between = (total_moment * below - moment * total) ** 2 / np.maximum(below * (total - below), 1e-12)
    foreground = image > centres[int(np.argmax(between))]
    closed = ndi.binary_closing(foreground, structure=np.ones((3, 3), dtype=bool), iterations=2)
    body = ndi.binary_opening(ndi.binary_fill_holes(closed))
    labels, count = ndi.label(body)
    if count == 0:
        return np.ones(image.shape, dtype=bool)
    sizes = ndi.sum(body, labels, index=range(1, count + 1))
    return ndi.binary_fill_holes(labels == 1 + int(np.argmax(sizes)))


def detect_aif(aif_series: np.ndarray, *, settings: AifSettings | None = None,
               body: np.ndarray | None = None, lv_hint_rc: tuple[float, float] | None = None,
               lv_hint_radius_px: float | None = None) -> AifResult:
    """Find the LV blood pool in an AIF series ``[time, rows, cols]`` (signal, SR/PD or Gd).

    The pools are found on a spatially smoothed copy (``spatial_smoothing_px``) restricted to
    ``body`` (bool [rows, cols], e.g. :func:`body_mask` of the PD image); the LV keeps its
    core pixels (``core_fraction``) and its curve is the mean of the unsmoothed series there.

    Without a hint the LV is chosen by the pools' dynamics and shape alone (module docstring), among
    the candidates that look like blood (``min_first_pass_contrast``) when any does.
    With ``lv_hint_rc`` (row, col of the LV centre in pixels of this image, e.g. the CNN's LV
    centre of the myocardial slices projected into the AIF plane) and ``lv_hint_radius_px``
    (the LV blood-pool radius in these pixels; ``hint_radius_px`` if None), the LV disc is the
    hint's radius plus ``hint_margin_px``, and the body mask is widened by it (the CNN saw the
    LV there). Then, in order:

    1. the dynamics-only choice, if its centre lies within ``hint_max_distance_px`` of the
       hint and at least ``min_pool_pixels`` of it in the LV disc, restricted to the disc;
    2. else the enhancing pool with the most pixels in the LV disc, restricted to it (a pool
       far from the hint is never taken when one at the hint exists; a pool that merged the LV
       with the aorta or lung keeps only its LV part; split by arrival, its later part is taken
       only if it looks like blood, ``min_first_pass_contrast``);
    3. else (no enhancing pool at the hint) the enhancing pixels of the LV disc itself.

    The core is then taken as without a hint. Returns the LV mask, the mean LV curve, its foot,
    peak and ``source`` (which path chose the pixels). Raises ``AifError`` if no enhancing pool
    is found (without a hint), the hint lies outside the image, or the LV curve has no bolus.
    """
    settings = settings or AifSettings()
    series = np.asarray(aif_series, dtype=np.float64)
    if series.ndim != 3 or series.shape[0] < 8:
        raise AifError(f"AIF series must be [time >= 8, rows, cols], got shape {series.shape}")
    if not np.all(np.isfinite(series)):
        raise AifError("AIF series contains NaN or infinite values")
    if body is not None and np.shape(body) != series.shape[1:]:
        raise AifError(f"body mask shape {np.shape(body)} differs from the image shape {series.shape[1:]}")
    disc = None
    if lv_hint_rc is not None:
        disc = _lv_disc(series.shape[1:], lv_hint_rc, lv_hint_radius_px, settings)
        if body is not None:
            body = np.asarray(body, dtype=bool) | disc
    detection = series
    if settings.spatial_smoothing_px > 1:
        width = settings.spatial_smoothing_px
        detection = ndi.uniform_filter(series, size=(1, width, width), mode="nearest")
    if body is not None:
        detection = detection * np.asarray(body, dtype=bool)
    smooth = _smooth(detection, settings.smoothing_frames, axis=0)
    labels, pools = _enhancing_pools(detection, smooth, settings)
    chosen = _dynamics_choice(smooth, labels, pools, settings) if pools else None
    if disc is None:
        if chosen is None:
            raise AifError("no enhancing blood pool found in the AIF series")
        (lv_mask, rv_mask), source = chosen, AIF_SOURCE_POOLS
    else:
        assert lv_hint_rc is not None
        lv_mask, rv_mask, source = _hint_choice(smooth, labels, pools, chosen, disc, lv_hint_rc, settings)
    lv_mask = _pool_core(smooth, lv_mask, settings.core_fraction, settings.min_core_pixels)
    curve = series[:, lv_mask].mean(axis=1)
    try:
        foot, peak = aif_foot_peak(curve, settings=settings)
    except AifError as error:
        raise AifError(f"the LV pool ({source}, {int(lv_mask.sum())} pixels): {error}") from error
    logger.info("AIF: LV pool of %d pixels (%s), foot %d, peak %d", int(lv_mask.sum()), source, foot, peak)
    return AifResult(mask=lv_mask, rv_mask=rv_mask, curve=curve, foot=foot, peak=peak, source=source)


def _enhancing_pools(detection: np.ndarray, smooth: np.ndarray,
                     settings: AifSettings) -> tuple[np.ndarray, list[_Pool]]:
    """Connected pools of strongly, transiently enhancing pixels that show a bolus: the label
    image [rows, cols] and the pools of at least ``min_pool_pixels``."""
    labels, count = ndi.label(_candidate_pixels(detection, settings))
    pools = []
    for label in range(1, count + 1):
        region = labels == label
        area = int(region.sum())
        if area < settings.min_pool_pixels:
            continue
        curves = smooth[:, region]
        mean_curve = curves.mean(axis=1)
        try:  # a blood pool shows a bolus: noise clusters peaking on the first frames do not
            aif_foot_peak(mean_curve, settings=settings)
        except AifError:
            continue
        # enhancement over the 10th percentile in time (an RV may peak on frame 7)
        enhancement = curves.max(axis=0) - np.percentile(curves, 10, axis=0)
        pools.append(_Pool(label=label, area=area, peak_frame=int(np.argmax(mean_curve)),
                           enhancement=float(np.percentile(enhancement, 90))))
    return labels, pools


def _dynamics_choice(smooth: np.ndarray, labels: np.ndarray, pools: list[_Pool],
                     settings: AifSettings) -> tuple[np.ndarray, np.ndarray]:
    """(LV mask, RV mask) chosen from the pools' dynamics and shape alone (before the core)."""
    largest = max(pool.area for pool in pools)
    large = [pool for pool in pools if pool.area >= 0.25 * largest]
    # the RV is blood: among the large pools it enhances about as strongly as the LV; a large
    # lung or liver cluster that peaks early enhances far less (rest 2**30 + 6 with coil
    # compression: 90th-percentile pixel enhancement 0.28 against 0.76 for the ventricles)
    strongest = max(pool.enhancement for pool in large)
    major = [pool for pool in large if pool.enhancement >= settings.min_blood_enhancement_fraction * strongest]
    rv = min(major, key=lambda pool: (pool.peak_frame, -pool.area))
    rv_region = labels == rv.label
    lv_candidates = _lv_candidates(smooth, labels, rv, rv_region, pools, settings)
    # the LV must look like blood: a myocardial rim joined to the LV pool and split off by its later arrival
    # can be the largest late candidate (tests/test_aif.py); dropped unless no candidate looks like blood
    blood_like = [candidate for candidate in lv_candidates
                  if _mask_contrast(smooth, candidate[0], settings) >= settings.min_first_pass_contrast]
    lv_candidates = blood_like or lv_candidates
    if not lv_candidates:
        rv_mask, lv_mask, _ = _arrival_split(smooth, rv_region)
        return lv_mask, rv_mask
    # the LV: large and close to the RV (the aorta also peaks late but is smaller/farther)
    rv_centre = np.argwhere(rv_region).mean(axis=0)

    def score(candidate: tuple[np.ndarray, np.ndarray]) -> float:
        distance = np.linalg.norm(np.argwhere(candidate[0]).mean(axis=0) - rv_centre)
        return float(candidate[0].sum()) / (1.0 + distance / np.sqrt(largest))

    return max(lv_candidates, key=score)


def _lv_disc(shape: tuple[int, ...], hint_rc: tuple[float, float], radius_px: float | None,
             settings: AifSettings) -> np.ndarray:
    """Pixels within the LV radius plus ``hint_margin_px`` of the hint, bool [rows, cols]."""
    row, col = (float(v) for v in hint_rc)
    if not (np.isfinite(row) and np.isfinite(col)):
        raise AifError(f"the LV hint must be finite pixel coordinates, got {hint_rc}")
    if not (-0.5 <= row <= shape[0] - 0.5 and -0.5 <= col <= shape[1] - 0.5):
        raise AifError(f"the LV hint ({row:.1f}, {col:.1f}) lies outside the AIF image of {shape[0]} x {shape[1]} "
                       "pixels")
    radius = settings.hint_radius_px if radius_px is None else float(radius_px)
    if not radius > 0:
        raise AifError(f"the LV hint radius must be positive, got {radius_px}")
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    disc = np.hypot(rows - row, cols - col) <= radius + settings.hint_margin_px
    disc[min(int(round(row)), shape[0] - 1), min(int(round(col)), shape[1] - 1)] = True  # never empty
    return disc


def _hint_choice(smooth: np.ndarray, labels: np.ndarray, pools: list[_Pool],
                 chosen: tuple[np.ndarray, np.ndarray] | None, disc: np.ndarray, hint_rc: tuple[float, float],
                 settings: AifSettings) -> tuple[np.ndarray, np.ndarray, str]:
    """(LV mask, RV mask, source) with an LV hint: ``detect_aif`` steps 1-3."""
    no_rv = np.zeros_like(disc)
    if chosen is not None:
        lv_mask, rv_mask = chosen
        distance = float(np.linalg.norm(np.argwhere(lv_mask).mean(axis=0) - np.asarray(hint_rc, dtype=np.float64)))
        inside = lv_mask & disc
        if distance <= settings.hint_max_distance_px:
            if inside.sum() >= settings.min_pool_pixels:
                return inside, rv_mask & ~disc, AIF_SOURCE_POOLS_AT_HINT
            # centred on the LV but (almost) not in its disc: a pool around the LV (tissue or vessels that
            # enhance with it), not its blood. Noise-free simulated rest 2**30+788 kept such a 435-pixel pool
            # whole, and its core read the AIF at 0.44 of the blood peak (docs/mapping.md "Session 17")
            logger.warning("AIF: the dynamics-only LV choice is centred %.1f px from the CNN's LV but has only %d "
                           "pixels in its disc: taking the pool at the LV instead", distance, int(inside.sum()))
        else:
            logger.warning("AIF: the dynamics-only LV choice lies %.1f px from the CNN's LV (more than %.1f px): "
                           "taking the pool at the LV instead", distance, settings.hint_max_distance_px)
    overlaps = [(int(np.sum((labels == pool.label) & disc)), pool) for pool in pools]
    overlaps = [(count, pool) for count, pool in overlaps if count >= settings.min_pool_pixels]
    if overlaps:
        _, pool = max(overlaps, key=lambda entry: entry[0])
        region = (labels == pool.label) & disc
        early, late, separation = _arrival_split(smooth, region)
        if separation >= settings.min_split_frames and late.sum() >= settings.min_pool_pixels:
            contrast = _mask_contrast(smooth, late, settings)
            if contrast >= settings.min_first_pass_contrast:
                return late, early, AIF_SOURCE_POOL_AT_HINT  # the RV's blood reaches into the disc
            # the later part is the myocardium around the LV (it enhances late and stays up), not the LV
            # behind the RV: simulated rest 2**30+788, whose AIF read 0.2 of the blood peak
            logger.warning("AIF: the later-arriving part of the pool at the CNN's LV (%d pixels) peaks only %.1f x "
                           "its late level (blood: >= %.1f): myocardium, not LV blood; the pool is not split",
                           int(late.sum()), contrast, settings.min_first_pass_contrast)
        return region, no_rv, AIF_SOURCE_POOL_AT_HINT
    logger.warning("AIF: no enhancing blood pool at the CNN's LV: taking the most enhancing pixels of the LV disc")
    return _enhancing_core_of(smooth, disc, hint_rc), no_rv, AIF_SOURCE_HINT_REGION


def _mask_contrast(smooth: np.ndarray, mask: np.ndarray, settings: AifSettings) -> float:
    """:func:`first_pass_contrast` of the mean curve of ``mask`` (0 when it does not rise at all)."""
    try:
        return first_pass_contrast(smooth[:, mask].mean(axis=1), settings=settings)
    except AifError:
        return 0.0


def _enhancing_core_of(smooth: np.ndarray, region: np.ndarray, hint_rc: tuple[float, float]) -> np.ndarray:
    """The blood of a region that the pool criteria missed: its pixels enhancing by at least half its
    90th-percentile enhancement (myocardium and partial volume enhance far less than blood), the
    connected piece nearest the hint."""
    curves = smooth[:, region]
    enhancement = curves.max(axis=0) - np.percentile(curves, 10, axis=0)
    strong = np.zeros_like(region)
    strong[region] = enhancement >= 0.5 * np.percentile(enhancement, 90)
    pieces, count = ndi.label(strong)
    if count <= 1:
        return strong if strong.any() else region
    points = np.argwhere(strong)
    nearest = points[np.argmin(np.hypot(*(points - np.asarray(hint_rc, dtype=np.float64)).T))]
    return pieces == pieces[tuple(nearest)]


def _lv_candidates(smooth: np.ndarray, labels: np.ndarray, rv: _Pool, rv_region: np.ndarray, pools: list[_Pool],
                   settings: AifSettings) -> list[tuple[np.ndarray, np.ndarray]]:
    """Possible (LV mask, RV mask) pairs once the earliest major pool ``rv`` is known.

    - the earliest pool itself, when its pixels arrive in two groups at least
      ``min_split_frames`` apart: both ventricles merged into one pool (common at rest, where
      the RV-LV transit is long and the blurred septum joins the pools); LV = the later group;
    - every pool (not only the major ones: an RV pool merged with enhancing lung can be four
      times the LV, held-out rest 2**30 + 13) peaking ``min_peak_separation_frames`` to
      ``max_peak_separation_frames`` after it; such a pool may itself hold both ventricles (when
      the earliest pool was noise), then its later group is the LV.

    Candidates are compared by their pixels after these splits, so a late noise cluster (lung,
    body edge) whose pixels do not share one arrival time keeps only a few pixels and loses
    against a coherent pool (study seed 2**30 + 5 at rest: a 37-pixel lung cluster split to 5
    pixels against the 42-pixel LV split off the merged ventricles).
    """
    candidates: list[tuple[np.ndarray, np.ndarray]] = []
    early, late, separation = _arrival_split(smooth, rv_region)
    if separation >= settings.min_split_frames and min(early.sum(), late.sum()) >= settings.min_pool_pixels:
        candidates.append((late, early))
        # three arrival groups (RV, LV, late noisy lung / tissue pixels joined to the pool, rest
        # 2**30 + 6 with coil compression): the first split separates the late group and leaves
        # the LV with the RV; split that earlier part once more
        early_2, late_2, separation_2 = _arrival_split(smooth, early)
        if separation_2 >= settings.min_split_frames and \
                min(early_2.sum(), late_2.sum()) >= settings.min_pool_pixels:
            candidates.append((late_2, early_2))
    for pool in pools:
        if not (rv.peak_frame + settings.min_peak_separation_frames <= pool.peak_frame
                <= rv.peak_frame + settings.max_peak_separation_frames):
            continue
        lv_mask, rv_mask = labels == pool.label, rv_region
        early, late, separation = _arrival_split(smooth, lv_mask)
        if separation >= settings.min_split_frames and late.sum() >= settings.min_pool_pixels:
            lv_mask, rv_mask = late, early
        candidates.append((lv_mask, rv_mask))
    return candidates


def _pool_core(smooth: np.ndarray, mask: np.ndarray, fraction: float, min_pixels: int = 1) -> np.ndarray:
    """Pixels of ``mask`` enhancing by at least ``fraction`` of its 90th-percentile enhancement
    (drops the partial-volume rim of the pool); when that leaves fewer than ``min_pixels``, the
    ``min_pixels`` most enhancing pixels of the pool (all of it if smaller)."""
    if fraction <= 0 or mask.sum() < 8:
        return mask
    curves = smooth[:, mask]
    enhancement = curves.max(axis=0) - np.median(curves[: max(3, curves.shape[0] // 10)], axis=0)
    keep = enhancement >= fraction * np.percentile(enhancement, 90)
    if keep.sum() < min_pixels:
        keep = np.zeros_like(keep)
        keep[np.argsort(enhancement)[::-1][:min_pixels]] = True
    core = np.zeros_like(mask)
    core[mask] = keep
    return core if core.sum() >= 4 else mask


def _arrival_split(smooth: np.ndarray, region: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Split a pool by arrival time: (earlier part, later part = largest connected piece,
    separation of the two mean arrival times in frames).

    Arrival is the first frame at half the pixel's rise (more robust to noise than the peak).
    One pool holding both ventricles splits into the RV (earlier) and the LV (later).
    """
    curves = smooth[:, region]
    baseline = np.median(curves[: max(3, curves.shape[0] // 10)], axis=0)
    half = baseline + 0.5 * (curves.max(axis=0) - baseline)
    arrival = np.argmax(curves >= half, axis=0).astype(np.float64)
    # start from percentiles, not the extremes: one noisy late pixel must not be "the LV"
    early, late = np.percentile(arrival, 10), np.percentile(arrival, 90)
    if late == early:
        return np.zeros_like(region), region, 0.0
    for _ in range(10):  # two-means on the arrival time
        split = arrival >= 0.5 * (early + late)
        early = arrival[~split].mean() if np.any(~split) else early
        late = arrival[split].mean() if np.any(split) else late
    later = np.zeros_like(region)
    earlier = np.zeros_like(region)
    later[region] = split
    earlier[region] = ~split
    labels, count = ndi.label(later)
    if count > 1:
        sizes = ndi.sum(later, labels, index=range(1, count + 1))
        later = labels == (1 + int(np.argmax(sizes)))
    return earlier, later, float(late - early)


@dataclass(frozen=True)
class CrossFittedPool:
    """The LV blood of a pool from its purest pixels, chosen without reading the noise it averages.

    ``curve`` float64 [time]: frame t is the mean over ``chosen_on_odd`` for even t and over
    ``chosen_on_even`` for odd t (units of the frames given, magnitude floor removed when a zero
    level was given); ``chosen_on_even`` / ``chosen_on_odd`` bool [rows, cols]: the pool's purest
    pixels judged on the even / odd frames only.
    """

    curve: np.ndarray
    chosen_on_even: np.ndarray
    chosen_on_odd: np.ndarray

    @property
    def mask(self) -> np.ndarray:
        """Every pixel that enters the curve, bool [rows, cols]."""
        return self.chosen_on_even | self.chosen_on_odd


def purest_pixels(frames: np.ndarray, mask: np.ndarray, *, fraction: float = 0.8, min_pixels: int = 4) -> np.ndarray:
    """The pixels of a blood pool least mixed with tissue, judged on ``frames`` alone.

    A pixel holding a fraction f of blood and 1 - f of myocardium enhances by about f times the
    blood's first-pass enhancement (myocardium enhances ~10x less and later), so the pixels whose
    enhancement (largest frame minus the median of the first tenth, at least 3 frames) reaches
    ``fraction`` of the pool's largest are the purest. Fewer than ``min_pixels``: the ``min_pixels``
    most enhancing (all of the pool if smaller).

    Args:
        frames: [time, rows, cols] images (SR/PD ratio or Gd), unsmoothed.
        mask: bool [rows, cols] the pool.
        fraction: of the pool's largest enhancement, in (0, 1).
        min_pixels: fewest pixels kept.

    Returns:
        bool [rows, cols], a subset of ``mask``.
    """
    values = np.asarray(frames, dtype=np.float64)
    pool = np.asarray(mask, dtype=bool)
    if values.ndim != 3 or values.shape[1:] != pool.shape:
        raise AifError(f"frames must be [time, rows, cols] with rows, cols of the mask {pool.shape}, "
                       f"got {values.shape}")
    if not 0.0 < fraction < 1.0:
        raise AifError(f"fraction must lie in (0, 1), got {fraction}")
    if not pool.any():
        raise AifError("the AIF mask is empty")
    curves = values[:, pool]
    enhancement = curves.max(axis=0) - np.median(curves[: max(3, curves.shape[0] // 10)], axis=0)
    keep = enhancement >= fraction * enhancement.max()
    if keep.sum() < min_pixels:
        keep = np.zeros_like(keep)
        keep[np.argsort(enhancement)[::-1][:min_pixels]] = True
    chosen = np.zeros_like(pool)
    chosen[pool] = keep
    return chosen


def cross_fitted_pool_curve(frames: np.ndarray, mask: np.ndarray, *, baseline: slice, zero_level: float | None,
                            fraction: float = 0.8, min_pixels: int = 4) -> CrossFittedPool:
    """The pool's blood curve from its purest pixels, each frame averaged over pixels chosen on the
    OTHER frames (cross-fitting: the even frames choose the pixels for the odd ones and back).

    Why: in a small, blurred LV pool most pixels mix blood with myocardium and the pool mean reads
    the first-pass peak low (0.78 of the truth on a reference phantom study); keeping the pixels
    that enhance most fixes that, but if the same frames both choose and are averaged, the pixels
    whose noise happened to be high at the peak are chosen and the peak reads high (the "winner's
    curse": +2 to +4 % on the phantom's large pure pools). With disjoint frames a pixel's choice is
    independent of the noise of the frames it contributes to, so the mean is unbiased for noise
    that is independent between frames (acquired frames, not frames interpolated onto a grid).
    Noise shared by all of a pixel's frames (e.g. a per-pixel T2* factor) is not removed by this.
    docs/preprocessing.md, "AIF pool purity".

    Args:
        frames: [time, rows, cols] SR/PD ratio (or Gd) of the acquired frames, time >= 8.
        mask: bool [rows, cols] the pool.
        baseline: pre-bolus frames for the magnitude-floor estimate (:func:`magnitude_floor_corrected_curve`).
        zero_level: the frames' true pre-contrast value (ratio at Gd = 0); None: plain means, no floor.
        fraction, min_pixels: of :func:`purest_pixels`.

    Returns:
        :class:`CrossFittedPool`.
    """
    values = np.asarray(frames, dtype=np.float64)
    if values.ndim != 3 or values.shape[0] < 8:
        raise AifError(f"frames must be [time >= 8, rows, cols], got shape {values.shape}")
    on_even = purest_pixels(values[0::2], mask, fraction=fraction, min_pixels=min_pixels)
    on_odd = purest_pixels(values[1::2], mask, fraction=fraction, min_pixels=min_pixels)
    if zero_level is None:
        for_even, for_odd = values[:, on_odd].mean(axis=1), values[:, on_even].mean(axis=1)
    else:
        for_even = magnitude_floor_corrected_curve(values, on_odd, baseline, zero_level)
        for_odd = magnitude_floor_corrected_curve(values, on_even, baseline, zero_level)
    even = np.arange(values.shape[0]) % 2 == 0
    return CrossFittedPool(curve=np.where(even, for_even, for_odd), chosen_on_even=on_even, chosen_on_odd=on_odd)
