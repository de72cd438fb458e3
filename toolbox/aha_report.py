"""AHA 16-segment perfusion report: per-sector, per-territory and global MBF with quality flags.

From per-slice flow maps, CNN labels, the LV centre and the anterior RV insertion angle, every
myocardial pixel gets its AHA segment (``perfline.toolbox.aha``, Cerqueira et al., Circulation
2002;105:539), and MBF (and PS, Vp) is summarised per segment as the mean and median over
myocardial pixels, as in Xue et al., Radiology: AI 2020 (Figure 3), leaving out by default the
pixels on the endo/epicardial border (``border_exclusion_px``: their blood partial volume
drives the pixel-wise fit to the top of its flow range) and the pixels whose fit sits at the
top of its grid (``exclude_fit_limit``: no estimate); a slice with most of its pixels at that
limit fails (the "myocardium" is not perfused tissue: segmentation off the heart). The report is a pydantic
model serialised to JSON; its schema is documented in ``docs/report_schema.md``.

Slice levels come from the order of the slices along the slice normal (``assign_slice_levels``):
by default the **lowest** position along the normal is taken as basal (the normal points from the
base towards the apex); ``basal_at="highest"`` flips this.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Literal

import numpy as np
import scipy.ndimage as ndi
from pydantic import BaseModel, ConfigDict, Field

from perfline.toolbox.aha import LEVELS, SEGMENT_NAMES, TERRITORIES, SliceLevel, aha_segment_map, pixel_angles_deg, territory_of
from perfline.toolbox.rv_insertion import LV_BLOOD, InsertionNotFoundError, PlacementSettings, SliceRv, place_insertions, rv_arc

logger = logging.getLogger(__name__)

# 1.1: global_values.mbf_ml_min_g, reserve from segment medians
# 1.2: slices[].rv_insertion_own_deg and rv_insertion_source (cross-slice RV insertion placement)
# 1.3: slices[].mbf_noise_ratio (flow-map's SIMEX noise-bias correction)
# 1.4: aif.first_pass_frame_noise_pct and its flag
# 1.5: slices[].fit_limit_fraction (the share of analysed pixels at the flow grid's top, left out)
REPORT_SCHEMA_VERSION = "1.5"
MYOCARDIUM_LABEL = 2
SEGMENTS_OF_LEVEL: dict[str, tuple[int, ...]] = {
    "basal": tuple(range(1, 7)), "mid": tuple(range(7, 13)), "apical": tuple(range(13, 17)),
}
ScanKind = Literal["stress", "rest", "unknown"]


class ReportInputError(ValueError):
    """Inputs to the report do not have the expected shapes or values."""


class ReportSettings(BaseModel):
    """Thresholds for the report's quality flags."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_sector_pixels: int = Field(10, ge=1, description="a sector with fewer myocardial pixels is flagged 'few pixels'")
    min_wall_thickness_mm: float = Field(3.0, gt=0, description="a sector whose mean wall thickness is below is flagged 'thin wall'")
    max_missing_fit_fraction: float = Field(0.5, ge=0, le=1, description="a sector with more NaN MBF pixels than this fraction is flagged")
    basal_at: Literal["lowest", "highest"] = Field("lowest", description="which end of the slice-normal order is basal")
    border_exclusion_px: int = Field(1, ge=0, le=5, description=(
        "MBF statistics leave out myocardial pixels within this many pixels of the endo/epicardial border "
        "(blood partial volume makes their pixel-wise fit unreliable); a sector keeps all its pixels when "
        "fewer than 3 would remain"))
    lv_corner_exclusion: bool = Field(False, description=(
        "with border_exclusion_px = k > 0, also leave out myocardial pixels within k pixels of the LV blood pool "
        "through a corner (all 8 neighbours): the border ring keeps the pixels that touch the pool diagonally, "
        "and their curves carry about 2.5 % LV blood, 10 times the tissue's Gd during the first pass "
        "(docs/mapping.md 'Session 28')"))
    fit_limit_mbf_ml_min_g: float = Field(5.9, gt=0, description=(
        "pixels with MBF at or above this value sit at the top of the flow fit's grid (BTEX: 6.0 ml/min/g)"))
    exclude_fit_limit: bool = Field(True, description=(
        "MBF statistics leave out pixels at the fit limit: a fit on the top of its search grid has no estimate "
        "(the optimum lies outside the grid); they count as pixels without a fit"))
    max_fit_limit_fraction: float = Field(0.5, gt=0, le=1, description=(
        "a slice with more of its analysed myocardial pixels at the fit limit fails: the segmented 'myocardium' "
        "does not behave like perfused tissue (segmentation off the myocardium, or no usable enhancement), or "
        "every MBF reads high (an AIF that reads low: held-out stress 2**30+819, a 9-pixel pool at 81 % of the "
        "blood peak, failed its basal and mid slices)"))


