"""AIF extraction and pixel-wise flow mapping gadgets (thin adapters of toolbox.aif / btex / fermi).

- ``aif-extract``: AIF series (``AifSeries``, units ``gd_mmol_l`` or ``sr_over_pd``) ->
  ``AifCurve``: the LV blood pool is detected on the SR/PD ratio images inside the body (PD
  image), the MEAN LV ratio is converted to Gd with the blood look-up table of the header's AIF
  sequence (as QPerf does: per-pixel inversion of noisy blood pixels on the flat part of the
  table amplifies noise, and air pixels would dominate), resampled onto a uniform grid, the
  foot and peak are found and the pre-foot baseline subtracted. A Gd series is mapped back to
  the ratio through the same (monotonic) table first. The blood -> plasma hematocrit is the
  setting, or the client's measured value (JSON parameter ``{"hematocrit": 0.40}``, 0.2-0.7)
  for that connection; the value used travels in the ``AifCurve`` (and the report JSON).
  With ``lv_hint`` (default) and ``cnn-segmentation`` before it, the AIF series waits for the
  first ``SliceSegmentation`` with an LV centre: that centre, mapped to scanner coordinates
  with its slice's geometry and projected into the AIF image plane, and the radius of the CNN's
  LV blood pool tell ``detect_aif`` where the LV is (the pool there is taken; none: the core of
  the enhancing pixels there). Slices and segmentations pass on at once (flow-map holds the
  slices until the AIF arrives); no segmentation with an LV by the end of the stream (a chain
  without the CNN, or no LV found): the dynamics-only detection, as before.
- ``flow-map``: ``AifCurve`` + Gd slices (``SliceSeries``, units ``gd_mmol_l``) -> ``FlowMaps``
  per slice (and the ``AifCurve`` and ``SliceSegmentation`` passed on for the report). Slices
  that arrive before the AIF wait for it. With ``use_segmentation`` (default), a slice also waits for its
  ``SliceSegmentation`` (cnn-segmentation emits it right after the slice) and only the
  segmented myocardium dilated by ``heart_mask_px`` (``mask_labels``: add 1 and 3 for the
  whole heart) is fitted, NaN elsewhere; a slice whose segmentation never
  arrives (chain without cnn-segmentation) is mapped on the full field of view at the end.
  ``FlowMap.warm_up`` (called by the server's start-up warm-up) loads or builds the BTEX
  residue tables of the chain's time grid (temporal-resample ``interval_s``) before any scan.
- ``flow-map-images``: ``FlowMaps`` -> MBF / PS / Vp images and ``AifCurve`` -> the AIF mask
  image (DataRole AIFMASK), for chains that return maps without the AHA report.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import ismrmrd
import numpy as np
import scipy.ndimage as ndi
from pydantic import Field, model_validator

from perfline.core.gadget import Gadget, GadgetError, GadgetSettings, register_gadget
from perfline.gadgets.mrd_images import make_image
from perfline.gadgets.perfusion_items import (
    AifCurve, AifSeries, FlowMaps, ImageGeometry, SliceSegmentation, SliceSeries, image_point_mm, image_rc_of_point,
)
from perfline.toolbox import gd_conversion
from perfline.toolbox.aha_report import _myocardial_core
from perfline.toolbox.aif import (
    AIF_SOURCE_HINT_REGION, AifError, AifResult, AifSettings, aif_foot_peak, baseline_subtract, body_mask,
    cross_fitted_pool_curve, detect_aif, magnitude_floor_corrected_curve, pool_frame_noise_sd, sample_foot_time,
)
from perfline.toolbox.aif_partial_volume import (
    PartialVolumeWeights, partial_volume_corrected_curve, partial_volume_weights,
)
from perfline.toolbox.btex import (
    AifTable, BtexSettings, aif_on_fine_grid, blood_pool_curves, build_aif_table, fine_grid, fine_table_curves,
    map_btex, sampled_aif_table, spillover_reach, WARM_LENGTHS, tissue_sampling, warm_residue_tables,
)
from perfline.toolbox.fermi import map_fermi
from perfline.toolbox.rv_insertion import lv_equivalent_radius_mm
from perfline.toolbox.flow_fit import MappingInputError
from perfline.toolbox.flow_models import FlowModelError
from perfline.toolbox.noise_bias import SimexOptions
from perfline.toolbox.resample import resample_to_uniform


HEMATOCRIT_PARAMETER = "hematocrit"
HEMATOCRIT_LIMITS = (0.2, 0.7)


def hematocrit_from_parameters(parameters: dict[str, Any], default: float) -> float:
    """The client's measured hematocrit (JSON parameter ``hematocrit``, fraction 0.2-0.7), else ``default``.

    Raises:
        GadgetError: the parameter is not a number in the range (e.g. a percentage such as 42).
    """
    if HEMATOCRIT_PARAMETER not in parameters:
        return float(default)
    value = parameters[HEMATOCRIT_PARAMETER]
    low, high = HEMATOCRIT_LIMITS
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= float(value) <= high:
        raise GadgetError(f"aif-extract: the JSON parameter {HEMATOCRIT_PARAMETER!r} must be a fraction between "
                          f"{low} and {high} (e.g. 0.40), got {value!r}")
    return float(value)


class AifExtractSettings(GadgetSettings):
    hematocrit: float = Field(0.42, ge=0.0, lt=1.0, description=(
        "blood hematocrit for Cp = Cb / (1 - Hct); a client's JSON parameter 'hematocrit' (0.2-0.7) overrides it"))
    interval_s: float = Field(0.5, gt=0.0, description="uniform time grid of the AIF curve, s")
    gd_max_mmol_l: float = Field(40.0, gt=0.0, le=200.0,
                                 description="blood table range (same as gd-conversion's aif_gd_max_mmol_l)")
    lv_core_fraction: float = Field(0.9, ge=0.0, lt=1.0, description=(
        "LV pixels averaged: enhancement >= this fraction of the pool's 90th percentile (0: whole pool); "
        "the low-resolution LV pool is blurred, its rim underestimates the blood Gd"))
    lv_hint: bool = Field(True, description=(
        "wait for the first SliceSegmentation with an LV centre (cnn-segmentation before aif-extract) and take "
        "the AIF pool at that LV, projected into the AIF plane; none by the end of the stream: dynamics only"))
    continue_below_zero: bool = Field(True, description=(
        "convert the pool's SR/PD curve with the blood table continued linearly below Gd = 0 "
        "(gd_conversion.ratio_to_gd_continued_below_zero) instead of clipping at 0: the clip rectifies the "
        "noise of the pre-bolus frames, whose mean the baseline subtraction then takes off the whole curve "
        "(docs/mapping.md, 'The AIF baseline'; the default since its decision run: 48 dev scans, global mean "
        "abs error 9.57 -> 9.12 %); false: the clipped table of session 5"))
    lv_hint_max_distance_mm: float = Field(20.0, gt=0.0, description=(
        "the dynamics-only AIF pool is kept when its centre lies within this in-plane distance of the CNN's LV "
        "(aha-report's max_aif_lv_distance_mm flag)"))
    lv_pool_selection: Literal["core", "cross-fitted"] = Field("core", description=(
        "'core': the mean of the LV pool's core (lv_core_fraction); 'cross-fitted': of that pool, only the "
        "pixels enhancing >= lv_purity_fraction of its largest, chosen on the even acquired frames for the odd "
        "ones and back (toolbox.aif.cross_fitted_pool_curve: purer in small pools of mixed blood / myocardium "
        "pixels, without the upward bias of choosing pixels on the frames they are averaged on; docs/"
        "preprocessing.md, 'AIF pool purity'); without acquired frames the grid frames are split"))
    lv_purity_fraction: float = Field(0.8, gt=0.0, lt=1.0, description=(
        "cross-fitted: pixels kept enhance by at least this fraction of the pool's largest enhancement"))
    lv_partial_volume: bool = Field(False, description=(
        "'core' pool: correct the pool's partial volume (blood mixed with myocardium / papillary muscle in the "
        "5-6 mm AIF pixels of a small LV) by regressing each frame's pixel values on the pixels' first-pass "
        "enhancement and reading the line at the pool's purest pixels (toolbox.aif_partial_volume; applied "
        "only where the pool's enhancement spread exceeds noise; docs/preprocessing.md, 'AIF partial volume')"))
    lv_partial_volume_max_area_mm2: float = Field(300.0, gt=0.0, description=(
        "lv_partial_volume: only pools of at most this area (300 mm^2 = 9 pixels of 5.6 mm): a small LV, where the "
        "5-6 mm grid holds a handful of pure pixels. In larger pools the spread of the pixels' enhancement is gain "
        "(coil-shading and PD-normalisation residuals), not mixing, and the regression reads it as partial volume "
        "(area +5 to +20 % on 18 large dev pools, session 8)"))
    foot_from_samples: bool = Field(False, description=(
        "the bolus arrival from the acquired samples (toolbox.aif.sample_foot_time: the last upward crossing of 5 % "
        "of the peak before the samples' maximum, interpolated between samples) where the series kept them and it "
        "lies after the grid curve's foot; curve and samples are zero before it. The grid foot (3-frame smoothing, "
        "last frame within 5 %) sits 0.55 s (median) and up to 3 s before the true arrival, on a small pool's "
        "pre-bolus noise bumps (docs/preprocessing.md 'AIF foot from the acquired samples')"))
    foot_noise_sds: float = Field(0.0, ge=0.0, le=10.0, description=(
        "with foot_from_samples: pre-bolus samples up to this many times the samples' white-noise SD (median of the "
        "SDs of the samples before the peak, toolbox.aif.pool_frame_noise_sd through the blood table) count as "
        "baseline noise even above 5 % of the peak; the arrival is the 5 % crossing after the last of them "
        "(toolbox.aif.sample_foot_time's noise_level; 0: the plain 5 % crossing). Not on in any chain: at 3 it moved "
        "16 of 200 new arrivals later and read stress lower, global 5.93 -> 5.99 % on the same scans (docs/integration.md "
        "'Session 23')"))


@dataclass(frozen=True)
class LvHint:
    """Where the CNN found the LV: ``point_mm`` scanner coordinates (float64 [3]) of its centre,
    ``radius_mm`` the radius of a disc of its blood-pool area (None: no blood-pool pixels),
    ``slice_index`` the myocardial slice it comes from."""

    point_mm: np.ndarray
    radius_mm: float | None
    slice_index: int


def lv_hint_of(segmentation: SliceSegmentation, geometry: ImageGeometry) -> LvHint | None:
    """The CNN's LV of one slice in scanner coordinates, or None when it found no LV blood pool (an
    empty slice keeps the crop centre as its ``lv_center_rc``: a guess, not an LV)."""
    labels = np.asarray(segmentation.labels)
    if not all(math.isfinite(v) for v in segmentation.lv_center_rc) or not np.any(labels == 1):
        return None
    point = image_point_mm(geometry, labels.shape, *segmentation.lv_center_rc)
    return LvHint(point_mm=point, radius_mm=lv_equivalent_radius_mm(labels, geometry.pixel_spacing_mm),
                  slice_index=segmentation.slice_index)


def _require_aif_units(series: AifSeries) -> None:
    if series.units not in ("gd_mmol_l", "sr_over_pd"):
        raise GadgetError(f"aif-extract needs the AIF in units 'gd_mmol_l' or 'sr_over_pd', got units "
                          f"{series.units!r}: put surface-coil-correction (and gd-conversion) before it")


@register_gadget
class AifExtract(Gadget):
    """Find the LV blood pool in the AIF Gd series and emit the AIF curve; slices and their
    segmentations pass on (their LV centre guides the AIF pool, ``lv_hint``)."""

    name = "aif-extract"
    Settings = AifExtractSettings
    accepts = (AifSeries, SliceSeries, SliceSegmentation)
    produces = (AifCurve, SliceSeries, SliceSegmentation)
    settings: AifExtractSettings

    def process(self, items: Iterator[Any]) -> Iterator[Any]:
        self._hematocrit = hematocrit_from_parameters(self.context.parameters, self.settings.hematocrit)
        if self._hematocrit != self.settings.hematocrit:
            self.log.info("hematocrit %.3f from the client's parameters (setting %.3f)", self._hematocrit,
                          self.settings.hematocrit)
        waiting: list[AifSeries] = []  # AIF series held for the CNN's LV
        geometries: dict[int, ImageGeometry] = {}
        hint: LvHint | None = None
        for item in items:
            if isinstance(item, AifSeries):
                _require_aif_units(item)  # at once, not after the wait
                if self.settings.lv_hint and hint is None:
                    waiting.append(item)
                else:
                    yield self._extract(item, hint)
                continue
            yield item
            if isinstance(item, SliceSeries):
                geometries[item.slice_index] = item.geometry
            elif hint is None and self.settings.lv_hint and item.slice_index in geometries:
                hint = lv_hint_of(item, geometries[item.slice_index])
                if hint is not None:
                    for series in waiting:
                        yield self._extract(series, hint)
                    waiting.clear()
        for series in waiting:
            self.log.warning("no segmentation with an LV centre arrived: AIF pool chosen by its dynamics alone")
            yield self._extract(series, None)

    def _hint_rc(self, series: AifSeries, shape: tuple[int, int], hint: LvHint | None) -> tuple[float, float] | None:
        """The hint as (row, col) of the AIF image, None when it falls outside the image."""
        if hint is None:
            return None
        row, col = image_rc_of_point(series.geometry, shape, hint.point_mm)
        if not (-0.5 <= row <= shape[0] - 0.5 and -0.5 <= col <= shape[1] - 0.5):
            self.log.warning("the CNN's LV (slice %d) projects to (%.1f, %.1f), outside the %d x %d AIF image: "
                             "AIF pool chosen by its dynamics alone", hint.slice_index, row, col, *shape)
            return None
        return row, col

    def _extract(self, series: AifSeries, hint: LvHint | None) -> AifCurve:
        """The AIF curve of ``series`` (units checked on arrival by ``process``)."""
        table = None
        if self.context.header is not None:
            try:
                sequence = gd_conversion.sequence_from_header(self.context.header, gd_conversion.AIF_ENCODING)
            except gd_conversion.HeaderError as error:
                raise GadgetError(f"aif-extract: {error}") from error
            table = gd_conversion.lookup_table(sequence, "blood", float(self.settings.gd_max_mmol_l))
        elif series.units == "sr_over_pd":
            raise GadgetError("aif-extract needs the MRD XML header (AIF sequence) to convert the SR/PD AIF to Gd")
        else:
            self.log.warning("no MRD header: averaging the per-pixel Gd of the AIF series (no look-up table)")
        first = series.n_pd_frames
        frames = np.asarray(series.data[0, first:], dtype=np.float64)  # [time, rows, cols]
        # averaging happens on the ratio (linear in the signal); Gd maps back exactly (monotonic table)
        ratio = table.to_ratio(frames) if (table is not None and series.units == "gd_mmol_l") else frames
        time_s = np.asarray(series.time_s[first:], dtype=np.float64)
        body = body_mask(series.pd_image) if series.pd_image is not None else None
        row_mm, col_mm = series.geometry.pixel_spacing_mm
        pixel_mm = math.sqrt(row_mm * col_mm)
        settings = AifSettings(core_fraction=self.settings.lv_core_fraction,
                               hint_max_distance_px=self.settings.lv_hint_max_distance_mm / pixel_mm)
        hint_rc = self._hint_rc(series, frames.shape[1:], hint)
        radius_px = hint.radius_mm / pixel_mm if (hint_rc is not None and hint.radius_mm) else None
        try:
            detected = detect_aif(ratio, body=body, settings=settings, lv_hint_rc=hint_rc,
                                  lv_hint_radius_px=radius_px)
            mask = detected.mask
            pv: PartialVolumeWeights | None = None
            if self.settings.lv_pool_selection == "cross-fitted":
                blood, samples, mask = self._cross_fitted(series, table, ratio, time_s, detected.mask, detected.foot)
            else:
                pv = self._partial_volume(series, ratio, detected)
                zero = None if table is None else float(table.to_ratio(0.0))
                ratio_curve = _pool_curve(ratio, detected.mask, slice(1, detected.foot), zero, pv)
                blood = ratio_curve if table is None else self._to_gd(table, ratio_curve)
            blood = np.asarray(blood, dtype=np.float64)
            grid_s, blood = resample_to_uniform(blood, time_s, self.settings.interval_s)
            foot, peak = aif_foot_peak(blood)
            sample_sd = None
            if self.settings.lv_pool_selection != "cross-fitted":
                samples, sample_sd = self._acquired_curve(series, table, detected.mask, detected.foot, pv)
        except (AifError, ValueError) as error:
            raise GadgetError(f"aif-extract: {error}") from error
        subtracted = baseline_subtract(blood, foot)
        if samples is not None:  # the same baseline (of the grid curve) off the acquired samples
            samples = (samples[0], samples[1] - (blood - subtracted)[0])
        blood = subtracted
        foot_time_s = None
        if self.settings.foot_from_samples and samples is None:
            self.log.info("AIF: no acquired samples (no temporal-resample before): the foot stays the grid curve's")
        elif self.settings.foot_from_samples and samples is not None:
            try:
                noise_level = 0.0
                if self.settings.foot_noise_sds > 0 and sample_sd is not None:
                    noise_level = self.settings.foot_noise_sds * _pre_peak_noise_sd(samples[1], sample_sd)
                arrival = sample_foot_time(samples[0], samples[1], AifSettings().foot_fraction * float(blood[peak]),
                                           noise_level)
            except AifError as error:
                raise GadgetError(f"aif-extract: {error}") from error
            if grid_s[foot] < arrival < grid_s[peak]:
                foot_time_s = arrival
                blood = np.where(grid_s < arrival, 0.0, blood)
                samples = (samples[0], np.where(samples[0] < arrival, 0.0, samples[1]))
                foot = int(np.searchsorted(grid_s, arrival, side="right")) - 1
        if hint_rc is not None:
            self.log.info("AIF: CNN's LV of slice %d at (%.1f, %.1f) of the AIF image, radius %s px; pool: %s",
                          hint.slice_index, hint_rc[0], hint_rc[1],
                          f"{radius_px:.1f}" if radius_px is not None else "unknown", detected.source)
        if detected.source == AIF_SOURCE_HINT_REGION:
            self.log.warning("AIF from the CNN's LV region of the AIF image: no enhancing blood pool was found there")
        self.log.info("AIF: %d LV pixels, foot %.2f s, peak %.2f mmol/L at %.1f s, hematocrit %.3f",
                      int(mask.sum()), grid_s[foot] if foot_time_s is None else foot_time_s, blood[peak],
                      grid_s[peak], self._hematocrit)
        return AifCurve(time_s=grid_s, blood_gd_mmol_l=blood, hematocrit=self._hematocrit,
                        foot_index=foot, peak_index=peak, mask=mask, geometry=series.geometry,
                        source=detected.source, sample_time_s=None if samples is None else samples[0],
                        sample_blood_gd_mmol_l=None if samples is None else samples[1], foot_time_s=foot_time_s,
                        sample_noise_sd_mmol_l=sample_sd)

    def _cross_fitted(self, series: AifSeries, table: Any, ratio: np.ndarray, time_s: np.ndarray, pool: np.ndarray,
                      foot: int) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray] | None, np.ndarray]:
        """(blood Gd [time] on ``time_s``, acquired samples or None, pixels used) of the pool's purest pixels,
        cross-fitted on the acquired frames (``lv_pool_selection = 'cross-fitted'``). The grid curve is the
        acquired curve interpolated linearly in Gd, as temporal-resample interpolates the Gd frames."""
        zero = None if table is None else float(table.to_ratio(0.0))
        fraction = self.settings.lv_purity_fraction
        if series.acquired_time_s is None or series.acquired_data is None:
            # grid frames interpolated from the same acquisitions share their noise: a weaker split
            self.log.warning("AIF: no acquired frames (no temporal-resample): the purest pool pixels are "
                             "cross-fitted on the grid frames")
            chosen = cross_fitted_pool_curve(ratio, pool, baseline=slice(1, max(foot, 2)), zero_level=zero,
                                             fraction=fraction)
            blood = chosen.curve if table is None else self._to_gd(table, chosen.curve)
            return np.asarray(blood, dtype=np.float64), None, chosen.mask
        acquired_s = np.asarray(series.acquired_time_s, dtype=np.float64)
        frames = np.asarray(series.acquired_data, dtype=np.float64)[0, -acquired_s.size:]
        acquired_ratio = table.to_ratio(frames) if (table is not None and series.units == "gd_mmol_l") else frames
        # the floor's baseline frames: those acquired up to the grid curve's foot frame (as _acquired_curve)
        last = int(np.searchsorted(acquired_s, series.time_s[series.n_pd_frames + foot], side="right"))
        chosen = cross_fitted_pool_curve(acquired_ratio, pool, baseline=slice(1, max(last, 2)), zero_level=zero,
                                         fraction=fraction)
        acquired_blood = np.asarray(chosen.curve if table is None else self._to_gd(table, chosen.curve),
                                    dtype=np.float64)
        self.log.info("AIF: cross-fitted pool, %d / %d of %d pixels chosen on the even / odd acquired frames",
                      int(chosen.chosen_on_even.sum()), int(chosen.chosen_on_odd.sum()), int(pool.sum()))
        return np.interp(time_s, acquired_s, acquired_blood), (acquired_s, acquired_blood), chosen.mask

    def _partial_volume(self, series: AifSeries, ratio: np.ndarray, detected: AifResult) -> PartialVolumeWeights | None:
        """The pool's partial-volume weights (``lv_partial_volume``), None when off or not applicable."""
        if not self.settings.lv_partial_volume:
            return None
        pixels = int(detected.mask.sum())
        row_mm, col_mm = series.geometry.pixel_spacing_mm
        if pixels * row_mm * col_mm > self.settings.lv_partial_volume_max_area_mm2:
            self.log.info("AIF partial volume: not applied (pool of %d pixels, %.0f mm^2 > %.0f mm^2)", pixels,
                          pixels * row_mm * col_mm, self.settings.lv_partial_volume_max_area_mm2)
            return None
        if pixels < 4:
            self.log.info("AIF partial volume: pool of %d pixels, too few for the fit", pixels)
            return None
        foot, peak = detected.foot, detected.peak
        first_pass = slice(foot, min(ratio.shape[0], peak + max(peak - foot, 1) + 1))
        weights = partial_volume_weights(ratio, detected.mask, baseline=slice(1, max(foot, 3)), first_pass=first_pass)
        if not weights.applied:
            self.log.info("AIF partial volume: not applied (%s)", weights.reason)
            return None
        self.log.info("AIF partial volume: %d pixels, the purest enhance %.2fx the pool mean (%.1f SE): the first "
                      "pass is read at the purest pixels", weights.weights.size, weights.gain, weights.spread_snr)
        return weights

    def _to_gd(self, table: Any, ratio_curve: np.ndarray) -> np.ndarray:
        """Blood Gd (mmol/L) of the pool's SR/PD curve: the table, clipped at 0 or continued below it."""
        if self.settings.continue_below_zero:
            return gd_conversion.ratio_to_gd_continued_below_zero(ratio_curve, table)
        return np.asarray(table.to_gd(ratio_curve), dtype=np.float64)

    def _acquired_curve(self, series: AifSeries, table: Any, mask: np.ndarray, foot: int,
                        pv: PartialVolumeWeights | None = None
                        ) -> tuple[tuple[np.ndarray, np.ndarray] | None, np.ndarray | None]:
        """((acquisition times [frames], LV blood Gd [frames]), SD of each sample [frames]) of the series
        before resampling, from the same pixels and the same ratio / floor / (partial-volume weights) /
        table steps as the grid curve; (None, None) without acquired frames. The SD is the white frame
        noise (``toolbox.aif.pool_frame_noise_sd``, the floor's baseline frames) times the Gd table's slope
        at the sample; None without a table."""
        if series.acquired_time_s is None or series.acquired_data is None:
            return None, None
        time_s = np.asarray(series.acquired_time_s, dtype=np.float64)
        frames = np.asarray(series.acquired_data, dtype=np.float64)[0, -time_s.size:]
        if table is None:
            return (time_s, _pool_curve(frames, mask, slice(1, 2), None, pv)), None
        ratio = table.to_ratio(frames) if series.units == "gd_mmol_l" else frames
        # the floor's baseline frames: those acquired up to the grid curve's foot frame
        last = int(np.searchsorted(time_s, series.time_s[series.n_pd_frames + foot], side="right"))
        baseline, zero = slice(1, max(last, 2)), float(table.to_ratio(0.0))
        curve = _pool_curve(ratio, mask, baseline, zero, pv)
        sd_ratio = pool_frame_noise_sd(ratio, mask, baseline, zero, None if pv is None else pv.weights)
        step = 1e-3
        slope = (self._to_gd(table, curve + step) - self._to_gd(table, curve - step)) / (2.0 * step)
        return (time_s, self._to_gd(table, curve)), sd_ratio * np.abs(slope)


