"""Perfusion preprocessing gadgets: reconstructed series -> Gd series on a 0.5 s grid.

Chain order (``chains/perfusion-gd.toml``)::

    perfusion-recon -> perfusion-moco -> aif-t2star -> surface-coil-correction
    -> gd-conversion -> temporal-resample -> perfusion-series-images

Each gadget is a thin adapter over ``perfline.toolbox`` (motion_correction, t2star,
surface_coil, gd_conversion, resample); it validates its input, names what is missing in its
errors (sent to the client as ERROR by the server) and records its name in ``stages``.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator
from typing import Any, Literal

import ismrmrd
import numpy as np
from pydantic import Field, model_validator

from perfline.core.gadget import Gadget, GadgetError, GadgetSettings, PureGadget, register_gadget
from perfline.gadgets.mrd_images import make_image
from perfline.gadgets.perfusion_items import AifSeries, SliceSeries
from perfline.toolbox import gd_conversion, image_warp, motion_correction, resample, surface_coil, t2star
from perfline.toolbox.interleaved_recon import single_threaded_blas

Series = SliceSeries | AifSeries

def _label(item: Series) -> str:
    return f"slice {item.slice_index}" if isinstance(item, SliceSeries) else "AIF series"


def _require_units(item: Series, units: str, gadget: str) -> None:
    if item.units != units:
        raise GadgetError(f"{gadget}: {_label(item)} holds {item.units!r}, expected {units!r} "
                          f"(stages so far: {', '.join(item.stages) or 'none'})")


def _require_finite(data: np.ndarray, item: Series, what: str) -> None:
    bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
    if bad:
        raise GadgetError(f"{_label(item)}: {what} contains {bad} NaN/infinite values")


class MotionCorrectionSettings(GadgetSettings):
    """Settings of ``perfusion-moco`` (see ``toolbox.motion_correction.motion_correct_series``)."""

    enabled: bool = Field(True, description="off: pass the series through unchanged")
    reference_passes: int = Field(2, ge=0, le=10, description="robust median-reference passes")
    kl_passes: int = Field(1, ge=0, le=10, description="KL synthetic-frame passes")
    n_components: int = Field(3, ge=1, le=20, description="KL components besides the mean")
    crop_fraction: float = Field(0.7, ge=0.1, le=1.0,
                                 description="central part of the FOV the field is estimated on")
    heart_window_px: float = Field(15.0, ge=0.0, le=100.0,
                                   description="sigma (pixels) of the heart region aligned by edge direction "
                                               "after the intensity passes; 0 = off; myocardial slices only")
    still_series_px: float = Field(0.35, ge=0.0, le=5.0,
                                   description="SR frames left untouched when the estimated heart motion "
                                               "(RMS over frames and heart pixels, pixels) is under it; 0 = off; "
                                               "myocardial slices only")
    correct_aif: bool = Field(True, description="also register the AIF series (echo 1 field on both echoes)")
    interpolation: Literal["linear", "cubic"] = Field("linear", description=(
        "resampling of the corrected frames: 'linear' (bilinear) or 'cubic' (cubic B-spline; bilinear resampling "
        "carries LV blood one pixel into the myocardium in every moved frame, docs/mapping.md 'Session 11'; "
        "'cubic' alone lost session 11's decision run; with flow-map delay_prior_sd_s = 0.5 it won session 13's and the "
        "perfusion chains set it, docs/integration.md 'Session 13'); the estimation passes "
        "always resample bilinearly"))


@register_gadget
class PerfusionMotionCorrection(PureGadget):
    """Non-rigid in-plane respiratory motion correction of every series."""

    name = "perfusion-moco"
    Settings = MotionCorrectionSettings
    accepts = (SliceSeries, AifSeries)
    produces = (SliceSeries, AifSeries)
    settings: MotionCorrectionSettings

    @classmethod
    def warm_up(cls, settings: MotionCorrectionSettings, chain: Any,
                stop: threading.Event | None = None) -> str | None:
        """Compile the warp loops at server start (or load them from numba's disk cache), not on the first scan."""
        if not settings.enabled:
            return None
        return f"motion-correction warp loops: {image_warp.warm_compiled_warp():.2f} s"

    def process_item(self, item: Series) -> Series:
        _require_units(item, "signal", self.name)
        if not self.settings.enabled or (isinstance(item, AifSeries) and not self.settings.correct_aif):
            return item
        # the heart window and the still-series threshold are sized for the myocardial slices'
        # pixels and their 0.5 px target; the AIF series (48 x 64 pixels of 5.6 mm) keeps the
        # intensity passes and the per-frame guard (neither was measured on it)
        aif = isinstance(item, AifSeries)
        order = 3 if self.settings.interpolation == "cubic" else 1
        options = dict(reference_passes=self.settings.reference_passes, kl_passes=self.settings.kl_passes,
                       n_components=self.settings.n_components, crop_fraction=self.settings.crop_fraction,
                       still_series_px=0.0 if aif else self.settings.still_series_px,
                       heart_window_px=0.0 if aif else self.settings.heart_window_px, output_order=order)
        started = time.perf_counter()
        series = item.data[0] if aif else item.data
        _require_finite(series, item, "image data")
        try:
            with single_threaded_blas():
                result = motion_correction.motion_correct_series(series, n_pd_frames=item.n_pd_frames, **options)
        except motion_correction.MotionCorrectionError as error:
            raise GadgetError(f"{_label(item)}: {error}") from error
        if aif:
            data = np.stack([result.corrected] + [motion_correction.warp_series(echo, result.displacement_px, order)
                                                  for echo in item.data[1:]])
        else:
            data = result.corrected
        self.log.info("%s: %s in %.2f s (estimated motion %.2f px RMS)", _label(item),
                      "still, left untouched" if result.still_series else "motion corrected",
                      time.perf_counter() - started, result.heart_motion_px)
        return dataclasses.replace(item, data=data, stages=item.stages + ("moco",))


class T2StarSettings(GadgetSettings):
    """Settings of ``aif-t2star``."""

    enabled: bool = Field(True, description="off: keep echo 1 uncorrected (to measure the error)")
    smoothing_px: int = Field(3, ge=0, le=15, description="box average of the echoes before the ratio")
    r2star_model: Literal["per-frame", "linear-in-gd", "blood-line"] = Field("per-frame", description=(
        "per-frame: each frame's R2* from its own echo ratio (clipped at 0); linear-in-gd: per pixel, "
        "R2* = R2*_0 + k Gd fitted over all frames (Gd from echo 1 and the blood table), less noise "
        "in the low-signal tail and no upward bias from the clip (docs/preprocessing.md); blood-line: one "
        "line R2* = R2*_0 + k Gd for the whole image, fitted on its blood pixels, each pixel at its own Gd "
        "(no box mixing the myocardium's R2* into a small LV; t2star.blood_line_r2star_per_s; where no "
        "blood line can be fitted, linear-in-gd with a warning)"))
    combine_echoes: bool = Field(False, description=(
        "linear-in-gd / blood-line: the AIF image is the inverse-variance weighted mean of both echoes "
        "extrapolated to TE = 0 with the fitted R2* (t2star.t2star_correct_gd_model), not echo 1 alone: less "
        "noise in the small LV pools whose AIF scatters most (docs/preprocessing.md, 'Both echoes for the AIF')"))
    blood_fraction: float = Field(0.5, gt=0.0, lt=1.0, description=(
        "blood-line: blood pixels' Gd rises by at least this fraction of the image's 99th-percentile rise"))
    blood_line_box_px: int = Field(3, ge=1, le=15, description=(
        "blood-line: box (pixels) of the class averages the line is fitted on (1: each pixel's own echoes); "
        "the average of blood pixels of different Gd lies above the line (the signal saturates), so a box "
        "steepens the fitted slope (docs/preprocessing.md)"))
    blood_line_regressor: Literal["class-box", "own"] = Field("class-box", description=(
        "blood-line: evaluate the fitted line at each pixel's class-averaged Gd (class-box) or at its own Gd, "
        "averaged over 3 frames in time and not in space (own: no pool interior carried onto its rim pixels; "
        "t2star.blood_line_r2star_per_s, docs/preprocessing.md)"))

    @model_validator(mode="after")
    def _check_combination(self) -> T2StarSettings:
        if self.combine_echoes and self.r2star_model == "per-frame":
            raise ValueError(f"combine_echoes extrapolates echo 2 with the fitted R2* model: it needs r2star_model "
                             f"'linear-in-gd' or 'blood-line', found {self.r2star_model!r}")
        return self


@register_gadget
class AifT2StarCorrection(PureGadget):
    """Dual-echo AIF -> T2*-corrected first echo, data [1, time, rows, cols]."""

    name = "aif-t2star"
    Settings = T2StarSettings
    accepts = (AifSeries,)
    produces = (AifSeries,)
    settings: T2StarSettings

    def process_item(self, item: AifSeries) -> AifSeries:
        _require_units(item, "signal", self.name)
        if item.data.ndim != 4 or item.data.shape[0] < 1:
            raise GadgetError(f"AIF series data must be [echo, time, rows, cols], found {item.data.shape}")
        _require_finite(item.data, item, "echo images")
        if not self.settings.enabled:
            return dataclasses.replace(item, data=item.data[:1], echo_times_ms=item.echo_times_ms[:1],
                                       stages=item.stages + ("no-t2star",))
        if item.data.shape[0] < 2 or len(item.echo_times_ms) < 2:
            raise GadgetError(f"AIF T2* correction needs two echoes, found {item.data.shape[0]} echo image "
                              f"series and echo times {item.echo_times_ms}")
        try:
            if self.settings.r2star_model in ("linear-in-gd", "blood-line"):
                corrected = self._correct_linear_in_gd(item)
            else:
                corrected = t2star.t2star_correct(item.data[0], item.data[1], item.echo_times_ms[0],
                                                  item.echo_times_ms[1], smoothing_px=self.settings.smoothing_px)
        except (t2star.EchoError, gd_conversion.HeaderError) as error:
            raise GadgetError(f"AIF series: {error}") from error
        return dataclasses.replace(item, data=corrected[None], echo_times_ms=(0.0,),
                                   stages=item.stages + ("t2star",))

    def _correct_linear_in_gd(self, item: AifSeries) -> np.ndarray:
        """The AIF at TE = 0 with R2* linear in Gd (the header's blood table): one line for the image's blood
        (``blood-line``) or a line per pixel on box-averaged echoes (``linear-in-gd``, also the fallback)."""
        if self.context.header is None:
            raise GadgetError(f"aif-t2star r2star_model = {self.settings.r2star_model!r} needs the MRD XML header "
                              f"(the AIF sequence's blood table); none was sent")
        sequence = gd_conversion.sequence_from_header(self.context.header, gd_conversion.AIF_ENCODING)
        table = gd_conversion.lookup_table(sequence, "blood", gd_conversion.AIF_GD_MAX_MMOL_L)
        echo1, echo2 = item.data[0], item.data[1]
        te1, te2 = item.echo_times_ms[0], item.echo_times_ms[1]

        def to_gd(ratio: np.ndarray) -> np.ndarray:
            return gd_conversion.ratio_to_gd_continued_below_zero(ratio, table)

        if self.settings.r2star_model == "blood-line":
            try:
                corrected, line = t2star.t2star_correct_blood_line(
                    echo1, echo2, te1, te2, item.n_pd_frames, to_gd, combine_echoes=self.settings.combine_echoes,
                    blood_fraction=self.settings.blood_fraction, regressor=self.settings.blood_line_regressor,
                    box_px=self.settings.blood_line_box_px)
            except t2star.EchoError as error:
                self.log.warning("AIF T2*: no blood R2* line (%s); R2* fitted per pixel on %d x %d boxes instead",
                                 error, self.settings.smoothing_px, self.settings.smoothing_px)
            else:
                self.log.info("AIF T2*: blood R2* = %.1f + %.2f Gd 1/s (%d blood pixels)", line.r2star_0_per_s,
                              line.slope_per_mmol_l, line.blood_pixels)
                return corrected
        return t2star.t2star_correct_gd_model(echo1, echo2, te1, te2, item.n_pd_frames, to_gd,
                                              smoothing_px=self.settings.smoothing_px,
                                              combine_echoes=self.settings.combine_echoes)


class SurfaceCoilSettings(GadgetSettings):
    """Settings of ``surface-coil-correction``."""

    box_size_px: int = Field(5, ge=1, le=31, description="PD smoothing neighbourhood, pixels (odd)")
    guided: bool = Field(True, description="edge-preserving PD smoothing guided by the mean SR image")
    guide_tolerance: float = Field(0.05, gt=0.0, le=10.0, description="guide difference scale (relative)")
    air_fraction: float = Field(0.05, ge=0.0, lt=1.0,
                                description="PD below this fraction of its 99th percentile is air: ratio 0")
    align_pd: bool = Field(False, description="translate the PD image onto the SR frames (edge direction over "
                                              "the heart) before the ratio; myocardial slices only")
    align_pd_window_px: float = Field(15.0, gt=0.0, le=100.0,
                                      description="sigma (pixels) of the heart window of the PD alignment")
    align_pd_min_px: float = Field(0.25, ge=0.0, le=5.0,
                                   description="PD alignment shifts shorter than this (pixels) are not applied")


@register_gadget
class SurfaceCoilCorrection(PureGadget):
    """SR frames / smooth PD map; drops the PD frames (``n_pd_frames`` -> 0, ``pd_image`` set)."""

    name = "surface-coil-correction"
    Settings = SurfaceCoilSettings
    accepts = (SliceSeries, AifSeries)
    produces = (SliceSeries, AifSeries)
    settings: SurfaceCoilSettings

    def process_item(self, item: Series) -> Series:
        _require_units(item, "signal", self.name)
        if isinstance(item, AifSeries):
            if item.data.shape[0] != 1:
                raise GadgetError(f"AIF series has {item.data.shape[0]} echoes; run aif-t2star first "
                                  f"(surface-coil correction takes one echo)")
            frames = item.data[0]
        else:
            frames = item.data
        n_pd = item.n_pd_frames
        if n_pd < 1:
            raise GadgetError(f"{_label(item)}: no PD frames (n_pd_frames = 0): the surface-coil map needs "
                              f"the proton-density frames at the start of the series")
        if frames.shape[0] < n_pd + 2:
            raise GadgetError(f"{_label(item)}: {frames.shape[0]} frames, need {n_pd} PD + at least 2 SR frames")
        _require_finite(frames, item, "image data")
        pd_image = frames[:n_pd].mean(axis=0)
        sr = frames[n_pd:]
        guide = sr.mean(axis=0) if self.settings.guided else None
        if self.settings.align_pd and isinstance(item, SliceSeries):
            pd_image = self._aligned_pd(item, pd_image, sr)
        try:
            coil_map = surface_coil.coil_map_from_pd(pd_image, box_size_px=self.settings.box_size_px,
                                                     guide=guide, guide_tolerance=self.settings.guide_tolerance)
            ratio = surface_coil.normalize_by_pd(sr, coil_map)
        except surface_coil.ProtonDensityError as error:
            raise GadgetError(f"{_label(item)}: {error}") from error
        # air and lung (no PD signal): the ratio is noise over noise, set it to 0 (no Gd)
        air = pd_image <= self.settings.air_fraction * float(np.percentile(pd_image, 99))
        ratio[:, air] = 0.0
        data = ratio[None] if isinstance(item, AifSeries) else ratio
        return dataclasses.replace(item, data=data, time_s=np.asarray(item.time_s)[n_pd:], units="sr_over_pd",
                                   n_pd_frames=0, pd_image=pd_image.astype(np.float32),
                                   stages=item.stages + ("surface-coil",))

    def _aligned_pd(self, item: SliceSeries, pd_image: np.ndarray, sr: np.ndarray) -> np.ndarray:
        """The PD image moved onto the SR frames (motion correction registers the PD frames only
        among themselves; a 1-2 px offset scales the study's Gd, docs/preprocessing.md)."""
        try:
            shift = surface_coil.pd_to_sr_translation(pd_image, sr, window_px=self.settings.align_pd_window_px)
        except surface_coil.ProtonDensityError as error:
            raise GadgetError(f"{_label(item)}: {error}") from error
        length = float(np.hypot(*shift))
        applied = length >= self.settings.align_pd_min_px
        self.log.info("%s: PD frames %.2f px (row %+.2f, col %+.2f) from the SR frames%s", _label(item), length,
                      shift[0], shift[1], ", moved onto them" if applied else ", left (under the minimum)")
        return surface_coil.translate_image(pd_image, shift) if applied else pd_image


class GdConversionSettings(GadgetSettings):
    """Settings of ``gd-conversion``."""

    myocardium_gd_max_mmol_l: float = Field(10.0, gt=0.0, le=100.0, description="myocardial table range")
    aif_gd_max_mmol_l: float = Field(40.0, gt=0.0, le=200.0, description="AIF (blood) table range")
    myocardium_continue_below_zero: bool = Field(
        False, description="myocardial series: ratios under the native ratio give Gd < 0 (table continued "
                           "linearly) instead of 0, so pre-bolus noise is not rectified; air stays 0")


@register_gadget
class GdConversion(PureGadget):
    """SR/PD -> Gd (mmol/L) with Bloch LUTs of the header's sequences (myocardium / blood)."""

    name = "gd-conversion"
    Settings = GdConversionSettings
    accepts = (SliceSeries, AifSeries)
    produces = (SliceSeries, AifSeries)
    settings: GdConversionSettings

    def process_item(self, item: Series) -> Series:
        _require_units(item, "sr_over_pd", self.name)
        if self.context.header is None:
            raise GadgetError("gd-conversion needs the MRD XML header (sequence parameters); none was sent")
        is_aif = isinstance(item, AifSeries)
        try:
            sequence = gd_conversion.sequence_from_header(
                self.context.header, gd_conversion.AIF_ENCODING if is_aif else gd_conversion.MYOCARDIAL_ENCODING)
            if is_aif:
                gd = gd_conversion.ratio_to_gd(item.data, sequence, tissue="blood",
                                               gd_max_mmol_l=self.settings.aif_gd_max_mmol_l)
            else:
                gd = gd_conversion.ratio_to_gd(item.data, sequence, tissue="myocardium",
                                               gd_max_mmol_l=self.settings.myocardium_gd_max_mmol_l,
                                               continue_below_zero=self.settings.myocardium_continue_below_zero)
        except (gd_conversion.HeaderError, ValueError) as error:
            raise GadgetError(f"{_label(item)}: {error}") from error
        return dataclasses.replace(item, data=gd, units="gd_mmol_l", stages=item.stages + ("gd",))


class ResampleSettings(GadgetSettings):
    """Settings of ``temporal-resample``."""

    interval_s: float = Field(0.5, gt=0.05, le=5.0, description="uniform grid spacing, seconds")
    stream: bool = Field(True, description="resample each series as it arrives when it carries the scan's "
                                           "common time span (set by perfusion-recon); False: wait for all")


@register_gadget
class TemporalResample(Gadget):
    """All Gd series onto ONE uniform grid (multiples of ``interval_s`` from the first R wave).

    The grid covers the time span common to all series (so the AIF and every slice share the
    same samples). When the series carry that span (``scan_time_span_s``, set by
    ``perfusion-recon`` from the acquisition times once the scan is in) each is resampled and
    passed on as it arrives, so segmentation and mapping of the first slices overlap the motion
    correction of the last (``stream``); otherwise every series is collected until the end of
    the scan and the AIF is emitted first. Both give the same grid.
    """

    name = "temporal-resample"
    Settings = ResampleSettings
    accepts = (SliceSeries, AifSeries)
    produces = (SliceSeries, AifSeries)
    settings: ResampleSettings

    def process(self, items: Iterator[Series]) -> Iterator[Series]:
        collected: list[Series] = []
        grid = None
        for item in items:
            _require_units(item, "gd_mmol_l", self.name)
            if item.n_pd_frames:
                raise GadgetError(f"{_label(item)}: PD frames still present; run surface-coil-correction first")
            try:
                resample.check_time_stamps(item.time_s, np.shape(item.data)[-3])
            except resample.TimeStampError as error:
                raise GadgetError(f"{_label(item)}: {error}") from error
            if grid is None and not collected and self.settings.stream and item.scan_time_span_s is not None:
                grid = self._grid(*item.scan_time_span_s)
            if grid is None:
                collected.append(item)
                continue
            yield self._resampled(item, grid)
        if not collected:
            return
        start = max(float(np.asarray(item.time_s)[0]) for item in collected)
        end = min(float(np.asarray(item.time_s)[-1]) for item in collected)
        grid = self._grid(start, end)
        collected.sort(key=lambda s: (isinstance(s, SliceSeries), getattr(s, "slice_index", -1)))
        for item in collected:
            yield self._resampled(item, grid)

    def _grid(self, start: float, end: float) -> np.ndarray:
        """Multiples of ``interval_s`` (s) inside the common span [start, end]."""
        interval = self.settings.interval_s
        first = np.ceil(start / interval - 1e-9) * interval
        if end - first < interval:
            raise GadgetError(f"the series share no time span of at least {interval} s "
                              f"(common span {start:.2f}-{end:.2f} s)")
        return first + interval * np.arange(int(np.floor((end - first) / interval + 1e-9)) + 1)

    def _resampled(self, item: Series, grid: np.ndarray) -> Series:
        try:
            if isinstance(item, AifSeries):
                data = resample.resample_series(item.data[0], item.time_s, grid)[None]
            else:
                data = resample.resample_series(item.data, item.time_s, grid)
        except ValueError as error:
            raise GadgetError(f"{_label(item)}: {error} (scan grid {grid[0]:.2f}-{grid[-1]:.2f} s)") from error
        # the acquisition times (and the AIF's acquired frames) go on: flow-map models the sampling
        acquired_time_s = np.asarray(item.time_s, dtype=np.float64).copy()
        if item.acquired_time_s is not None:
            acquired_time_s = item.acquired_time_s
        extra: dict[str, Any] = {"acquired_time_s": acquired_time_s}
        if isinstance(item, AifSeries) and item.acquired_data is None:
            extra["acquired_data"] = np.asarray(item.data)
        return dataclasses.replace(item, data=data, time_s=grid.copy(), stages=item.stages + ("resample",),
                                   **extra)


class SeriesImagesSettings(GadgetSettings):
    """Settings of ``perfusion-series-images``."""

    myocardium_series_index: int = Field(10, ge=0, le=65535, description="image_series_index of the slices")
    aif_series_index: int = Field(11, ge=0, le=65535, description="image_series_index of the AIF series")
    send_aif: bool = Field(True, description="also return the AIF series")
    forward: bool = Field(False, description="pass each series on after making its images (so later gadgets, "
                                             "e.g. mapping, still get it)")


_ROLES: dict[str, tuple[str, str | None]] = {"gd_mmol_l": ("Gd", "mmol/L"), "sr_over_pd": ("SR_over_PD", "1"),
                                             "signal": ("Image", None)}


@register_gadget
class PerfusionSeriesImages(PureGadget):
    """SliceSeries / AifSeries -> one ``ismrmrd.Image`` per frame (DataRole Gd / AIF, units in meta)."""

    name = "perfusion-series-images"
    Settings = SeriesImagesSettings
    accepts = (SliceSeries, AifSeries)
    produces = (ismrmrd.Image, SliceSeries, AifSeries)
    settings: SeriesImagesSettings

    @classmethod
    def output_types(cls, settings: GadgetSettings) -> tuple[type, ...]:
        assert isinstance(settings, SeriesImagesSettings)
        return cls.produces if settings.forward else (ismrmrd.Image,)

    def process_item(self, item: Series) -> list[ismrmrd.Image | Series]:
        role, units = _ROLES[item.units]
        is_aif = isinstance(item, AifSeries)
        if is_aif and not self.settings.send_aif:
            return [item] if self.settings.forward else []
        frames = item.data[0] if is_aif else item.data
        series_index = self.settings.aif_series_index if is_aif else self.settings.myocardium_series_index
        data_role: Literal["AIF"] | str = "AIF" if is_aif else role
        images = []
        for t, frame in enumerate(frames):
            meta = {"PERFLINE_Time_s": f"{float(item.time_s[t]):.4f}", "PERFLINE_Stages": ",".join(item.stages),
                    "PERFLINE_Quantity": role}
            images.append(make_image(
                np.ascontiguousarray(frame, dtype=np.float32), item.geometry, series_index=series_index,
                image_index=t, slice=0 if is_aif else item.slice_index, repetition=t, data_role=data_role,
                meta=meta, units=units, comment=f"{'AIF' if is_aif else 'slice ' + str(item.slice_index)} {role}",
                header_fields={"acquisition_time_stamp": int(round(float(item.time_s[t]) / 0.0025))}))
        return images + [item] if self.settings.forward else images
