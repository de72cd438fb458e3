"""``aha-report``: collect flow maps and segmentations per slice, send the AHA report at the end.

At the end of the stream the gadget pairs each slice's :class:`FlowMaps` with its
:class:`SliceSegmentation`, builds the AHA 16-segment report (``perfline.toolbox.aha_report``)
and yields, in this order:

1. MBF maps (DataRole ``Flow_Map``), and PS (``PS_Map``) and Vp (``Vascular_Volume_Map``) when
   fitted, one image per slice, with the AHA sector outlines (territory colours) and the endo /
   epi borders as ``GT_ROI_*`` / ``ROI_*`` meta;
2. the report image (MBF maps with contours, bull's-eye, table): RGB, ``image_type`` 6,
   3 channels, DataRole ``AHA``, with the compact
   report JSON in its meta ``PERFLINE_Report`` (for receivers that drop text messages);
3. the report JSON as a text message.

With ``ChainContext.output_dir`` set it also writes ``report.png``, ``report.json`` and DICOM
(report secondary capture, MBF/PS/Vp maps with geometry) to a folder per scan.

**Perfusion reserve.** The server keeps the last report of each patient in memory
(:data:`REPORT_STORE`, keyed by the MRD header's ``patientID``, at most ``max_patients``). When a
rest scan's report arrives and a stress report of the same patient is stored (or the other way
round), the new report carries the reserve (MPR = stress / rest MBF per segment). Stress or
rest comes from the client parameter ``"scan"``, else from the protocol / series description
containing "stress" or "rest". Reports are lost when the server stops.
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import ismrmrd
import numpy as np
from pydantic import Field

from perfline.core.gadget import Gadget, GadgetError, GadgetSettings, register_gadget
from perfline.core.items import TextItem
from perfline.gadgets.mrd_images import Contour as MrdContour
from perfline.gadgets.mrd_images import make_image
from perfline.gadgets.perfusion_items import AifCurve, FlowMaps, ImageGeometry, SliceSegmentation, image_point_mm
from perfline.toolbox.aha_report import (
    FIT_LIMIT_FAILURE, AifSummary, PerfusionReport, ReportSettings, SliceAnalysis, StudyInfo, assign_slice_levels,
    build_report, place_rv_insertions, with_reserve,
)
from perfline.toolbox.aif import AIF_SOURCE_HINT_REGION, AifError, first_pass_contrast
from perfline.toolbox.rv_insertion import PlacementSettings, lv_equivalent_radius_mm
from perfline.toolbox.sector_contours import Contour, ContourError, border_contours, sector_contours


class AhaReportSettings(GadgetSettings):
    """Settings of the ``aha-report`` gadget."""

    min_sector_pixels: int = Field(10, ge=1, description="flag sectors with fewer myocardial pixels")
    min_wall_thickness_mm: float = Field(3.0, gt=0, description="flag sectors with a thinner mean wall")
    max_missing_fit_fraction: float = Field(0.5, ge=0, le=1, description="flag sectors with more NaN MBF pixels")
    basal_at: Literal["lowest", "highest"] = Field("lowest", description="end of the slice-normal order that is basal")
    border_exclusion_px: int = Field(1, ge=0, le=5, description=(
        "MBF statistics leave out myocardial pixels this close to the endo/epicardial border (partial volume)"))
    lv_corner_exclusion: bool = Field(False, description=(
        "also leave out the myocardial pixels that touch the LV blood pool only at a corner (their curves carry "
        "about 2.5 % LV blood; docs/mapping.md 'Session 28')"))
    mbf_series_index: int = Field(20, ge=0, description="image_series_index of the MBF maps (PS +1, Vp +2)")
    report_series_index: int = Field(30, ge=0, description="image_series_index of the report image")
    send_ps_vp: bool = Field(True, description="also send PS and Vp maps when the model fitted them")
    write_dicom: bool = Field(True, description="write DICOM files when the server has an output directory")
    keep_reports: bool = Field(True, description="remember reports per patient for the perfusion reserve")
    max_patients: int = Field(256, ge=1, description="reports kept in memory (oldest dropped first)")
    min_aif_pixels: int = Field(8, ge=1, description=(
        "flag the report when the AIF averages fewer LV blood-pool pixels (a noisy or misplaced AIF scales every MBF)"))
    max_aif_lv_distance_mm: float = Field(20.0, gt=0, description=(
        "flag the report when the AIF pool's centre lies farther, in the slice plane, from the LV centre the CNN "
        "found in the myocardial slices (median over slices): the AIF was probably taken from another structure"))
    min_aif_lv_radius_px: float = Field(0.0, ge=0, description=(
        "flag the report when the LV blood pool (the CNN's largest LV cross-section, as an equivalent circle) "
        "has a radius under this many AIF pixels: the low-resolution, blurred AIF pool is then mostly "
        "partial volume (0: never, the default: at 3 pixels the flag did not separate larger MBF errors on "
        "50 held-out studies, docs/report_schema.md)"))
    max_aif_first_pass_frame_noise_pct: float = Field(3.0, gt=0, description=(
        "flag the report when the AIF's first-pass area has a larger relative SD (%) from the AIF images' white "
        "frame noise (AifCurve.first_pass_frame_noise_pct: a small LV pool in noisy images; a lower bound). On 100 "
        "simulated dev scans 9 exceeded 3 %; their AIF areas scattered 7.6 % RMS against 3.0 % for the others, "
        "their global MBF 7.4 % mean abs error against 5.9 %; on 100 new studies 16 of 200 scans, 8.2 % against "
        "5.8 % (docs/report_schema.md)"))
    min_aif_first_pass_contrast: float = Field(2.0, gt=1, description=(
        "flag the report when the AIF's first-pass peak is less than this many times its late level "
        "(toolbox.aif.first_pass_contrast; arterial blood 3.2-11 on 100 simulated dev scans, myocardium about 1.5): "
        "the AIF pool then holds tissue, not blood, and every MBF value is too high"))
    fit_limit_mbf_ml_min_g: float = Field(5.9, gt=0, description=(
        "MBF at or above this value is the top of the flow fit's grid (BTEX: 6.0 ml/min/g)"))
    exclude_fit_limit: bool = Field(True, description=(
        "MBF statistics leave out pixels at the fit limit (no estimate: the optimum lies outside the fit's grid)"))
    max_fit_limit_fraction: float = Field(0.5, gt=0, le=1, description=(
        "a slice with more analysed myocardial pixels at the fit limit fails (segmentation off the myocardium, or "
        "an AIF that reads low)"))
    small_aif_pool_pixels: int = Field(12, ge=1, description=(
        "when slices fail at the fit limit and the AIF averages fewer LV blood-pool pixels than this, the report "
        "names the AIF as the likely cause: every held-out scan without a global MBF so far (stress 2**30+1636, "
        "+1701, +2061, +2306: 3.2-3.5 ml/min/g) had an 8-pixel pool, and on +2306 an AIF about 10 % low on its first "
        "pass was enough (the true AIF at the same times read -7 %; docs/integration.md, session 25)"))
    rv_placement: bool = Field(True, description=(
        "place the anterior RV insertion from each slice's RV arc, checked across the slices (a slice that "
        "disagrees or has no RV takes the others' value, flagged); false: the segmentation's insertion as is"))
    rv_tip_correction_deg: float = Field(PlacementSettings.tip_correction_deg, ge=0, le=10, description=(
        "move the RV arc's anterior end this far clockwise (the segmentation stops short of the thin RV wedge)"))
    rv_max_basal_mid_deg: float = Field(PlacementSettings.max_basal_mid_deg, gt=0, description=(
        "basal / mid slices whose RV insertions differ by more disagree"))
    rv_apical_tie_deg: float = Field(PlacementSettings.apical_tie_deg, gt=0, description=(
        "an apical slice decides between disagreeing basal / mid slices when its prediction lies this close to one"))
    rv_max_apical_deg: float = Field(PlacementSettings.max_apical_deg, gt=0, description=(
        "an apical RV insertion this far from the basal / mid slices' prediction takes the prediction"))

    def report_settings(self) -> ReportSettings:
        """The toolbox report's settings (``build_report``) among these."""
        return ReportSettings(**self.model_dump(include=set(ReportSettings.model_fields)))