# the start of the flag of a slice that fails because most of its myocardium sits at the fit limit
FIT_LIMIT_FAILURE = "MBF at the fit limit"


# ----------------------------------------------------------------------------------- the model
class StudyInfo(BaseModel):
    """Who and what was scanned (from the MRD header and client parameters)."""

    model_config = ConfigDict(extra="forbid")

    patient_id: str = ""
    study_id: str = ""
    scan: ScanKind = "unknown"
    field_strength_t: float | None = None
    created_utc: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))


class SegmentValues(BaseModel):
    """Summary of one AHA segment; values are None when the segment was not measured."""

    model_config = ConfigDict(extra="forbid")

    segment: int = Field(ge=1, le=16)
    name: str
    territory: Literal["LAD", "RCA", "LCx"]
    level: SliceLevel
    slice_indices: list[int] = Field(default_factory=list, description="MRD slices contributing pixels")
    n_pixels: int = 0
    mbf_mean_ml_min_g: float | None = None
    mbf_median_ml_min_g: float | None = None
    mbf_sd_ml_min_g: float | None = None
    ps_mean_ml_min_g: float | None = None
    vp_mean: float | None = None
    wall_thickness_mm: float | None = None
    flags: list[str] = Field(default_factory=list)


class TerritoryValues(BaseModel):
    """Pixel-pooled summary of one coronary territory."""

    model_config = ConfigDict(extra="forbid")

    territory: Literal["LAD", "RCA", "LCx"]
    segments: list[int]
    n_pixels: int = 0
    mbf_mean_ml_min_g: float | None = None
    mbf_median_ml_min_g: float | None = None


class SliceSummary(BaseModel):
    """One imaged slice: its level, geometry of the sectors and global values."""

    model_config = ConfigDict(extra="forbid")

    slice_index: int
    level: SliceLevel
    slice_position_mm: float
    rv_insertion_deg: float | None = Field(description="anterior RV insertion the sectors start from, degrees")
    rv_insertion_own_deg: float | None = Field(None, description=(
        "the slice's own anterior RV insertion before the cross-slice check (None: no RV found)"))
    rv_insertion_source: Literal["own", "other slices", "mean of slices", "none", "given"] = Field(
        "given", description="where rv_insertion_deg comes from: the slice's own RV arc, the other slices "
                             "(own disagreed or missing), the mean of disagreeing basal / mid slices, none, "
                             "or given as is by the segmentation (no cross-slice placement)")
    lv_center_rc: tuple[float, float] | None
    n_myocardium_pixels: int
    mbf_mean_ml_min_g: float | None = None
    mbf_median_ml_min_g: float | None = None
    mbf_noise_ratio: float | None = Field(None, description=(
        "SIMEX noise-bias ratio the slice's MBF map was divided by (flow-map simex_pairs); None: no correction"))
    fit_limit_fraction: float | None = Field(None, description=(
        "share (0-1) of the slice's analysed myocardial pixels with a finite MBF whose fit sits at the top of its "
        "grid (fit_limit_mbf_ml_min_g); with exclude_fit_limit the statistics leave them out; None: no finite MBF"))
    failed: bool = False
    flags: list[str] = Field(default_factory=list)


