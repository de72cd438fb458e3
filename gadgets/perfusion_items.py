"""Items exchanged by the perfusion gadgets (frozen dataclasses, numpy arrays inside).

Axis order is given per field; units are in the field names or documented. Conventions:
``docs/conventions.md``. Arrays are not copied by the dataclasses: producers must not modify an
array after emitting the item.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from perfline.toolbox.aif import first_pass_area_noise_pct

SeriesUnits = Literal["signal", "sr_over_pd", "gd_mmol_l"]


@dataclass(frozen=True)
class ImageGeometry:
    """Where an image series lies in the scanner (MRD ImageHeader conventions, mm).

    ``pixel_spacing_mm`` is (row spacing, column spacing) of the array grid.
    """

    field_of_view_mm: tuple[float, float, float]
    position: tuple[float, float, float] = (0.0, 0.0, 0.0)
    read_dir: tuple[float, float, float] = (1.0, 0.0, 0.0)
    phase_dir: tuple[float, float, float] = (0.0, 1.0, 0.0)
    slice_dir: tuple[float, float, float] = (0.0, 0.0, 1.0)
    patient_table_position: tuple[float, float, float] = (0.0, 0.0, 0.0)
    pixel_spacing_mm: tuple[float, float] = (1.0, 1.0)


def image_point_mm(geometry: ImageGeometry, shape: tuple[int, ...], row: float, col: float) -> np.ndarray:
    """Scanner coordinates (mm, float64 [3]) of the point at (row, col) of an image of ``shape`` [rows, cols].

    MRD convention: ``position`` is the centre of the image; columns run along ``read_dir``, rows
    along ``phase_dir``; pixel centres sit at (index - (n - 1) / 2) spacings from the centre.
    """
    row_mm, col_mm = geometry.pixel_spacing_mm
    return (np.asarray(geometry.position, dtype=np.float64)
            + (col - (shape[1] - 1) / 2.0) * col_mm * np.asarray(geometry.read_dir, dtype=np.float64)
            + (row - (shape[0] - 1) / 2.0) * row_mm * np.asarray(geometry.phase_dir, dtype=np.float64))


def image_rc_of_point(geometry: ImageGeometry, shape: tuple[int, ...], point_mm: np.ndarray) -> tuple[float, float]:
    """(row, col) in pixels of the orthogonal projection of a scanner point (mm [3]) into the
    plane of an image of ``shape`` [rows, cols]: the inverse of :func:`image_point_mm` in plane
    (the offset along the slice normal, e.g. the gap between parallel short-axis slices, drops)."""
    row_mm, col_mm = geometry.pixel_spacing_mm
    offset = np.asarray(point_mm, dtype=np.float64) - np.asarray(geometry.position, dtype=np.float64)
    read = np.asarray(geometry.read_dir, dtype=np.float64)
    phase = np.asarray(geometry.phase_dir, dtype=np.float64)
    col = float(np.dot(offset, read) / np.dot(read, read)) / col_mm + (shape[1] - 1) / 2.0
    row = float(np.dot(offset, phase) / np.dot(phase, phase)) / row_mm + (shape[0] - 1) / 2.0
    return row, col


@dataclass(frozen=True)
class SliceSeries:
    """One short-axis slice of the myocardial series.

    Attributes:
        slice_index: MRD slice index (0-based).
        data: float32 [time, rows, cols]; magnitude signal, SR/PD ratio, or Gd (see ``units``).
        time_s: float64 [time], acquisition time of each frame in seconds (first frame of the
            scan = reference chosen by the producer; resampled series use a uniform grid).
        units: what ``data`` holds.
        n_pd_frames: proton-density frames at the start of ``data`` (0 once removed).
        pd_image: float32 [rows, cols] mean PD image (surface-coil reference), or None.
        geometry: position of the slice.
        slice_position_mm: signed position along the slice normal (for basal/mid/apical order).
        stages: names of the processing steps applied so far (for the report and the meta).
        flags: human-readable problems of the acquisition found on the way (e.g. a scan that
            ended early); the segmentation passes them on to the report.
        acquired_time_s: float64 [frames] acquisition times (s) of the frames before
            ``temporal-resample`` put them on the uniform grid ``time_s`` (None: not resampled).
        scan_time_span_s: (start, end) in seconds, the span of SR-frame acquisition times common
            to every series of the scan (AIF and all slices; PD frames excluded), set by
            ``perfusion-recon`` once the whole scan is in, so that ``temporal-resample`` can put
            each series on the scan's grid as it arrives (None: unknown; it then waits for all).
            ``flow-map`` models the linear interpolation between them (docs/mapping.md).
    """

    slice_index: int
    data: np.ndarray
    time_s: np.ndarray
    units: SeriesUnits
    n_pd_frames: int
    geometry: ImageGeometry
    pd_image: np.ndarray | None = None
    slice_position_mm: float = 0.0
    stages: tuple[str, ...] = ()
    flags: tuple[str, ...] = ()
    acquired_time_s: np.ndarray | None = None
    scan_time_span_s: tuple[float, float] | None = None


@dataclass(frozen=True)
class AifSeries:
    """The dual-echo AIF image series (low resolution, one image per heartbeat).

    Attributes:
        data: float32 [echo, time, rows, cols] magnitude (echo 0 = TE1), or Gd
            [1, time, rows, cols] once converted (``units == "gd_mmol_l"``, T2*-corrected).
        time_s: float64 [time].
        echo_times_ms: TE of each echo.
        n_pd_frames: PD frames at the start of ``time``.
        acquired_time_s, acquired_data: float64 [frames] acquisition times (s) and float32
            [1, frames, rows, cols] Gd of the series before ``temporal-resample`` (None: not
            resampled); ``aif-extract`` takes the AIF at these times as well.
        scan_time_span_s: as :class:`SliceSeries`.
    """

    data: np.ndarray
    time_s: np.ndarray
    echo_times_ms: tuple[float, ...]
    units: SeriesUnits
    n_pd_frames: int
    geometry: ImageGeometry
    pd_image: np.ndarray | None = None
    stages: tuple[str, ...] = ()
    acquired_time_s: np.ndarray | None = None
    acquired_data: np.ndarray | None = None
    scan_time_span_s: tuple[float, float] | None = None


@dataclass(frozen=True)
class AifCurve:
    """The arterial input function found in the AIF series.

    Attributes:
        time_s: float64 [time] uniform grid (same grid as the resampled myocardial series).
        blood_gd_mmol_l: float64 [time] LV blood Gd, baseline subtracted.
        hematocrit: used for blood -> plasma (Cp = Cb / (1 - Hct)).
        foot_index, peak_index: bolus foot and peak on ``time_s``.
        mask: bool [rows, cols] LV blood-pool pixels on the AIF grid.
        source: how aif-extract chose those pixels (``toolbox.aif.AifResult.source``).
        sample_time_s, sample_blood_gd_mmol_l: float64 [frames] the same LV blood Gd (same
            pixels, same baseline subtracted) at the AIF's acquisition times, once per heartbeat,
            before resampling (None when the series came without them): ``flow-map`` interpolates
            them smoothly for its BTEX table (docs/mapping.md).
        foot_time_s: the bolus arrival (s) when aif-extract took it between grid frames (from the
            acquired samples; the curve and samples are zero before it), else None: the foot frame's time.
        sample_noise_sd_mmol_l: float64 [frames] SD of each acquired sample from the AIF images' white
            frame noise (``toolbox.aif.pool_frame_noise_sd`` through the Gd table), or None.
    """

    time_s: np.ndarray
    blood_gd_mmol_l: np.ndarray
    hematocrit: float
    foot_index: int
    peak_index: int
    mask: np.ndarray
    geometry: ImageGeometry
    source: str = "pools"
    sample_time_s: np.ndarray | None = None
    sample_blood_gd_mmol_l: np.ndarray | None = None
    foot_time_s: float | None = None
    sample_noise_sd_mmol_l: np.ndarray | None = None

    @property
    def arrival_time_s(self) -> float:
        """The bolus arrival (s): ``foot_time_s`` when set, else the foot frame's time."""
        return float(self.time_s[self.foot_index]) if self.foot_time_s is None else float(self.foot_time_s)

    @property
    def plasma_gd_mmol_l(self) -> np.ndarray:
        return self.blood_gd_mmol_l / (1.0 - self.hematocrit)

    @property
    def first_pass_frame_noise_pct(self) -> float | None:
        """Relative SD (%) of the first-pass area of the acquired samples from their white frame noise
        (``toolbox.aif.first_pass_area_noise_pct``); None without samples or their noise."""
        if self.sample_time_s is None or self.sample_blood_gd_mmol_l is None or self.sample_noise_sd_mmol_l is None:
            return None
        value = first_pass_area_noise_pct(self.sample_time_s, self.sample_blood_gd_mmol_l,
                                          self.sample_noise_sd_mmol_l, self.arrival_time_s)
        return None if math.isnan(value) else value