def _pre_peak_noise_sd(blood: np.ndarray, sample_sd: np.ndarray) -> float:
    """Median white-noise SD (mmol/L) of the acquired samples before the curve's maximum (all samples when the
    maximum is the first): the noise of the pre-bolus samples that the arrival level must stand clear of."""
    before = np.asarray(sample_sd, dtype=np.float64)[: max(int(np.argmax(blood)), 1)]
    return float(np.median(before))


def _pool_curve(frames: np.ndarray, mask: np.ndarray, baseline: slice, zero: float | None,
                pv: PartialVolumeWeights | None) -> np.ndarray:
    """The pool's curve [time] of ``frames`` [time, rows, cols]: with partial-volume weights their corrected
    curve, else the magnitude-floor-corrected mean (``zero``: the ratio at Gd = 0) or, without a table
    (``zero`` None), the plain mean."""
    if pv is not None:
        return partial_volume_corrected_curve(frames, mask, pv, baseline=baseline, zero_level=zero)
    if zero is None:
        return np.asarray(frames, dtype=np.float64)[:, mask].mean(axis=1)
    return magnitude_floor_corrected_curve(frames, mask, baseline, zero)


class FlowMapSettings(GadgetSettings):
    model: Literal["btex", "fermi"] = Field("btex", description="flow model")
    delay_smoothing_px: float = Field(1.5, ge=0.0, description="BTEX: Gaussian width of the delay pre-fit, px")
    delay_prior_sd_s: float = Field(0.25, gt=0.0, le=10.0, description=(
        "BTEX: SD of each pixel's delay prior at the pre-fit's delay, s (the smoothed fit reads the delay about "
        "0.25 s early, and a tight prior pulls noisy pixels there, to a lower flow, most at stress: docs/mapping.md, "
        "'The delay prior pulls stress flow down'; 0.5 s alone lost session 10's decision run; with perfusion-moco "
        "interpolation = 'cubic' it won session 13's, and 0.35 s won session 22's: the perfusion chains set "
        "0.35 s, docs/integration.md 'Session 13', 'Session 22')"))
    delay_prefit_erosion_px: int = Field(0, ge=0, le=3, description=(
        "BTEX: the delay pre-fit smooths and fits only the mask's pixels at least this far inside it; the "
        "others take their nearest core pixel's prior (0: every pixel, as before). The border pixels' blood "
        "partial volume otherwise puts the smoothed delay early (0.54 s on a phantom stress slice) and the prior "
        "pulls noisy pixels to a lower flow, the more the longer the tissue's delay: with TRUE inputs and white "
        "noise 100 stress scans read -3.7 -> +0.4 %; on the chain's own curves it lifts stress a little and rest "
        "by 1.4 points, a wash (docs/mapping.md 'Session 27')"))
    delay_prefit_erosion_shape: Literal["cross", "square"] = Field("cross", description=(
        "BTEX: how delay_prefit_erosion_px erodes the mask: through edge neighbours ('cross': a pixel touching "
        "the edge at a corner stays in the core) or all 8 neighbours ('square': the corner pixels next to the "
        "LV blood carry about 2.5 % blood and kept the pre-fit's delay 0.4-0.5 s early; docs/mapping.md "
        "'Session 28')"))
    vp_range: tuple[float, float] = Field((0.02, 0.32), description=(
        "BTEX Vp grid, ml/ml: wider than the tissue range so that blood partial volume near the endocardium "
        "(blood fraction b adds b (1 - Hct) to Vp) is fitted as Vp, not as flow"))
    vp_steps: int = Field(11, ge=3, le=40, description=(
        "BTEX Vp grid points (the perfusion chains: 21, 0.015 apart; the refinement interpolates the table "
        "between them and 11 made the fit read high on perfect inputs, docs/mapping.md 'Session 17'; "
        "session-21 decision run, docs/integration.md)"))
    visf_steps: int = Field(6, ge=3, le=40, description=(
        "BTEX Visf grid points over 0.1-0.475 ml/ml (QPerf's 6, 0.075 apart): the refinement interpolates the "
        "table between them; on 60 noise-free BTEX curves with the delay prior at the true delay 6 points read MBF "
        "+3.4 % (mean; up to +55 % where the refinement stops in another valley), 9 points +2.0 %, but on 24 others "
        "at Fp 2-4.5 the mean abs error was 3.2 % with 9 against 2.5 % with 6, and on 124 dev scans through the "
        "chain 9 changed nothing: not a cure (docs/mapping.md 'Session 28'). The residue tables are built for each "
        "grid on first use (minutes) and cached on disk"))
    prior_vp_sd: float = Field(0.1, gt=0.0, description="BTEX Vp prior SD (centre 0.07), ml/ml")
    coarse_stride: tuple[int, int, int, int, int] = Field((2, 2, 2, 1, 2), description=(
        "BTEX global search on every k-th grid point of (Fp, PS, Vp, Visf, delay): every Visf point (the "
        "toolbox default, every second, starts noisy rest pixels between Visf 0.1 / 0.25 / 0.4 and the "
        "refinement stays in a far basin: rest MBF +15 % with the TRUE AIF and tissue curves, "
        "docs/integration.md); the pixel fit then searches the one delay next to its smoothed-fit delay"))
    n_starts: int = Field(3, ge=1, le=16, description="BTEX: best entries of the global search refined per pixel")
    use_segmentation: bool = Field(True, description=(
        "wait for each slice's SliceSegmentation and fit only the dilated heart (off: full field of view)"))
    mask_labels: tuple[int, ...] = Field((2,), description=(
        "segmentation labels fitted (1 LV pool, 2 myocardium, 3 RV); the report needs the myocardium only and "
        "every extra pixel costs fit time"))
    aif_upsample: int = Field(1, ge=1, le=8, description=(
        "BTEX table: 1 = the AIF on the fit grid, linear between samples (hat weights); k > 1 = the AIF's "
        "acquired samples (AifCurve.sample_*) through a cubic spline on a k times finer grid, the convolution "
        "and delays there, and the table curves sampled at each slice's acquisition times and interpolated "
        "onto the grid as temporal-resample does (one table per slice; docs/mapping.md, 'The per-slice "
        "sampled table'); without acquired samples the grid AIF is used as for 1"))
    aif_smoothing: Literal["none", "gcv"] = Field("none", description=(
        "with aif_upsample > 1: 'none' = the cubic spline through the AIF's acquired samples; 'gcv' = a cubic "
        "smoothing spline whose smoothness generalised cross-validation chooses (btex.aif_on_fine_grid): the "
        "interpolating spline makes the tallest noisy sample of a small pool's first pass the AIF's peak (+2.4 % "
        "on 34 dev AIFs, docs/mapping.md 'Session 11'; adopted by the session-11 decision run); ignored where the "
        "AIF has no acquired samples (the grid AIF is used as is)"))
    spillover_labels: tuple[Literal[1, 3], ...] = Field((), description=(
        "BTEX: blood pools (1 LV, 3 RV) whose mean Gd curves in the same slice (CNN labels eroded by 1 px) "
        "enter every pixel's fit as nonnegative spill-over terms, tissue = BTEX + s_LV b_LV + s_RV b_RV "
        "(docs/mapping.md, 'Blood spill-over in the tissue curves'); () = off. Needs model 'btex' and "
        "use_segmentation"))
    spillover_reach_px: float = Field(0.0, ge=0.0, description=(
        "spill-over terms only in pixels within this distance (px) of their pool's label; 0 = everywhere"))
    simex_pairs: int = Field(0, ge=0, le=8, description=(
        "BTEX: correct each slice's MBF map for the pixel fit's noise bias by SIMEX (toolbox.noise_bias): the "
        "myocardial core (labels 2 eroded by 1 px, as the report summarises it) refitted with this many "
        "antithetic pairs of white noise of the slice's noise SD, the map divided by the ratio of the medians "
        "(clipped to 0.8-1.25; docs/mapping.md 'Session 15'); 0 = off. Needs use_segmentation. 1 in the perfusion "
        "chain since the session-31 decision run on the corrected simulator, with the AIF's blood R2* line "
        "(docs/integration.md 'Session 31'); on the old simulator's noisy AIF it had raised the mean abs error "
        "(docs/integration.md 'Session 15')"))
    simex_max_pixels: int | None = Field(None, ge=20, description=(
        "SIMEX: refit at most this many core pixels per slice, drawn at random (None: all)"))
    simex_min_aif_pixels: int = Field(0, ge=0, description=(
        "SIMEX only where the AIF was averaged over at least this many LV pool pixels (AifCurve.mask); below, no "
        "correction (logged; the report's mbf_noise_ratio is null). A small pool's AIF error scales the fitted "
        "flow, and where it reads low the flow is high, where the fit's noise bias is largest: the correction "
        "then lifts an over-read further (docs/integration.md 'Session 15'). 0: every scan"))
    heart_mask_px: int = Field(0, ge=0, le=64, description=(
        "dilation of the labelled region, pixels (0: the CNN myocardium exactly; dilating it mixes blood into "
        "the smoothed delay pre-fit of the border pixels: rest MBF +2 to +10 % on the demo phantom)"))

    @model_validator(mode="after")
    def _check_combinations(self) -> FlowMapSettings:
        if self.aif_smoothing != "none" and self.aif_upsample < 2:
            raise ValueError(f"aif_smoothing {self.aif_smoothing!r} smooths the AIF's acquired samples for the "
                             f"fine-grid table: it needs aif_upsample >= 2, found {self.aif_upsample}")
        # the spill-over terms are a BTEX fit option and their pools come from each slice's segmentation:
        # without either the setting would be ignored silently (or, without waiting for the segmentation,
        # apply to a slice or not depending on the order of the items)
        if self.spillover_labels and (self.model != "btex" or not self.use_segmentation):
            raise ValueError(f"spillover_labels {self.spillover_labels} need model 'btex' and use_segmentation "
                             f"true, found model {self.model!r} and use_segmentation {self.use_segmentation}")
        if self.simex_pairs and (self.model != "btex" or not self.use_segmentation):
            raise ValueError(f"simex_pairs {self.simex_pairs} needs model 'btex' and use_segmentation true (the "
                             f"ratio is taken on the myocardial core), found model {self.model!r} and "
                             f"use_segmentation {self.use_segmentation}")
        return self