class GlobalValues(BaseModel):
    """Global values of all usable slices.

    ``mbf_ml_min_g`` is the headline global MBF (the value validated against the simulator's
    truth, docs/integration.md): the pixel-weighted mean of the 16 segment medians. It estimates
    the mean MBF of the myocardium; the pixel median (``mbf_median_ml_min_g``) does not when a
    defect makes the distribution bimodal, and the pixel mean (``mbf_mean_ml_min_g``) is moved by
    single noisy fits. Mean and median over all pooled pixels are kept for reference.
    """

    model_config = ConfigDict(extra="forbid")

    n_pixels: int = 0
    mbf_ml_min_g: float | None = Field(None, description="global MBF: pixel-weighted mean of the segment "
                                                         "medians, ml/min/g")
    mbf_mean_ml_min_g: float | None = None
    mbf_median_ml_min_g: float | None = None
    ps_mean_ml_min_g: float | None = None
    vp_mean: float | None = None


class ReserveSegment(BaseModel):
    """Myocardial perfusion reserve of one segment: MPR = stress MBF / rest MBF (segment medians,
    the values of the bull's-eye)."""

    model_config = ConfigDict(extra="forbid")

    segment: int = Field(ge=1, le=16)
    territory: Literal["LAD", "RCA", "LCx"]
    stress_mbf_ml_min_g: float | None
    rest_mbf_ml_min_g: float | None
    mpr: float | None


class ReserveReport(BaseModel):
    """Perfusion reserve from a stress and a rest report of the same patient."""

    model_config = ConfigDict(extra="forbid")

    stress_study_id: str
    rest_study_id: str
    stress_created_utc: str
    rest_created_utc: str
    segments: list[ReserveSegment]
    stress_global_mbf_ml_min_g: float | None
    rest_global_mbf_ml_min_g: float | None
    global_mpr: float | None


class AifSummary(BaseModel):
    """The arterial input function the maps were fitted with (blood Gd, baseline subtracted)."""

    model_config = ConfigDict(extra="forbid")

    peak_gd_mmol_l: float
    foot_time_s: float
    peak_time_s: float
    hematocrit: float
    n_pixels: int | None = None  # LV blood-pool pixels averaged for the AIF
    # relative SD (%) of the first-pass area from the AIF images' white frame noise (AifCurve.first_pass_frame_noise_pct)
    first_pass_frame_noise_pct: float | None = None


class PerfusionReport(BaseModel):
    """The AHA 16-segment perfusion report of one scan (stress or rest)."""

    model_config = ConfigDict(extra="forbid")

    schema_version: str = REPORT_SCHEMA_VERSION
    study: StudyInfo
    flow_model: str = ""
    aif: AifSummary | None = None
    slices: list[SliceSummary]
    segments: list[SegmentValues] = Field(description="always 16 entries, segment 1..16")
    territories: list[TerritoryValues]
    global_values: GlobalValues
    missing_levels: list[SliceLevel] = Field(default_factory=list)
    flags: list[str] = Field(default_factory=list, description="report-level problems")
    partial: bool = Field(False, description="true when any level, slice or segment is missing")
    reserve: ReserveReport | None = None

    def segment(self, number: int) -> SegmentValues:
        """The entry of AHA segment ``number`` (1-16)."""
        if not 1 <= number <= 16:
            raise ValueError(f"AHA segment must be 1-16, got {number}")
        return self.segments[number - 1]


# ----------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class SliceAnalysis:
    """What the report needs from one slice (arrays [rows, cols] on the same grid).

    Attributes:
        slice_index: MRD slice index.
        mbf_ml_min_g: float [rows, cols] MBF map, NaN where no fit.
        labels: uint8 [rows, cols] (2 = myocardium, docs/conventions.md).
        lv_center_rc: LV centre (row, col) in pixels.
        rv_insertion_deg: anterior RV insertion, degrees; NaN when not found.
        rv_insertion_own_deg, rv_insertion_source: set by :func:`place_rv_insertions` (the slice's
            own insertion before the cross-slice check, and where ``rv_insertion_deg`` comes from).
        slice_position_mm: signed position along the slice normal.
        pixel_spacing_mm: (row, col) spacing.
        ps_ml_min_g, vp: optional maps of the same shape.
        flags: problems reported upstream (e.g. by the segmentation).
        mbf_noise_ratio: the SIMEX ratio ``mbf_ml_min_g`` was divided by (None: not corrected); the
            fit-limit test takes the fit's own values, ``mbf_ml_min_g`` times it.
    """

    slice_index: int
    mbf_ml_min_g: np.ndarray
    labels: np.ndarray
    lv_center_rc: tuple[float, float]
    rv_insertion_deg: float
    slice_position_mm: float = 0.0
    pixel_spacing_mm: tuple[float, float] = (1.0, 1.0)
    ps_ml_min_g: np.ndarray | None = None
    vp: np.ndarray | None = None
    flags: tuple[str, ...] = ()
    rv_insertion_own_deg: float = math.nan
    rv_insertion_source: str = "given"
    mbf_noise_ratio: float | None = None