@dataclass(frozen=True)
class FlowMaps:
    """Pixel-wise perfusion maps of one slice, float32 [rows, cols], NaN where no fit.

    ``mbf_ml_min_g`` is myocardial blood flow; ``ps_ml_min_g`` permeability-surface product;
    ``vp`` and ``visf`` plasma and interstitial volume fractions (BTEX only, NaN for Fermi);
    ``fit_rmse_mmol_l`` the root-mean-square residual of the fit; ``mbf_noise_ratio`` the SIMEX
    ratio the MBF map was divided by (flow-map ``simex_pairs``; None: no correction).
    """

    slice_index: int
    model: Literal["btex", "fermi"]
    mbf_ml_min_g: np.ndarray
    geometry: ImageGeometry
    ps_ml_min_g: np.ndarray | None = None
    vp: np.ndarray | None = None
    visf: np.ndarray | None = None
    delay_s: np.ndarray | None = None
    fit_rmse_mmol_l: np.ndarray | None = None
    # SIMEX noise-bias ratio the MBF map was divided by (flow-map simex_pairs > 0), else None
    mbf_noise_ratio: float | None = None


@dataclass(frozen=True)
class SliceSegmentation:
    """CNN segmentation of one slice on the slice's own grid.

    Attributes:
        labels: uint8 [rows, cols]: 0 background, 1 LV blood pool, 2 myocardium, 3 RV.
        rv_insertion_deg: anterior RV insertion (docs/conventions.md), NaN if no RV found.
        lv_center_rc: LV centre (row, col) in pixels.
        flags: human-readable problems ("no RV found", "open myocardial ring", ...).
    """

    slice_index: int
    labels: np.ndarray
    rv_insertion_deg: float
    lv_center_rc: tuple[float, float]
    flags: tuple[str, ...] = field(default_factory=tuple)