class ReportStore:
    """Thread-safe last report per (patient, scan kind), bounded, oldest patients dropped first."""

    def __init__(self, max_patients: int = 256) -> None:
        self.max_patients = max_patients
        self._reports: OrderedDict[str, dict[str, PerfusionReport]] = OrderedDict()
        self._lock = threading.Lock()

    def counterpart(self, report: PerfusionReport) -> PerfusionReport | None:
        """The stored report of the same patient with the other scan kind (stress <-> rest)."""
        other = {"stress": "rest", "rest": "stress"}.get(report.study.scan)
        if not report.study.patient_id or other is None:
            return None
        with self._lock:
            return self._reports.get(report.study.patient_id, {}).get(other)

    def put(self, report: PerfusionReport) -> None:
        if not report.study.patient_id or report.study.scan == "unknown":
            return
        with self._lock:
            entry = self._reports.pop(report.study.patient_id, {})
            entry[report.study.scan] = report
            self._reports[report.study.patient_id] = entry
            while len(self._reports) > self.max_patients:
                self._reports.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._reports.clear()


REPORT_STORE = ReportStore()


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def study_info_from_context(header: Any, parameters: dict[str, Any]) -> StudyInfo:
    """Patient id, study id, scan kind and field strength from the MRD header and client parameters."""
    patient = getattr(getattr(header, "subjectInformation", None), "patientID", None)
    study_info = getattr(header, "studyInformation", None)
    study = getattr(study_info, "studyInstanceUID", None) or getattr(study_info, "studyID", None)
    measurement = getattr(header, "measurementInformation", None)
    field = getattr(getattr(header, "acquisitionSystemInformation", None), "systemFieldStrength_T", None)
    scan = str(parameters.get("scan", "")).lower()
    if scan not in ("stress", "rest"):
        described = " ".join(_text(getattr(measurement, name, None)) for name in
                             ("protocolName", "seriesDescription", "sequenceName")).lower()
        scan = next((kind for kind in ("stress", "rest") if re.search(rf"(?<![a-z]){kind}(?![a-z])", described)), "unknown")
    patient = _text(parameters.get("patient_id", patient))
    return StudyInfo(patient_id=patient, study_id=_text(study), scan=scan,
                     field_strength_t=float(field) if field is not None else None)