@register_gadget
class FlowMap(Gadget):
    """Pixel-wise MBF (and PS, Vp, Visf, delay, fit RMSE) maps of each Gd slice."""

    name = "flow-map"
    Settings = FlowMapSettings
    accepts = (AifCurve, SliceSeries, SliceSegmentation)
    produces = (FlowMaps, AifCurve, SliceSegmentation)
    settings: FlowMapSettings

    def process(self, items: Iterator[Any]) -> Iterator[Any]:
        aif: AifCurve | None = None
        slices: dict[int, SliceSeries] = {}
        masks: dict[int, np.ndarray] = {}
        self._labels: dict[int, np.ndarray] = {}
        use_masks = self.settings.use_segmentation
        self._tables: dict[tuple[bytes, float], AifTable] = {}
        self._fine_curves: dict[tuple[bytes, bytes], np.ndarray] = {}
        self._warming: threading.Thread | None = None
        for item in items:
            if isinstance(item, AifCurve):
                aif = item
                self._start_warming(aif)
                yield item
            elif isinstance(item, SliceSegmentation):
                yield item
                if use_masks:
                    masks[item.slice_index] = self._heart_mask(item)
                self._labels[item.slice_index] = np.asarray(item.labels)
            else:
                slices[item.slice_index] = item
            if aif is None:
                continue
            for index in [i for i in slices if not use_masks or i in masks]:
                yield self._map(slices.pop(index), aif, masks.get(index))
        if slices and aif is None:
            raise GadgetError(f"flow-map received {len(slices)} slice(s) but no AIF curve: "
                              "the chain needs aif-extract before flow-map")
        for index in sorted(slices):
            self.log.warning("slice %d: no segmentation arrived, mapping the full field of view", index)
            yield self._map(slices[index], aif, None)

    @classmethod
    def warm_up(cls, settings: FlowMapSettings, chain: Any, stop: threading.Event | None = None) -> str | None:
        """Prepare what does not need the AIF: the BTEX residue tables of ``chain``'s time grid.

        The grid spacing is the ``interval_s`` of the chain's ``temporal-resample`` (none: nothing
        to warm, the grid is unknown). Returns a line for the log, or None if nothing was done.
        """
        if settings.model != "btex":
            return None
        intervals = [float(spec.settings.interval_s) for spec in getattr(chain, "gadgets", ())
                     if spec.gadget.name == "temporal-resample"]
        if not intervals:
            return None
        dt_s = intervals[-1]
        if settings.aif_upsample > 1:  # the fine grid's tables for the acquired-sample AIF
            dt_s /= settings.aif_upsample
            spent = warm_residue_tables(dt_s, _table_settings(settings), stop=stop,
                                        lengths=tuple(settings.aif_upsample * n for n in WARM_LENGTHS))
        else:
            spent = warm_residue_tables(dt_s, _table_settings(settings), stop=stop)
        return "BTEX residue tables " + ", ".join(f"{n} samples {s:.1f} s" for n, s in spent.items()) + \
            f" (dt {dt_s:g} s)"

    def _btex_settings(self) -> BtexSettings:
        return _btex_settings(self.settings)

    def _aif_table(self, plasma: np.ndarray, dt_s: float) -> AifTable:
        """The BTEX table of this plasma AIF, built once per scan (all slices share the grid)."""
        if self._warming is not None:
            self._warming.join()
            self._warming = None
        key = (plasma.tobytes(), round(dt_s, 6))
        if key not in self._tables:
            self._tables[key] = build_aif_table(plasma, dt_s, self._btex_settings())
        return self._tables[key]

    def _uses_samples(self, aif: AifCurve) -> bool:
        return (self.settings.model == "btex" and self.settings.aif_upsample > 1
                and aif.sample_time_s is not None and aif.sample_blood_gd_mmol_l is not None)

    def _fine_table_curves(self, aif: AifCurve, grid_s: np.ndarray) -> np.ndarray:
        """Zero-delay table curves of the AIF's acquired samples on the fine grid of ``grid_s`` (once per scan)."""
        key = (np.asarray(aif.sample_blood_gd_mmol_l).tobytes(), grid_s.tobytes())
        if key not in self._fine_curves:
            upsample = self.settings.aif_upsample
            plasma = aif_on_fine_grid(aif.sample_time_s, np.asarray(aif.sample_blood_gd_mmol_l) /
                                      (1.0 - aif.hematocrit), grid_s, upsample, smoothing=self.settings.aif_smoothing)
            # as on the grid: zero before the foot
            plasma[fine_grid(grid_s, upsample) < aif.arrival_time_s] = 0.0
            fine_dt = float(grid_s[1] - grid_s[0]) / upsample
            self._fine_curves[key] = fine_table_curves(plasma, fine_dt, self._btex_settings())
        return self._fine_curves[key]

    def _sampled_settings(self, dt_s: float) -> BtexSettings:
        """The BTEX settings with the sampled table: delay nodes on the fine grid's step (at most 0.25 s).

        The delay is a linear-interpolation shift on the fine grid, piecewise linear in the delay
        between multiples of the fine step; the refinement interpolates linearly between delay nodes,
        so nodes at that step make the delay axis exact (0.25 s nodes on a 0.125 s grid read Fp 3-3.5
        +3-4 % high on the table's own curves, docs/mapping.md)."""
        settings = self._btex_settings()
        fine_dt = dt_s / self.settings.aif_upsample
        step = fine_dt / max(1, math.ceil(fine_dt / settings.delay_step_s - 1e-9))  # the fine step, at most 0.25 s
        # the global search keeps its delay spacing (every second 0.25 s node: 0.5 s)
        stride = list(settings.coarse_stride)
        stride[4] = max(1, round(stride[4] * settings.delay_step_s / step))
        return settings.model_copy(update={"delay_step_s": step, "coarse_stride": tuple(stride)})

    def _sampled_table(self, aif: AifCurve, grid_s: np.ndarray, acquired_s: np.ndarray | None) -> AifTable:
        """The slice's table: the AIF's fine table curves sampled as the slice was. Not cached: each
        slice has its own acquisition times, so a table is used once (about 40 MiB at k = 4)."""
        if self._warming is not None:
            self._warming.join()
            self._warming = None
        upsample = self.settings.aif_upsample
        curves = self._fine_table_curves(aif, grid_s)
        sampling = tissue_sampling(grid_s, acquired_s, upsample)
        dt_s = float(grid_s[1] - grid_s[0])
        self.log.debug("sampled BTEX table (AIF upsampled %dx, %s acquisition times)", upsample,
                       "grid" if acquired_s is None else f"{np.size(acquired_s)}")
        return sampled_aif_table(curves, dt_s / upsample, sampling, self._sampled_settings(dt_s))

    def _start_warming(self, aif: AifCurve) -> None:
        """Build the BTEX table of the AIF's grid (with ``aif_upsample`` > 1: the fine table curves of its
        acquired samples) in the background while the slices are segmented."""
        if self.settings.model != "btex" or aif.time_s.size < 2:
            return
        grid_s = np.asarray(aif.time_s, dtype=np.float64)
        plasma = _plasma_on(grid_s, aif)
        dt_s = float(np.mean(np.diff(aif.time_s)))
        key = (plasma.tobytes(), round(dt_s, 6))

        def build() -> None:
            try:
                if self._uses_samples(aif):
                    self._fine_table_curves(aif, grid_s)
                else:
                    self._tables[key] = build_aif_table(plasma, dt_s, self._btex_settings())
            except (MappingInputError, FlowModelError, ValueError) as error:  # the slice fit reports it
                self.log.warning("BTEX table warm-up failed: %s", error)

        self._warming = threading.Thread(target=build, name="flow-map-table", daemon=True)
        self._warming.start()

    def _heart_mask(self, segmentation: SliceSegmentation) -> np.ndarray | None:
        heart = np.isin(np.asarray(segmentation.labels), self.settings.mask_labels)
        if not heart.any():
            self.log.warning("slice %d: empty segmentation, mapping the full field of view",
                             segmentation.slice_index)
            return None
        width = self.settings.heart_mask_px
        return ndi.binary_dilation(heart, iterations=width) if width else heart

    def _spillover_curves(self, slice_index: int, tissue: np.ndarray
                          ) -> tuple[np.ndarray, np.ndarray | None, tuple[int, ...]] | None:
        """The slice's blood-pool curves ``[K, time]`` (baseline-subtracted ``tissue`` ``[time, rows, cols]``)
        for the spill-over terms of the BTEX fit, where each acts (``[K, rows, cols]`` or None: everywhere)
        and the pool labels kept, or None (setting off, no segmentation of this slice, no pool big enough)."""
        labels = self._labels.get(slice_index)
        if not self.settings.spillover_labels:
            return None
        if labels is None:
            self.log.info("slice %d: no segmentation, no spill-over terms", slice_index)
            return None
        if labels.shape != tissue.shape[1:]:
            raise GadgetError(f"flow-map, slice {slice_index}: labels {labels.shape} differ from the image "
                              f"{tissue.shape[1:]}")
        curves, kept = blood_pool_curves(tissue, labels, self.settings.spillover_labels)
        if len(kept) < len(self.settings.spillover_labels):
            self.log.info("slice %d: spill-over pools %s of %s (the others absent or too small after erosion)",
                          slice_index, kept, self.settings.spillover_labels)
        if not kept:
            return None
        return curves, spillover_reach(labels, kept, self.settings.spillover_reach_px), kept

    def _map(self, series: SliceSeries, aif: AifCurve, mask: np.ndarray | None) -> FlowMaps:
        if series.units != "gd_mmol_l":
            raise GadgetError(f"flow-map needs Gd slices (units 'gd_mmol_l'), slice {series.slice_index} "
                              f"has units {series.units!r}")
        first = series.n_pd_frames
        tissue = np.asarray(series.data[first:], dtype=np.float64)
        time_s = np.asarray(series.time_s[first:], dtype=np.float64)
        steps = np.diff(time_s)
        if steps.size == 0 or np.ptp(steps) > 1e-3 * steps.mean():
            raise GadgetError(f"flow-map needs a uniform time grid (resample first); slice {series.slice_index} "
                              f"has steps {steps.min():.3f}-{steps.max():.3f} s")
        dt_s = float(steps.mean())
        plasma = _plasma_on(time_s, aif)
        before = time_s <= aif.time_s[aif.foot_index]
        if np.any(before):
            tissue = tissue - tissue[before].mean(axis=0)
        mapper = map_btex if self.settings.model == "btex" else map_fermi
        kwargs: dict[str, Any] = {}
        pools: tuple[int, ...] = ()
        if self.settings.model == "btex":
            kwargs["delay_smoothing_px"] = self.settings.delay_smoothing_px
            kwargs["delay_prior_sd_s"] = self.settings.delay_prior_sd_s
            kwargs["delay_prefit_erosion_px"] = self.settings.delay_prefit_erosion_px
            kwargs["delay_prefit_erosion_shape"] = self.settings.delay_prefit_erosion_shape
            kwargs["settings"] = self._btex_settings()
            if self._uses_samples(aif):
                kwargs["settings"] = self._sampled_settings(dt_s)
                kwargs["aif_table"] = self._sampled_table(aif, time_s, series.acquired_time_s)
            else:
                kwargs["aif_table"] = self._aif_table(plasma, dt_s)
            spillover = self._spillover_curves(series.slice_index, tissue)
            if spillover is not None:
                kwargs["spillover_curves"], kwargs["spillover_masks"], pools = spillover
            kwargs["simex"] = self._simex(series.slice_index, tissue.shape[1:], aif)
        if mask is not None:
            if mask.shape != tissue.shape[1:]:
                raise GadgetError(f"flow-map, slice {series.slice_index}: segmentation shape {mask.shape} differs "
                                  f"from the image shape {tissue.shape[1:]}")
            kwargs["mask"] = mask
        try:
            maps = mapper(tissue, plasma, dt_s, **kwargs)
        except (MappingInputError, FlowModelError) as error:
            raise GadgetError(f"flow-map, slice {series.slice_index}: {error}") from error
        if maps.spillover is not None:
            self._log_spillover(series.slice_index, pools, maps.spillover)
        if maps.noise_bias is not None:
            bias = maps.noise_bias
            self.log.info("slice %d: SIMEX noise-bias ratio %.3f on %d core pixels (%d pair(s), noise SD %.4f mmol/L), "
                          "MBF divided by %.3f", series.slice_index, bias.ratio, bias.n_pixels, bias.pairs,
                          bias.noise_sd_mmol_l, bias.applied)
        finite = maps.mbf_ml_min_g[np.isfinite(maps.mbf_ml_min_g)]
        self.log.info("slice %d: %s map, %d pixels, median MBF %.2f ml/min/g", series.slice_index,
                      self.settings.model, finite.size, float(np.median(finite)) if finite.size else float("nan"))
        return FlowMaps(slice_index=series.slice_index, model=self.settings.model, mbf_ml_min_g=maps.mbf_ml_min_g,
                        geometry=series.geometry, ps_ml_min_g=maps.ps_ml_min_g, vp=maps.vp, visf=maps.visf,
                        delay_s=maps.delay_s, fit_rmse_mmol_l=maps.fit_rmse,
                        mbf_noise_ratio=None if maps.noise_bias is None else maps.noise_bias.applied)

    def _simex(self, slice_index: int, shape: tuple[int, ...], aif: AifCurve | None = None) -> SimexOptions | None:
        """SIMEX options of a slice: its myocardial core, seeded by the slice index (None: off, no labels, or
        an AIF pool under ``simex_min_aif_pixels``)."""
        labels = self._labels.get(slice_index)
        if not self.settings.simex_pairs or labels is None or labels.shape != shape:
            return None
        pool = None if aif is None else int(np.count_nonzero(aif.mask))
        if pool is not None and pool < self.settings.simex_min_aif_pixels:
            self.log.info("slice %d: no SIMEX correction: the AIF pool has %d pixels (fewer than %d)", slice_index,
                          pool, self.settings.simex_min_aif_pixels)
            return None
        return simex_options(self.settings, labels, slice_index)

    def _log_spillover(self, slice_index: int, pools: tuple[int, ...], fractions: np.ndarray) -> None:
        """One line per slice: for each pool label, the share of fitted pixels with a positive fraction
        and the median fraction there (``fractions`` ``[K, rows, cols]``, NaN where not fitted)."""
        fitted = np.isfinite(fractions[0])
        if not np.any(fitted):
            self.log.info("slice %d: blood spill-over pools %s, no pixel fitted", slice_index, pools)
            return
        self.log.info("slice %d: blood spill-over %s", slice_index, "; ".join(
            f"pool label {label}: {100 * np.mean(f[fitted] > 0):.0f} % of the pixels, median fraction there "
            f"{float(np.median(f[f > 0])) if np.any(f > 0) else 0.0:.4f}" for label, f in zip(pools, fractions)))