def place_rv_insertions(slices: Sequence[SliceAnalysis], levels: Sequence[SliceLevel],
                        settings: PlacementSettings | None = None) -> list[SliceAnalysis]:
    """The slices with their anterior RV insertion placed from their labels, across the scan.

    Each slice's own insertion is the anterior end of the main (4-connected) RV component's arc
    about its LV centre (``rv_insertion.rv_arc``), or the given ``rv_insertion_deg`` when its
    labels hold no RV or it has no LV centre; ``rv_insertion.place_insertions`` then checks the
    slices against each other (basal / mid share the insertion, the apical arc the direction).
    A replaced insertion is flagged on its slice.

    Args:
        slices: the scan's slices (any order).
        levels: level of each slice, in the same order (``assign_slice_levels``).
        settings: placement parameters (``rv_insertion.PlacementSettings``).

    Returns:
        Copies of ``slices`` (same order) with ``rv_insertion_deg``, ``rv_insertion_own_deg``,
        ``rv_insertion_source`` and the flags updated; slices without myocardium unchanged.
    """
    if len(levels) != len(slices):
        raise ReportInputError(f"got {len(levels)} levels for {len(slices)} slices")
    offered = []
    for item, level in zip(slices, levels):
        arc = None
        # a slice without myocardium (failed segmentation: its centre is the crop's guess) does not vote
        has_myocardium = bool(np.any(np.asarray(item.labels) == MYOCARDIUM_LABEL))
        if has_myocardium and all(math.isfinite(v) for v in item.lv_center_rc):
            try:
                arc = rv_arc(np.asarray(item.labels), item.lv_center_rc)
            except InsertionNotFoundError:
                arc = None
        offered.append(SliceRv(level=level, arc=arc,
                               given_deg=float(item.rv_insertion_deg) if has_myocardium else math.nan))
    placed = place_insertions(offered, settings)
    result = []
    for item, placement in zip(slices, placed):
        if not np.any(np.asarray(item.labels) == MYOCARDIUM_LABEL):
            result.append(item)  # nothing to sector: the slice fails for its own reason
            continue
        flags = item.flags + ((placement.flag,) if placement.flag else ())
        if placement.flag:
            logger.warning("slice %d: %s", item.slice_index, placement.flag)
        result.append(replace(item, rv_insertion_deg=placement.insertion_deg, rv_insertion_own_deg=placement.own_deg,
                              rv_insertion_source=placement.source, flags=flags))
    return result


def assign_slice_levels(slice_positions_mm: Sequence[float], *,
                        basal_at: Literal["lowest", "highest"] = "lowest") -> list[SliceLevel]:
    """Basal / mid / apical level of each slice from its position along the slice normal.

    Slices are ranked along the normal; rank i of n goes to third ``floor(3 (i + 0.5) / n)``
    (1 slice: mid; 2: basal, apical; 3: one each; more: thirds). ``basal_at="lowest"`` assumes the
    normal points from base to apex (lowest position = most basal).

    Returns the level of each input slice, in input order.
    """
    positions = np.asarray(slice_positions_mm, dtype=np.float64)
    if positions.ndim != 1 or positions.size == 0:
        raise ReportInputError(f"expected a non-empty 1-D list of slice positions, got shape {positions.shape}")
    if not np.all(np.isfinite(positions)):
        raise ReportInputError(f"slice positions must be finite, got {positions.tolist()}")
    order = np.argsort(positions if basal_at == "lowest" else -positions, kind="stable")
    n = positions.size
    levels: list[SliceLevel] = ["mid"] * n
    for rank, index in enumerate(order):
        levels[int(index)] = LEVELS[min(2, int(3 * (rank + 0.5) / n))]
    return levels