def aif_lv_distance_mm(aif: AifCurve, maps: dict[int, FlowMaps],
                       segmentations: dict[int, SliceSegmentation]) -> float | None:
    """In-plane distance (mm) between the AIF pool's centre and the CNN's LV centre (median over slices).

    The AIF slice and the myocardial slices are parallel short-axis slices, so the LV centre
    projected into the slice plane moves only a few mm between them (long-axis tilt), while a
    pool taken from the lung, the aorta or the RV lies a pool radius or more away. None when
    no slice has an LV centre or the AIF mask is empty.
    """
    mask = np.asarray(aif.mask, dtype=bool)
    if not mask.any():
        return None
    centre_rc = np.argwhere(mask).mean(axis=0)
    aif_point = image_point_mm(aif.geometry, mask.shape, float(centre_rc[0]), float(centre_rc[1]))
    distances = []
    for index, segmentation in segmentations.items():
        flow = maps.get(index)
        if flow is None or not all(math.isfinite(v) for v in segmentation.lv_center_rc):
            continue
        lv_point = image_point_mm(flow.geometry, flow.mbf_ml_min_g.shape, *segmentation.lv_center_rc)
        normal = np.asarray(flow.geometry.slice_dir, dtype=np.float64)
        normal = normal / max(float(np.linalg.norm(normal)), 1e-12)
        offset = aif_point - lv_point
        distances.append(float(np.linalg.norm(offset - np.dot(offset, normal) * normal)))
    return float(np.median(distances)) if distances else None


def lv_radius_in_aif_pixels(aif: AifCurve, maps: dict[int, FlowMaps],
                            segmentations: dict[int, SliceSegmentation]) -> float | None:
    """Radius of the CNN's largest LV blood-pool cross-section, as a circle of equal area, in AIF pixels.

    The area is counted on each myocardial slice's grid (label 1, mm^2 from its pixel spacing); the
    largest slice is used (the AIF slice is usually basal). None when no slice has an LV pixel.
    """
    radii_mm = [lv_equivalent_radius_mm(segmentation.labels, maps[index].geometry.pixel_spacing_mm)
                for index, segmentation in segmentations.items() if index in maps]
    radii_mm = [radius for radius in radii_mm if radius is not None]
    if not radii_mm:
        return None
    return max(radii_mm) / float(np.sqrt(np.prod(aif.geometry.pixel_spacing_mm)))