def _table_settings(settings: FlowMapSettings) -> BtexSettings:
    """Grid and priors of flow-map's BTEX fit: what its tables depend on (the residue tables on the
    grid only, ``btex.residue_table``), so the warm-up prepares them with these."""
    return BtexSettings(vp_range=settings.vp_range, vp_steps=settings.vp_steps, visf_steps=settings.visf_steps,
                        prior_vp_sd=settings.prior_vp_sd)


def _btex_settings(settings: FlowMapSettings) -> BtexSettings:
    """The whole BTEX fit of flow-map: grid, priors and global search."""
    return _table_settings(settings).model_copy(update={"coarse_stride": settings.coarse_stride,
                                                        "n_starts": settings.n_starts})


def simex_options(settings: FlowMapSettings, labels: np.ndarray, slice_index: int) -> SimexOptions:
    """flow-map's SIMEX options for a slice with CNN ``labels`` [rows, cols]: the ratio on the myocardial core
    the report summarises (``aha_report._myocardial_core``, 1 px border), seeded by the slice index."""
    return SimexOptions(pairs=settings.simex_pairs, max_pixels=settings.simex_max_pixels, seed=slice_index,
                        pixels=_myocardial_core(np.asarray(labels) == 2, 1))


def _plasma_on(time_s: np.ndarray, aif: AifCurve) -> np.ndarray:
    """Plasma AIF (mmol/L) on a slice's time grid, zero before the bolus foot."""
    blood = np.interp(time_s, aif.time_s, aif.blood_gd_mmol_l)
    blood[time_s < aif.arrival_time_s] = 0.0
    return blood / (1.0 - aif.hematocrit)