def sector_wall_thickness_mm(segment_map: np.ndarray, center_rc: tuple[float, float],
                             pixel_spacing_mm: tuple[float, float], *, bin_deg: float = 5.0) -> dict[int, float]:
    """Mean radial wall thickness (mm) of each segment present in ``segment_map``.

    Per angular bin of ``bin_deg`` degrees, thickness = radial extent of the myocardial pixels
    (max radius - min radius + one pixel); a segment's thickness is the mean over its bins.
    ``segment_map``: uint8 [rows, cols], 0 outside the myocardium.
    """
    rows, cols = np.nonzero(segment_map)
    if rows.size == 0:
        return {}
    spacing = float(np.mean(pixel_spacing_mm))
    radius = np.hypot((rows - center_rc[0]) * pixel_spacing_mm[0], (cols - center_rc[1]) * pixel_spacing_mm[1])
    angles = pixel_angles_deg(segment_map.shape, center_rc)[rows, cols]
    bins = (angles // bin_deg).astype(np.int64)
    segments = segment_map[rows, cols]
    result: dict[int, float] = {}
    for segment in np.unique(segments):
        in_segment = segments == segment
        thickness = []
        for b in np.unique(bins[in_segment]):
            r = radius[in_segment & (bins == b)]
            thickness.append(r.max() - r.min() + spacing)
        result[int(segment)] = float(np.mean(thickness))
    return result


def _stats(values: np.ndarray) -> tuple[float | None, float | None, float | None]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return None, None, None
    return float(np.mean(finite)), float(np.median(finite)), float(np.std(finite))


def _myocardial_core(myocardium: np.ndarray, border_px: int, lv_blood: np.ndarray | None = None) -> np.ndarray:
    """The myocardium without its outer ``border_px`` pixel rings (eroded through edge neighbours) and, with
    ``lv_blood``, without the pixels within ``border_px`` pixels of it through any of the 8 neighbours; all of
    it if nothing remains."""
    if border_px <= 0:
        return myocardium
    core = ndi.binary_erosion(myocardium, iterations=border_px)
    if lv_blood is not None and lv_blood.any():
        core &= ~ndi.binary_dilation(lv_blood, np.ones((3, 3), dtype=bool), iterations=border_px)
    return core if core.any() else myocardium


def weighted_segment_mean(values: Sequence[float | None], n_pixels: Sequence[int]) -> float | None:
    """Pixel-weighted mean of per-segment values (ml/min/g; None where a segment has no value).

    With the segment medians this is the report's global MBF: each segment is nearly homogeneous,
    so its median estimates its mean and the weighted mean estimates the myocardial mean.
    """
    pairs = [(float(v), float(n)) for v, n in zip(values, n_pixels) if v is not None and np.isfinite(v) and n > 0]
    if not pairs:
        return None
    weights = np.array([n for _, n in pairs])
    return float(np.dot([v for v, _ in pairs], weights) / weights.sum())


def _mean_or_none(values: list[np.ndarray]) -> float | None:
    if not values:
        return None
    joined = np.concatenate(values)
    joined = joined[np.isfinite(joined)]
    return float(np.mean(joined)) if joined.size else None


def _check_slice(item: SliceAnalysis) -> None:
    shape = np.shape(item.labels)
    if len(shape) != 2:
        raise ReportInputError(f"slice {item.slice_index}: labels must be [rows, cols], got shape {shape}")
    for name in ("mbf_ml_min_g", "ps_ml_min_g", "vp"):
        array = getattr(item, name)
        if array is not None and np.shape(array) != shape:
            raise ReportInputError(f"slice {item.slice_index}: {name} has shape {np.shape(array)}, "
                                   f"expected the labels' shape {shape}")


def slice_segment_map(item: SliceAnalysis, level: SliceLevel) -> np.ndarray | None:
    """uint8 [rows, cols] AHA segments of the slice's myocardium, or None if it cannot be sectored."""
    myocardium = np.asarray(item.labels) == MYOCARDIUM_LABEL
    if not myocardium.any() or not math.isfinite(item.rv_insertion_deg) \
            or not all(math.isfinite(v) for v in item.lv_center_rc):
        return None
    return aha_segment_map(myocardium, item.lv_center_rc, item.rv_insertion_deg, level)


def build_report(slices: Sequence[SliceAnalysis], *, study: StudyInfo | None = None,
                 settings: ReportSettings | None = None, flow_model: str = "",
                 levels: Sequence[SliceLevel] | None = None) -> PerfusionReport:
    """Build the AHA report from per-slice maps and segmentations.

    Args:
        slices: one entry per imaged slice (any order).
        study: patient/study information copied into the report.
        settings: flag thresholds and the slice-order assumption.
        flow_model: name of the flow model ("btex", "fermi") for the report.
        levels: level of each slice; by default from ``assign_slice_levels`` on the positions.

    Returns:
        The report; segments not imaged or on failed slices carry None values and a flag.
    """
    settings = settings or ReportSettings()
    study = study or StudyInfo()
    report_flags: list[str] = []
    if not slices:
        raise ReportInputError("expected at least one slice for the report, got none")
    for item in slices:
        _check_slice(item)
    if levels is None:
        levels = assign_slice_levels([s.slice_position_mm for s in slices], basal_at=settings.basal_at)
    elif len(levels) != len(slices):
        raise ReportInputError(f"got {len(levels)} levels for {len(slices)} slices")

    per_segment: dict[int, dict[str, list]] = {
        seg: {"mbf": [], "ps": [], "vp": [], "thickness": [], "slices": []} for seg in range(1, 17)}
    all_mbf: list[np.ndarray] = []
    all_ps: list[np.ndarray] = []
    all_vp: list[np.ndarray] = []
    slice_summaries: list[SliceSummary] = []
    usable_levels: set[str] = set()
    for item, level in sorted(zip(slices, levels), key=lambda pair: pair[0].slice_index):
        slice_flags = list(item.flags)
        myocardium = np.asarray(item.labels) == MYOCARDIUM_LABEL
        segment_map = slice_segment_map(item, level)
        failed = segment_map is None
        if not myocardium.any():
            slice_flags.append("no myocardium segmented")
        elif not math.isfinite(item.rv_insertion_deg):
            slice_flags.append("no RV insertion found")
        elif not all(math.isfinite(v) for v in item.lv_center_rc):
            slice_flags.append("no LV centre found")
        lv_blood = np.asarray(item.labels) == LV_BLOOD if settings.lv_corner_exclusion else None
        analysed = _myocardial_core(myocardium, settings.border_exclusion_px, lv_blood)
        mbf = np.asarray(item.mbf_ml_min_g, dtype=np.float64)
        # the fit limit is the top of the fit's grid: tested on the fit's own values, before a noise-bias
        # correction moved them (a valid fit at 5.8 divided by 0.97 is not at the limit)
        at_top = mbf * (item.mbf_noise_ratio or 1.0) >= settings.fit_limit_mbf_ml_min_g
        mbf_values = mbf[analysed]
        finite = np.isfinite(mbf_values)
        at_limit = float(np.mean(at_top[analysed][finite])) if finite.any() else None
        if not failed and at_limit is None:
            slice_flags.append("no MBF fit in the myocardium")
            failed = True
        elif not failed and at_limit > settings.max_fit_limit_fraction:
            slice_flags.append(f"{FIT_LIMIT_FAILURE} (>= {settings.fit_limit_mbf_ml_min_g:g} ml/min/g) on "
                               f"{100 * at_limit:.0f} % of the myocardium: segmentation off the myocardium, "
                               "or an AIF that reads low (small LV pool)?")
            failed = True
        if settings.exclude_fit_limit:
            mbf = np.where(at_top, np.nan, mbf)
            mbf_values = mbf[analysed]
        mean, median, _ = _stats(mbf_values) if not failed else (None, None, None)
        slice_summaries.append(SliceSummary(
            slice_index=item.slice_index, level=level, slice_position_mm=float(item.slice_position_mm),
            rv_insertion_deg=float(item.rv_insertion_deg) if math.isfinite(item.rv_insertion_deg) else None,
            rv_insertion_own_deg=float(item.rv_insertion_own_deg) if math.isfinite(item.rv_insertion_own_deg) else None,
            rv_insertion_source=item.rv_insertion_source,  # type: ignore[arg-type]
            lv_center_rc=(float(item.lv_center_rc[0]), float(item.lv_center_rc[1]))
            if all(math.isfinite(v) for v in item.lv_center_rc) else None,
            n_myocardium_pixels=int(myocardium.sum()), mbf_mean_ml_min_g=mean, mbf_median_ml_min_g=median,
            mbf_noise_ratio=item.mbf_noise_ratio, fit_limit_fraction=at_limit, failed=failed, flags=slice_flags))
        if failed:
            report_flags.append(f"slice {item.slice_index} ({level}) failed: {'; '.join(slice_flags) or 'unknown'}")
            continue
        usable_levels.add(level)
        thickness = sector_wall_thickness_mm(segment_map, item.lv_center_rc, item.pixel_spacing_mm)
        all_mbf.append(mbf_values)
        if item.ps_ml_min_g is not None:
            all_ps.append(np.asarray(item.ps_ml_min_g, dtype=np.float64)[analysed])
        if item.vp is not None:
            all_vp.append(np.asarray(item.vp, dtype=np.float64)[analysed])
        for seg in SEGMENTS_OF_LEVEL[level]:
            in_segment = segment_map == seg
            if np.count_nonzero(in_segment & analysed) >= 3:
                in_segment = in_segment & analysed
            entry = per_segment[seg]
            entry["slices"].append(item.slice_index)
            entry["mbf"].append(mbf[in_segment])
            if item.ps_ml_min_g is not None:
                entry["ps"].append(np.asarray(item.ps_ml_min_g, dtype=np.float64)[in_segment])
            if item.vp is not None:
                entry["vp"].append(np.asarray(item.vp, dtype=np.float64)[in_segment])
            if seg in thickness:
                entry["thickness"].append(thickness[seg])

    segments = [_segment_values(seg, per_segment[seg], usable_levels, settings) for seg in range(1, 17)]
    territories = []
    for name, numbers in TERRITORIES.items():
        pooled = [v for seg in numbers for v in per_segment[seg]["mbf"]]
        values = np.concatenate(pooled) if pooled else np.zeros(0)
        mean, median, _ = _stats(values)
        territories.append(TerritoryValues(territory=name, segments=list(numbers),
                                           n_pixels=int(np.isfinite(values).sum()),
                                           mbf_mean_ml_min_g=mean, mbf_median_ml_min_g=median))
    pooled_mbf = np.concatenate(all_mbf) if all_mbf else np.zeros(0)
    g_mean, g_median, _ = _stats(pooled_mbf)
    headline = weighted_segment_mean([seg.mbf_median_ml_min_g for seg in segments], [seg.n_pixels for seg in segments])
    global_values = GlobalValues(n_pixels=int(np.isfinite(pooled_mbf).sum()), mbf_ml_min_g=headline,
                                 mbf_mean_ml_min_g=g_mean,
                                 mbf_median_ml_min_g=g_median, ps_mean_ml_min_g=_mean_or_none(all_ps),
                                 vp_mean=_mean_or_none(all_vp))
    missing = [level for level in LEVELS if level not in usable_levels]
    if missing:
        report_flags.append(f"missing levels: {', '.join(missing)}")
    if g_mean is None:
        report_flags.append("no usable slice: no global MBF")
    partial = bool(missing) or any(s.failed for s in slice_summaries) \
        or any(s.mbf_mean_ml_min_g is None for s in segments)
    report = PerfusionReport(study=study, flow_model=flow_model, slices=slice_summaries, segments=segments,
                             territories=territories, global_values=global_values, missing_levels=missing,
                             flags=report_flags, partial=partial)
    logger.info("report %s (%s): global MBF %s ml/min/g, %d slices, flags %s", study.study_id or "-",
                study.scan, None if headline is None else round(headline, 3), len(slices), report_flags)
    return report


def _segment_values(seg: int, entry: dict[str, list], usable_levels: set[str],
                    settings: ReportSettings) -> SegmentValues:
    level: SliceLevel = next(lv for lv, numbers in SEGMENTS_OF_LEVEL.items() if seg in numbers)  # type: ignore[assignment]
    base = dict(segment=seg, name=SEGMENT_NAMES[seg], territory=territory_of(seg), level=level)
    if level not in usable_levels:
        return SegmentValues(**base, flags=["missing: level not imaged or slice failed"])
    values = np.concatenate(entry["mbf"]) if entry["mbf"] else np.zeros(0)
    flags: list[str] = []
    n_total = values.size
    finite = int(np.isfinite(values).sum())
    if n_total == 0:
        return SegmentValues(**base, slice_indices=entry["slices"], flags=["missing: no myocardial pixels"])
    if n_total < settings.min_sector_pixels:
        flags.append(f"few pixels: {n_total} < {settings.min_sector_pixels}")
    thickness = float(np.mean(entry["thickness"])) if entry["thickness"] else None
    if thickness is not None and thickness < settings.min_wall_thickness_mm:
        flags.append(f"thin wall: {thickness:.1f} mm < {settings.min_wall_thickness_mm:.1f} mm")
    missing_fraction = 1.0 - finite / n_total
    if missing_fraction > settings.max_missing_fit_fraction:
        flags.append(f"no fit in {100 * missing_fraction:.0f} % of pixels")
    mean, median, sd = _stats(values)
    return SegmentValues(**base, slice_indices=entry["slices"], n_pixels=finite, mbf_mean_ml_min_g=mean,
                         mbf_median_ml_min_g=median, mbf_sd_ml_min_g=sd,
                         ps_mean_ml_min_g=_mean_or_none(entry["ps"]), vp_mean=_mean_or_none(entry["vp"]),
                         wall_thickness_mm=thickness, flags=flags)


def perfusion_reserve(stress: PerfusionReport, rest: PerfusionReport) -> ReserveReport:
    """Myocardial perfusion reserve per segment and globally: stress MBF / rest MBF, from the
    segment medians (the bull's-eye values) and the headline global MBF (``mbf_ml_min_g``).

    Segments where either value is missing or rest MBF is not positive get ``mpr = None``.
    """
    if stress.study.patient_id != rest.study.patient_id:
        raise ReportInputError(f"stress and rest reports must be of the same patient, got "
                               f"{stress.study.patient_id!r} and {rest.study.patient_id!r}")

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b is not None and b > 0 else None

    segments = []
    for s, r in zip(stress.segments, rest.segments):
        segments.append(ReserveSegment(segment=s.segment, territory=s.territory,
                                       stress_mbf_ml_min_g=s.mbf_median_ml_min_g, rest_mbf_ml_min_g=r.mbf_median_ml_min_g,
                                       mpr=ratio(s.mbf_median_ml_min_g, r.mbf_median_ml_min_g)))
    return ReserveReport(stress_study_id=stress.study.study_id, rest_study_id=rest.study.study_id,
                         stress_created_utc=stress.study.created_utc, rest_created_utc=rest.study.created_utc,
                         segments=segments, stress_global_mbf_ml_min_g=stress.global_values.mbf_ml_min_g,
                         rest_global_mbf_ml_min_g=rest.global_values.mbf_ml_min_g,
                         global_mpr=ratio(stress.global_values.mbf_ml_min_g, rest.global_values.mbf_ml_min_g))


def with_reserve(report: PerfusionReport, other: PerfusionReport) -> PerfusionReport:
    """Copy of ``report`` with the perfusion reserve against ``other`` (one stress, one rest)."""
    kinds = {report.study.scan, other.study.scan}
    if kinds != {"stress", "rest"}:
        raise ReportInputError(f"perfusion reserve needs one stress and one rest report, got "
                               f"{report.study.scan!r} and {other.study.scan!r}")
    stress, rest = (report, other) if report.study.scan == "stress" else (other, report)
    return report.model_copy(update={"reserve": perfusion_reserve(stress, rest)})


def report_json_schema() -> dict:
    """The JSON schema of :class:`PerfusionReport` (written to docs/report_schema.json)."""
    return PerfusionReport.model_json_schema()