def slice_position_mm(geometry: ImageGeometry) -> float:
    """Position of the slice centre along its own normal (mm)."""
    return float(np.dot(np.asarray(geometry.position, dtype=np.float64), np.asarray(geometry.slice_dir, dtype=np.float64)))


@register_gadget
class AhaReportGadget(Gadget):
    """Collect FlowMaps + SliceSegmentation per slice (and the AifCurve); report at end of stream."""

    name = "aha-report"
    Settings = AhaReportSettings
    accepts = (FlowMaps, SliceSegmentation, AifCurve)
    produces = (ismrmrd.Image, TextItem)

    @classmethod
    def warm_up(cls, settings: AhaReportSettings, chain: Any, stop: threading.Event | None = None) -> str | None:
        """Build and render one synthetic three-slice report at server start (no patient: nothing stored or
        written): the first scan's report then does not pay for importing matplotlib, loading its fonts and
        the report's first calls, 0.5-0.8 s on the serial tail after the last flow map (docs/integration.md
        "Session 29")."""
        started = time.perf_counter()
        rows, cols = np.indices((72, 80))
        radius = np.hypot(rows - 36.0, cols - 40.0)
        labels = np.where(radius < 9, 1, np.where(radius < 14, 2, 0)).astype(np.uint8)
        labels[(radius >= 14) & (radius < 20) & (cols > 50)] = 3
        items: list[Any] = []
        for index in range(3):
            geometry = ImageGeometry(field_of_view_mm=(150.0, 135.0, 8.0), position=(0.0, 0.0, 10.0 * index),
                                     pixel_spacing_mm=(1.875, 1.875))
            mbf = np.where(labels == 2, 2.0 + 0.05 * np.cos(np.arctan2(rows - 36.0, cols - 40.0)), np.nan)
            items.append(FlowMaps(slice_index=index, model="btex", mbf_ml_min_g=mbf.astype(np.float32),
                                  geometry=geometry))
            items.append(SliceSegmentation(slice_index=index, labels=labels, rv_insertion_deg=120.0,
                                           lv_center_rc=(36.0, 40.0)))
        for _ in cls(settings.model_copy(update={"keep_reports": False})).process(iter(items)):
            if stop is not None and stop.is_set():
                return None
        return f"synthetic report built and rendered in {time.perf_counter() - started:.1f} s"

    def process(self, items: Iterator[Any]) -> Iterator[Any]:
        maps: dict[int, FlowMaps] = {}
        segmentations: dict[int, SliceSegmentation] = {}
        aif: AifCurve | None = None
        for item in items:
            if isinstance(item, FlowMaps):
                maps[item.slice_index] = item
            elif isinstance(item, SliceSegmentation):
                segmentations[item.slice_index] = item
            else:
                aif = item
        if not maps:
            raise GadgetError(f"aha-report: expected flow maps of at least one slice at the end of the stream, "
                              f"got none ({len(segmentations)} segmentations, AIF {'present' if aif else 'absent'})")
        yield from self._finish(maps, segmentations, aif)

    # ------------------------------------------------------------------------------ build
    def _report(self, maps: dict[int, FlowMaps], segmentations: dict[int, SliceSegmentation],
                aif: AifCurve | None) -> PerfusionReport:
        settings: AhaReportSettings = self.settings  # type: ignore[assignment]
        slices = []
        extra_flags = []
        for index, flow in sorted(maps.items()):
            segmentation = segmentations.get(index)
            if segmentation is None or segmentation.labels.shape != flow.mbf_ml_min_g.shape:
                found = "none" if segmentation is None else f"labels of shape {segmentation.labels.shape}"
                extra_flags.append(f"slice {index}: expected a segmentation of shape {flow.mbf_ml_min_g.shape}, "
                                   f"got {found}")
                labels = np.zeros(flow.mbf_ml_min_g.shape, np.uint8)
                slices.append(SliceAnalysis(slice_index=index, mbf_ml_min_g=flow.mbf_ml_min_g, labels=labels,
                                            lv_center_rc=(math.nan, math.nan), rv_insertion_deg=math.nan,
                                            slice_position_mm=slice_position_mm(flow.geometry),
                                            flags=("no segmentation",)))
                continue
            slices.append(SliceAnalysis(
                slice_index=index, mbf_ml_min_g=flow.mbf_ml_min_g, labels=segmentation.labels,
                lv_center_rc=segmentation.lv_center_rc, rv_insertion_deg=segmentation.rv_insertion_deg,
                slice_position_mm=slice_position_mm(flow.geometry), pixel_spacing_mm=flow.geometry.pixel_spacing_mm,
                ps_ml_min_g=flow.ps_ml_min_g, vp=flow.vp, flags=tuple(segmentation.flags),
                mbf_noise_ratio=flow.mbf_noise_ratio))
        for index in sorted(set(segmentations) - set(maps)):
            extra_flags.append(f"slice {index}: segmented but no flow maps")
        # acquisition problems found upstream (perfusion-recon: a scan stopped early) concern the
        # whole report: flagged once at the top and the report marked partial
        early = sorted({flag for item in slices for flag in item.flags if flag.startswith("scan ended early")})
        extra_flags.extend(early)
        levels = assign_slice_levels([item.slice_position_mm for item in slices], basal_at=settings.basal_at)
        if settings.rv_placement:
            slices = place_rv_insertions(slices, levels, PlacementSettings(
                tip_correction_deg=settings.rv_tip_correction_deg, max_basal_mid_deg=settings.rv_max_basal_mid_deg,
                apical_tie_deg=settings.rv_apical_tie_deg, max_apical_deg=settings.rv_max_apical_deg))
        report = build_report(
            slices, study=study_info_from_context(self.context.header, self.context.parameters),
            settings=settings.report_settings(),
            flow_model=next(iter(maps.values())).model, levels=levels)
        aif_summary, aif_flag = None, []
        if aif is None:
            # informational only: the maps exist, so an AIF was used upstream; it just did not
            # reach this gadget (the mapping gadget consumed it without passing it on)
            aif_flag = ["no AIF curve reached the report (aif summary empty)"]
        else:
            n_pixels = int(np.count_nonzero(aif.mask))
            aif_summary = AifSummary(peak_gd_mmol_l=float(np.max(aif.blood_gd_mmol_l)),
                                     foot_time_s=aif.arrival_time_s,
                                     peak_time_s=float(aif.time_s[aif.peak_index]), hematocrit=aif.hematocrit,
                                     n_pixels=n_pixels, first_pass_frame_noise_pct=aif.first_pass_frame_noise_pct)
            if n_pixels < settings.min_aif_pixels:
                aif_flag = [f"AIF from only {n_pixels} LV blood-pool pixels (fewer than {settings.min_aif_pixels}): "
                            "MBF may be unreliable"]
            distance = aif_lv_distance_mm(aif, maps, segmentations)
            if distance is not None:
                self.log.info("AIF pool centre %.1f mm (in plane) from the CNN's LV centre", distance)
                if distance > settings.max_aif_lv_distance_mm:
                    aif_flag.append(f"AIF pool centre {distance:.0f} mm from the LV centre of the myocardial slices "
                                    f"(more than {settings.max_aif_lv_distance_mm:g} mm): the AIF may come from "
                                    "another structure, MBF unreliable")
            radius_px = lv_radius_in_aif_pixels(aif, maps, segmentations)
            if radius_px is not None and radius_px < settings.min_aif_lv_radius_px:
                aif_flag.append(f"small LV: blood-pool radius {radius_px:.1f} AIF pixels (under "
                                f"{settings.min_aif_lv_radius_px:g}): the AIF pool is mostly partial volume, "
                                "the AIF and so every MBF value may be off")
            noise = aif_summary.first_pass_frame_noise_pct
            if noise is not None and noise > settings.max_aif_first_pass_frame_noise_pct:
                aif_flag.append(f"noisy AIF: its first-pass area varies by {noise:.1f} % (SD) from the AIF images' "
                                f"frame noise alone (more than {settings.max_aif_first_pass_frame_noise_pct:g} %; "
                                f"{n_pixels} LV pool pixels): MBF scales about inversely with that area")
            try:
                contrast = first_pass_contrast(aif.blood_gd_mmol_l)
            except AifError:  # no rise above the baseline at all
                contrast = 0.0
            if contrast < settings.min_aif_first_pass_contrast:
                aif_flag.append(f"AIF peaks only {contrast:.1f} times its late level (arterial blood: at least "
                                f"{settings.min_aif_first_pass_contrast:g}): the AIF pool may hold myocardium, "
                                "MBF unreliable (too high)")
            # the slices that failed BECAUSE of the fit limit (a slice that failed for its segmentation
            # first is not counted, whatever its share at the limit)
            at_limit = [item for item in report.slices
                        if item.failed and any(flag.startswith(FIT_LIMIT_FAILURE) for flag in item.flags)]
            if at_limit and n_pixels < settings.small_aif_pool_pixels:
                aif_flag.append(f"{len(at_limit)} of {len(report.slices)} slice(s) failed with most of the myocardium "
                                f"at the fit limit and the AIF from {n_pixels} LV pool pixels: the small pool's AIF "
                                "most likely reads low (at stress flow 10 % less first pass is enough), rather than "
                                "the segmentation; check the AIF")
            if aif.source == AIF_SOURCE_HINT_REGION:
                aif_flag.append("AIF from the CNN's LV region of the AIF image: no enhancing blood pool was found "
                                "there, MBF may be unreliable")
        return report.model_copy(update={"aif": aif_summary, "flags": report.flags + extra_flags + aif_flag,
                                         "partial": report.partial or bool(extra_flags)})

    def _with_reserve(self, report: PerfusionReport) -> PerfusionReport:
        settings: AhaReportSettings = self.settings  # type: ignore[assignment]
        if not settings.keep_reports:
            return report
        REPORT_STORE.max_patients = settings.max_patients
        other = REPORT_STORE.counterpart(report)
        REPORT_STORE.put(report)
        if other is None:
            return report
        self.log.info("perfusion reserve with the stored %s report of patient %s", other.study.scan,
                      report.study.patient_id)
        return with_reserve(report, other)

    # ------------------------------------------------------------------------------ outputs
    def _finish(self, maps: dict[int, FlowMaps], segmentations: dict[int, SliceSegmentation],
                aif: AifCurve | None) -> Iterator[Any]:
        from perfline.toolbox.report_figure import SliceMapView, render_report

        report = self._with_reserve(self._report(maps, segmentations, aif))
        levels = {s.slice_index: s.level for s in report.slices}
        insertions = {s.slice_index: s.rv_insertion_deg for s in report.slices}
        map_images, views = [], []
        for image_index, (index, flow) in enumerate(sorted(maps.items())):
            contours = self._contours(segmentations.get(index), levels.get(index), flow.mbf_ml_min_g.shape,
                                      insertions.get(index))
            map_images.extend(self._map_images(flow, contours, image_index))
            views.append(SliceMapView(f"slice {index} ({levels.get(index, '?')})", flow.mbf_ml_min_g, contours))
        figure = render_report(report, slice_maps=views)
        report_json = report.model_dump_json(indent=2)
        # the scanner gets its outputs first; the server-side files (PNG, JSON, DICOM: ~1 s on a
        # slow CPU) are written after them, before the session ends
        yield from map_images
        yield self._report_image(figure, next(iter(maps.values())).geometry, report.model_dump_json())
        yield TextItem(report_json)
        if self.context.output_dir is not None:
            try:
                self._write_files(report, report_json, figure, maps)
            except OSError as error:  # a full or read-only disk must not cost the scanner its report
                self.log.error("could not write the report files: %s", error)
                yield TextItem(f"WARNING aha-report: could not write the report files to the server: {error}")

    def _contours(self, segmentation: SliceSegmentation | None, level: str | None,
                  shape: tuple[int, ...], rv_insertion_deg: float | None) -> list[Contour]:
        """Border and sector contours of one slice, sectors from the report's RV insertion."""
        if segmentation is None or level is None or segmentation.labels.shape != shape \
                or rv_insertion_deg is None or not math.isfinite(rv_insertion_deg) \
                or not all(math.isfinite(v) for v in segmentation.lv_center_rc):
            return []
        myocardium = segmentation.labels == 2
        try:
            found = border_contours(myocardium, segmentation.lv_center_rc) + \
                sector_contours(myocardium, segmentation.lv_center_rc, rv_insertion_deg, level)
        except ContourError as error:
            self.log.warning("slice %d: no contours: %s", segmentation.slice_index, error)
            return []
        return found

    def _map_images(self, flow: FlowMaps, contours: list[Contour], image_index: int) -> list[ismrmrd.Image]:
        settings: AhaReportSettings = self.settings  # type: ignore[assignment]
        mrd_contours = [MrdContour(c.label, c.points_xy, c.rgb, c.thickness) for c in contours]
        specs = [("Flow_Map", flow.mbf_ml_min_g, "ml/min/g", (2.0, 4.0), 0)]
        if settings.send_ps_vp and flow.ps_ml_min_g is not None and np.isfinite(flow.ps_ml_min_g).any():
            specs.append(("PS_Map", flow.ps_ml_min_g, "ml/min/g", (1.5, 3.0), 1))
        if settings.send_ps_vp and flow.vp is not None and np.isfinite(flow.vp).any():
            specs.append(("Vascular_Volume_Map", flow.vp, "fraction", (0.1, 0.2), 2))
        images = []
        for role, values, units, window, offset in specs:
            images.append(make_image(
                np.asarray(values, dtype=np.float32), flow.geometry,
                series_index=settings.mbf_series_index + offset, image_index=image_index, slice=flow.slice_index,
                data_role=role, units=units, window=window, color_map="Perfusion.pal", contours=mrd_contours,
                comment=f"{role} {flow.model}", seq_description=role))
        return images

    def _report_image(self, figure: np.ndarray, geometry: ImageGeometry, report_json: str) -> ismrmrd.Image:
        settings: AhaReportSettings = self.settings  # type: ignore[assignment]
        rows, cols = figure.shape[:2]
        report_geometry = ImageGeometry(field_of_view_mm=(float(cols), float(rows), 1.0), position=geometry.position,
                                        read_dir=geometry.read_dir, phase_dir=geometry.phase_dir,
                                        slice_dir=geometry.slice_dir, pixel_spacing_mm=(1.0, 1.0))
        return make_image(np.moveaxis(figure, 2, 0), report_geometry, series_index=settings.report_series_index,
                          image_index=0, slice=0, data_role="AHA", image_type=ismrmrd.IMTYPE_RGB,
                          window=(127.5, 255.0), comment="AHA report", seq_description="AHA",
                          meta={"PERFLINE_Report": report_json})

    def _write_files(self, report: PerfusionReport, report_json: str, figure: np.ndarray,
                     maps: dict[int, FlowMaps]) -> None:
        from perfline.toolbox.dicom_export import (
            DicomStudy, parametric_map_dataset, report_secondary_capture, write_dataset,
        )
        from perfline.toolbox.report_figure import save_png
        from pydicom.uid import generate_uid

        settings: AhaReportSettings = self.settings  # type: ignore[assignment]
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
        safe_patient = re.sub(r"[^A-Za-z0-9_.-]", "_", report.study.patient_id or "anonymous")[:64]
        folder = Path(self.context.output_dir) / f"{safe_patient}_{report.study.scan}_{stamp}_{self.context.connection_id}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "report.json").write_text(report_json)
        save_png(figure, folder / "report.png")
        if settings.write_dicom:
            study = DicomStudy(patient_id=report.study.patient_id or "anonymous",
                               patient_name=report.study.patient_id or "anonymous",
                               study_id=(report.study.study_id or "1")[:16])
            write_dataset(report_secondary_capture(figure, study), folder / "dicom" / "report.dcm")
            for offset, (role, attribute, units) in enumerate((("MBF", "mbf_ml_min_g", "ml/min/g"),
                                                               ("PS", "ps_ml_min_g", "ml/min/g"),
                                                               ("Vp", "vp", "fraction"))):
                series_uid = generate_uid()
                for instance, (index, flow) in enumerate(sorted(maps.items()), start=1):
                    values = getattr(flow, attribute)
                    if values is None or not np.isfinite(values).any():
                        continue
                    ds = parametric_map_dataset(values, flow.geometry, study, series_uid=series_uid,
                                                series_number=settings.mbf_series_index + offset,
                                                instance_number=instance, description=f"perfline {role}",
                                                units=units, slice_position_mm=slice_position_mm(flow.geometry))
                    write_dataset(ds, folder / "dicom" / f"{role.lower()}_slice{index}.dcm")
        self.log.info("wrote the report of patient %s (%s) to %s", report.study.patient_id or "-",
                      report.study.scan, folder)