class FlowMapImagesSettings(GadgetSettings):
    mbf_series_index: int = Field(20, ge=0, le=65535, description="image_series_index of the MBF maps (PS +1, Vp +2)")
    send_ps_vp: bool = Field(True, description="also send PS and Vp maps when the model fitted them")
    send_aif_mask: bool = Field(True, description="send the AIF LV mask (DataRole AIFMASK) on the AIF grid")
    aif_mask_series_index: int = Field(12, ge=0, le=65535, description="image_series_index of the AIF mask")


@register_gadget
class FlowMapImages(Gadget):
    """FlowMaps -> MRD images (DataRole Flow_Map, PS_Map, Vascular_Volume_Map); AifCurve -> AIFMASK image.

    For chains without the AHA report (``chains/perfusion-map.toml``); NaN (no fit) is sent as 0.
    """

    name = "flow-map-images"
    Settings = FlowMapImagesSettings
    accepts = (FlowMaps, AifCurve)
    produces = (ismrmrd.Image,)
    settings: FlowMapImagesSettings

    def process(self, items: Iterator[Any]) -> Iterator[ismrmrd.Image]:
        for item in items:
            if isinstance(item, AifCurve):
                if self.settings.send_aif_mask:
                    yield make_image(np.asarray(item.mask, dtype=np.uint8), item.geometry,
                                     series_index=self.settings.aif_mask_series_index, image_index=0, slice=0,
                                     data_role="AIFMASK", window=(0.5, 1.0), comment="AIF LV mask",
                                     seq_description="AIFMASK",
                                     meta={"PERFLINE_AIF_Peak_mmol_l": f"{float(item.blood_gd_mmol_l.max()):.3f}"})
                continue
            specs = [("Flow_Map", item.mbf_ml_min_g, "ml/min/g", (2.0, 4.0), 0)]
            if self.settings.send_ps_vp and item.ps_ml_min_g is not None and np.isfinite(item.ps_ml_min_g).any():
                specs.append(("PS_Map", item.ps_ml_min_g, "ml/min/g", (1.0, 2.0), 1))
            if self.settings.send_ps_vp and item.vp is not None and np.isfinite(item.vp).any():
                specs.append(("Vascular_Volume_Map", item.vp, "fraction", (0.1, 0.2), 2))
            for role, values, units, window, offset in specs:
                yield make_image(np.nan_to_num(np.asarray(values, dtype=np.float32), nan=0.0), item.geometry,
                                 series_index=self.settings.mbf_series_index + offset,
                                 image_index=item.slice_index, slice=item.slice_index, data_role=role, units=units,
                                 window=window, color_map="Perfusion.pal", comment=f"{role} {item.model}",
                                 seq_description=role)
