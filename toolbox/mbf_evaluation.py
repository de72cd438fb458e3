"""``perfline evaluate --mbf``: automated vs true MBF, global and per AHA sector.

Statistics follow Xue et al., Radiology: AI 2020 (Statistical Analysis): Bland-Altman analysis
(bias = mean of auto - truth, 95 % limits of agreement = bias +/- 1.96 SD of the differences;
Bland & Altman, Lancet 1986) and a two-sided paired t-test (``scipy.stats.ttest_rel``) of auto
against truth, for global MBF (one value per study) and per sector (16 values per study, pooled).
Relative errors |auto - truth| / truth are reported too (acceptance: global <= 3 %, sector <= 8 %).

The end-to-end loop (:func:`evaluate_studies`) simulates N studies, streams each through the
``perfusion`` chain of a server started in this process (``perfline.server.testing``) with the
MRD client (``perfline.server.client``), reads the JSON report the chain sends back, and compares
it with the simulator's truth. Beside it, the report's own statistic applied to the TRUE maps and labels
(:func:`report_statistic_of_truth`) says how much of the error is the statistic's (sector medians against the
segment means) and not the chain's (``MbfComparison.statistic_floor_*``; docs/mapping.md "Session 32").
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from scipy import stats

from perfline.toolbox.rv_insertion import angle_difference_deg as signed_difference_deg

logger = logging.getLogger(__name__)


class EvaluationError(RuntimeError):
    """The evaluation inputs do not match, or a study could not be evaluated."""


@dataclass(frozen=True)
class StudyMbf:
    """MBF of one study, ml/min/g.

    Attributes:
        global_mbf: global (all myocardium) MBF.
        segment_mbf: float [16], segments 1..16, NaN where not measured.
        rv_insertion_deg: per slice anterior RV insertion (optional, for the sector placement).
        rv_insertion_own_deg: per slice, the slice's own insertion before the report's cross-slice
            check (automated side, report schema >= 1.2; NaN where none).
        label: which scan this is (e.g. "study 3 rest sim-1073741827"), for the per-scan table.
        flags: the report's flags (automated side only).
        statistic_global_mbf, statistic_segment_mbf: truth side only (:func:`truth_from_simulator`): the
            report's own statistic (sector medians of the core, global their pixel-weighted mean) applied
            to the TRUE MBF map with the TRUE labels and RV insertions. Its distance from ``global_mbf`` /
            ``segment_mbf`` is the part of any automated error that is the statistic's and not the chain's
            (a defect in part of a sector: the median is one side's value, not the mean); NaN / None when
            not computed.
    """

    global_mbf: float
    segment_mbf: np.ndarray
    rv_insertion_deg: tuple[float, ...] = ()
    rv_insertion_own_deg: tuple[float, ...] = ()
    label: str = ""
    flags: tuple[str, ...] = ()
    statistic_global_mbf: float = math.nan
    statistic_segment_mbf: np.ndarray | None = None


class AgreementStats(BaseModel):
    """Bland-Altman and paired t-test of paired measurements (auto vs truth)."""

    model_config = ConfigDict(extra="forbid")

    n: int
    mean_auto: float
    mean_truth: float
    bias: float
    sd_difference: float
    limits_of_agreement: tuple[float, float]
    t_statistic: float | None
    p_value: float | None
    mean_abs_relative_error_pct: float
    max_abs_relative_error_pct: float


class MbfComparison(BaseModel):
    """Global and per-sector agreement, and the RV insertion (sector placement) error."""

    model_config = ConfigDict(extra="forbid")

    global_mbf: AgreementStats
    sector_mbf: AgreementStats
    rv_insertion_abs_error_deg_mean: float | None = None
    rv_insertion_abs_error_deg_max: float | None = None
    rv_insertion_within_5_deg_fraction: float | None = Field(None, description=(
        "fraction of slices with a true insertion whose automated insertion lies within 5 degrees (issue 7's "
        "sector placement criterion); a slice without an automated insertion counts as outside"))
    n_rv_insertion_slices: int = 0
    n_studies: int
    n_missing_sectors: int
    statistic_floor_global_mean_abs_pct: float | None = Field(None, description=(
        "mean |error| (%) of the report's statistic applied to the TRUE MBF map and labels against the true "
        "global MBF (the mean over the myocardium): what the statistic alone costs, with no chain error; "
        "None when the truth carries no such value"))
    statistic_floor_sector_mean_abs_pct: float | None = Field(None, description=(
        "the same per sector (the TRUE map's sector medians against the sector means), over the measured sectors"))


def agreement(auto: np.ndarray, truth: np.ndarray) -> AgreementStats:
    """Bland-Altman statistics and paired t-test of ``auto`` vs ``truth`` (1-D, same length, finite).

    The t-test is undefined (None) with fewer than 2 pairs or identical differences.
    """
    auto = np.asarray(auto, dtype=np.float64).ravel()
    truth = np.asarray(truth, dtype=np.float64).ravel()
    if auto.shape != truth.shape:
        raise EvaluationError(f"auto and truth must pair up, got {auto.size} and {truth.size} values")
    if auto.size == 0:
        raise EvaluationError("no paired values to compare")
    if not (np.all(np.isfinite(auto)) and np.all(np.isfinite(truth))):
        raise EvaluationError("auto and truth must be finite (drop missing pairs first)")
    difference = auto - truth
    bias = float(difference.mean())
    sd = float(difference.std(ddof=1)) if auto.size > 1 else 0.0
    t_statistic = p_value = None
    if auto.size > 1 and sd > 0:
        test = stats.ttest_rel(auto, truth)
        t_statistic, p_value = float(test.statistic), float(test.pvalue)
    relative = np.abs(difference) / np.abs(truth) * 100.0
    return AgreementStats(n=int(auto.size), mean_auto=float(auto.mean()), mean_truth=float(truth.mean()),
                          bias=bias, sd_difference=sd, limits_of_agreement=(bias - 1.96 * sd, bias + 1.96 * sd),
                          t_statistic=t_statistic, p_value=p_value,
                          mean_abs_relative_error_pct=float(relative.mean()),
                          max_abs_relative_error_pct=float(relative.max()))


def angle_difference_deg(a: np.ndarray | float, b: np.ndarray | float) -> np.ndarray:
    """Absolute smallest difference between angles in degrees, in [0, 180] (the absolute value
    of ``rv_insertion.angle_difference_deg``)."""
    return np.abs(signed_difference_deg(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)))


def compare_mbf(auto: Sequence[StudyMbf], truth: Sequence[StudyMbf]) -> MbfComparison:
    """Compare automated with true MBF over studies, globally and per sector.

    Sectors missing (NaN) in the automated result are left out of the sector statistics and
    counted in ``n_missing_sectors``.
    """
    if len(auto) != len(truth):
        raise EvaluationError(f"got {len(auto)} automated and {len(truth)} true studies")
    if not auto:
        raise EvaluationError("no studies to compare")
    auto_segments = np.stack([np.asarray(s.segment_mbf, dtype=np.float64) for s in auto])
    truth_segments = np.stack([np.asarray(s.segment_mbf, dtype=np.float64) for s in truth])
    if auto_segments.shape != truth_segments.shape or auto_segments.shape[1] != 16:
        raise EvaluationError(f"segment MBF must be [16] per study, got {auto_segments.shape[1:]} "
                              f"and {truth_segments.shape[1:]}")
    paired = np.isfinite(auto_segments) & np.isfinite(truth_segments)
    global_auto = np.array([s.global_mbf for s in auto], dtype=np.float64)
    global_truth = np.array([s.global_mbf for s in truth], dtype=np.float64)
    ok = np.isfinite(global_auto) & np.isfinite(global_truth)
    errors = [angle_difference_deg(a, t) for sa, st in zip(auto, truth)
              for a, t in zip(sa.rv_insertion_deg, st.rv_insertion_deg) if math.isfinite(a) and math.isfinite(t)]
    with_truth = [float(angle_difference_deg(a, t)) if math.isfinite(a) else math.inf for sa, st in zip(auto, truth)
                  for a, t in zip(sa.rv_insertion_deg, st.rv_insertion_deg) if math.isfinite(t)]
    floor_global = floor_sector = None
    if all(math.isfinite(t.statistic_global_mbf) and t.statistic_segment_mbf is not None for t in truth):
        stat_global = np.array([t.statistic_global_mbf for t in truth], dtype=np.float64)
        floor_global = float(np.mean(np.abs(stat_global / global_truth - 1.0)) * 100.0)
        stat_segments = np.stack([np.asarray(t.statistic_segment_mbf, dtype=np.float64) for t in truth])
        both = paired & np.isfinite(stat_segments)
        if both.any():
            floor_sector = float(np.mean(np.abs(stat_segments[both] / truth_segments[both] - 1.0)) * 100.0)
    return MbfComparison(
        statistic_floor_global_mean_abs_pct=floor_global, statistic_floor_sector_mean_abs_pct=floor_sector,
        global_mbf=agreement(global_auto[ok], global_truth[ok]),
        sector_mbf=agreement(auto_segments[paired], truth_segments[paired]),
        rv_insertion_abs_error_deg_mean=float(np.mean(errors)) if errors else None,
        rv_insertion_abs_error_deg_max=float(np.max(errors)) if errors else None,
        rv_insertion_within_5_deg_fraction=float(np.mean(np.array(with_truth) <= 5.0)) if with_truth else None,
        n_rv_insertion_slices=len(with_truth),
        n_studies=len(auto),
        n_missing_sectors=int((~np.isfinite(auto_segments) & np.isfinite(truth_segments)).sum()),
    )


def bland_altman_plot(auto: np.ndarray, truth: np.ndarray, path: str | Path, *, title: str) -> Path:
    """Bland-Altman plot (difference auto - truth against their mean, ml/min/g) written as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    auto = np.asarray(auto, dtype=np.float64).ravel()
    truth = np.asarray(truth, dtype=np.float64).ravel()
    result = agreement(auto, truth)
    figure = Figure(figsize=(6, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    ax = figure.add_subplot(1, 1, 1)
    ax.scatter((auto + truth) / 2, auto - truth, s=10, alpha=0.7)
    low, high = result.limits_of_agreement
    ax.axhline(result.bias, color="k", label=f"bias {result.bias:+.3f}")
    ax.axhline(low, color="r", linestyle="--", label=f"95% limits {low:+.3f} / {high:+.3f}")
    ax.axhline(high, color="r", linestyle="--")
    ax.set_xlabel("mean of automated and true MBF (ml/min/g)")
    ax.set_ylabel("automated - true MBF (ml/min/g)")
    p_text = ("=n/a" if result.p_value is None else "<0.001" if result.p_value < 0.001
              else f"={result.p_value:.3f}")
    ax.set_title(f"{title} (n={result.n}, paired t-test P{p_text})", fontsize=10)
    ax.legend(fontsize=8)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


def global_from_sectors(values: np.ndarray, n_pixels: np.ndarray) -> float:
    """Global MBF as the pixel-weighted mean of sector values, NaN where no sector has a value:
    :func:`perfline.toolbox.aha_report.weighted_segment_mean` (the report's headline statistic)
    for reports written before schema 1.1.

    ``values`` [16] sector MBF (ml/min/g, NaN where missing), ``n_pixels`` [16] the pixels each
    value summarises. The global target is the MEAN MBF of the myocardium; the median over the
    whole myocardium does not estimate it when a defect makes the distribution bimodal (stress
    reference studies: +6.8 % on the TRUE pixel MBF; weighted sector medians -0.7 %,
    docs/integration.md).
    """
    from perfline.toolbox.aha_report import weighted_segment_mean

    value = weighted_segment_mean(list(np.asarray(values, dtype=np.float64)), list(np.asarray(n_pixels)))
    return float("nan") if value is None else value


def study_mbf_from_report(report_json: str | dict, statistic: str = "median") -> StudyMbf:
    """StudyMbf of a report JSON produced by ``perfline.toolbox.aha_report`` (missing -> NaN).

    ``statistic="median"`` (default) takes the report's per-sector medians and, as global MBF,
    their pixel-weighted mean: the report's headline ``global_values.mbf_ml_min_g`` (schema 1.1),
    for older reports computed here (:func:`global_from_sectors`; the sectors' ``n_pixels``);
    ``"mean"`` takes the report's per-sector and global means over the myocardial pixels. The
    median is the default because single pixel-wise BTEX fits (noise, residual partial volume)
    move a sector mean by tens of per cent; the truth it is compared with is the mean of the true
    pixel MBF. The report's statistics leave out the border ring of the CNN myocardium and pixels
    whose fit sits at the top of its grid (``ReportSettings.exclude_fit_limit``); the target is
    unchanged.
    """
    from perfline.toolbox.aha_report import PerfusionReport

    if statistic not in ("mean", "median"):
        raise EvaluationError(f"statistic must be 'mean' or 'median', got {statistic!r}")
    report = PerfusionReport.model_validate_json(report_json) if isinstance(report_json, str) \
        else PerfusionReport.model_validate(report_json)
    field = f"mbf_{statistic}_ml_min_g"
    segments = np.array([np.nan if getattr(s, field) is None else getattr(s, field) for s in report.segments])
    if statistic == "median":
        headline = report.global_values.mbf_ml_min_g  # the report's own global (schema >= 1.1), same value
        global_mbf = headline if headline is not None else \
            global_from_sectors(segments, np.array([s.n_pixels for s in report.segments]))
    else:
        value = report.global_values.mbf_mean_ml_min_g
        global_mbf = np.nan if value is None else value
    insertions = tuple(np.nan if s.rv_insertion_deg is None else s.rv_insertion_deg for s in report.slices)
    own = tuple(np.nan if s.rv_insertion_own_deg is None else s.rv_insertion_own_deg for s in report.slices)
    return StudyMbf(global_mbf=global_mbf, segment_mbf=segments, rv_insertion_deg=insertions, rv_insertion_own_deg=own,
                    flags=tuple(report.flags))


# ------------------------------------------------------------------------------ end to end
@dataclass(frozen=True)
class SimulatedStudy:
    """A simulated scan on disk and its truth (from the simulator)."""

    mrd_path: Path
    truth: StudyMbf
    scan: str
    patient_id: str
    hematocrit: float | None = None  # the simulated blood hematocrit (a measured lab value), if known


StudySimulator = Callable[[int, str, Path], SimulatedStudy]


def report_from_results(texts: Sequence[str]) -> str:
    """The report JSON among the text messages a client received (the last one with a ``segments`` key)."""
    for text in reversed(texts):
        try:
            data = json.loads(text.rstrip("\x00"))
        except ValueError:
            continue
        if isinstance(data, dict) and "segments" in data and "global_values" in data:
            return text.rstrip("\x00")
    raise EvaluationError(f"no report JSON among {len(texts)} text messages: {[t[:80] for t in texts]}")


def evaluate_studies(n_studies: int, simulate: StudySimulator, work_dir: Path, *, chain: str = "perfusion",
                     scans: Sequence[str] = ("stress", "rest"), timeout_s: float = 600.0,
                     chain_dir: Path | None = None, lab_hematocrit: bool = True,
                     progress: Callable[[int], None] | None = None,
                     keep_kspace: bool = False) -> tuple[list[StudyMbf], list[StudyMbf]]:
    """Simulate, stream and collect: (automated, truth) per scan of ``n_studies`` studies.

    Each study index uses its own simulator seed; every scan is streamed through ``chain`` (from
    ``chain_dir``, default the shipped chains) on a server started here, with the study's patient
    id in the parameters so stress and rest pair. With ``lab_hematocrit`` (default) the study's
    hematocrit (``SimulatedStudy.hematocrit``) is sent as the JSON parameter ``hematocrit``, as a
    scanner integrator passes a measured lab value; without it the chain uses its setting (0.42).
    Each scan's simulated file is removed once its results are in (a 16-coil k-space scan is 150-200
    MB: 50 studies would leave 18 GB behind) unless ``keep_kspace``; its report JSON is kept beside it
    (``SCAN_report.json`` in the study's directory).
    """
    from perfline.server.client import send_dataset
    from perfline.server.testing import running_server

    automated: list[StudyMbf] = []
    truths: list[StudyMbf] = []
    with running_server(chain_dir=chain_dir, warm_up=True, wait_for_warm_up=True) as (host, port):
        for index in range(n_studies):
            for scan in scans:
                study = simulate(index, scan, work_dir / f"study_{index:03d}")
                parameters: dict[str, object] = {"scan": scan, "patient_id": study.patient_id}
                if lab_hematocrit and study.hematocrit is not None:
                    parameters["hematocrit"] = round(float(study.hematocrit), 4)
                results = send_dataset(study.mrd_path, host, port, chain, timeout_s=timeout_s, parameters=parameters)
                if not keep_kspace:
                    Path(study.mrd_path).unlink(missing_ok=True)
                if results.errors:
                    raise EvaluationError(f"study {index} ({scan}): the server reported {results.errors}")
                label = f"study {index} {scan} {study.patient_id}"
                report = report_from_results(results.texts)
                # the scan's report, for an audit of any one number (a few kB)
                (Path(study.mrd_path).parent / f"{scan}_report.json").write_text(report)
                automated.append(replace(study_mbf_from_report(report), label=label))
                truths.append(replace(study.truth, label=label))
            if progress is not None:
                progress(index + 1)
    return automated, truths


def truth_from_simulator(study: object) -> StudyMbf:
    """True MBF of a simulated study (``perfline.simulator.study``): per AHA segment and global.

    Segment truth is the mean of the phantom's MBF over the myocardial pixels the simulator
    assigns to that segment (its own labels, RV insertion and levels), pooled over slices;
    global truth is the mean over all myocardial pixels. This is the quantity a reader wants
    (mean MBF of the myocardium in the sector); it does not depend on which pixels the chain
    analyses: over the true myocardium without its border ring (the chain's choice) it differs
    by +0.2 % globally and 0.3 % per sector (8 reference studies, docs/integration.md).
    """
    from perfline.simulator import study as simulated

    values: dict[int, list[np.ndarray]] = {segment: [] for segment in range(1, 17)}
    pooled, insertions, phantoms = [], [], []
    for index in range(study.n_slices):  # type: ignore[attr-defined]
        phantom = simulated.slice_phantom(study, index)
        phantoms.append(phantom)
        myocardium = np.isfinite(phantom.mbf)
        pooled.append(phantom.mbf[myocardium])
        insertions.append(float(phantom.anatomy.rv_insertion_deg))
        for segment in np.unique(phantom.aha_segments[myocardium]):
            values[int(segment)].append(phantom.mbf[myocardium & (phantom.aha_segments == segment)])
    segment_mbf = np.array([float(np.mean(np.concatenate(v))) if v else np.nan for _, v in sorted(values.items())])
    statistic_global, statistic_segments = report_statistic_of_truth(phantoms, list(study.levels))  # type: ignore
    return StudyMbf(global_mbf=float(np.mean(np.concatenate(pooled))), segment_mbf=segment_mbf,
                    rv_insertion_deg=tuple(insertions), statistic_global_mbf=statistic_global,
                    statistic_segment_mbf=statistic_segments)


def report_statistic_of_truth(phantoms: Sequence[object], levels: Sequence[str]) -> tuple[float, np.ndarray]:
    """(global, [16] sectors) of the report (``aha_report.build_report``, default settings) on the TRUE MBF
    maps (ml/min/g) of a simulated study's slice phantoms, with their TRUE labels, LV centres and RV
    insertions: the report's statistic with nothing of the chain in it (``StudyMbf.statistic_*``)."""
    from perfline.toolbox.aha_report import SliceAnalysis, build_report

    slices = []
    for index, phantom in enumerate(phantoms):
        anatomy = phantom.anatomy  # type: ignore[attr-defined]
        slices.append(SliceAnalysis(slice_index=index, mbf_ml_min_g=np.asarray(phantom.mbf, np.float64),  # type: ignore
                                    labels=np.asarray(anatomy.labels), lv_center_rc=tuple(anatomy.lv_center_rc),
                                    rv_insertion_deg=float(anatomy.rv_insertion_deg)))
    report = build_report(slices, levels=list(levels))  # type: ignore[arg-type]
    study = study_mbf_from_report(report.model_dump())
    return float(study.global_mbf), np.asarray(study.segment_mbf, dtype=np.float64)


def default_simulator(first_seed: int | None = None) -> StudySimulator:
    """Simulate study ``index`` as k-space MRD (3 slices, 60 frames, 16 coils, R = 3).

    Seeds start at the held-out range of the segmentation engineer (``TEST_SEED_START``, never
    used for training); stress and rest of one index share the seed, hence the anatomy (same
    "patient"), and get the patient id ``sim-<seed>``.
    """
    try:
        from perfline.simulator.mrd import write_kspace
        from perfline.simulator.study import sample_study
    except ImportError as error:
        raise EvaluationError(f"the end-to-end MBF evaluation needs perfline.simulator: {error}") from error
    if first_seed is None:
        from perfline.models.data import TEST_SEED_START

        first_seed = TEST_SEED_START

    def simulate(index: int, scan: str, directory: Path) -> SimulatedStudy:
        seed = first_seed + index
        study = sample_study(seed, kind=scan)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{scan}.h5"
        write_kspace(study, str(path))
        return SimulatedStudy(mrd_path=path, truth=truth_from_simulator(study), scan=scan, patient_id=f"sim-{seed}",
                              hematocrit=float(study.bolus.hematocrit))

    return simulate


def _finite_or_none(value: float, digits: int) -> float | None:
    return round(float(value), digits) if math.isfinite(value) else None  # strict JSON has no NaN


def per_scan_rows(automated: Sequence[StudyMbf], truth: Sequence[StudyMbf]) -> list[dict[str, object]]:
    """One row per scan: global auto / true MBF and relative error (%), sectors measured, median and
    max absolute sector error (%), max RV insertion error (deg), the report's flags, and the 16
    sector values and per-slice RV insertions of both sides (None where missing), so that runs
    can be pooled later."""
    rows = []
    for auto, true in zip(automated, truth):
        auto_s, true_s = np.asarray(auto.segment_mbf, dtype=np.float64), np.asarray(true.segment_mbf, dtype=np.float64)
        paired = np.isfinite(auto_s) & np.isfinite(true_s)
        sector = np.abs(auto_s[paired] / true_s[paired] - 1.0) * 100.0
        angles = [float(angle_difference_deg(a, t)) for a, t in zip(auto.rv_insertion_deg, true.rv_insertion_deg)
                  if math.isfinite(a) and math.isfinite(t)]
        rows.append({
            "scan": auto.label or true.label, "global_auto": _finite_or_none(auto.global_mbf, 4),
            "global_true": _finite_or_none(true.global_mbf, 4),
            "global_error_pct": _finite_or_none(100.0 * (auto.global_mbf / true.global_mbf - 1.0), 2),
            "sectors": int(paired.sum()),
            "sector_median_abs_error_pct": round(float(np.median(sector)), 2) if sector.size else None,
            "sector_max_abs_error_pct": round(float(np.max(sector)), 2) if sector.size else None,
            "statistic_floor_global_error_pct": _finite_or_none(
                100.0 * (true.statistic_global_mbf / true.global_mbf - 1.0), 2),
            "rv_insertion_max_error_deg": round(max(angles), 2) if angles else None,
            "flags": list(auto.flags),
            "segments_auto": [_finite_or_none(v, 4) for v in auto_s],
            "segments_true": [_finite_or_none(v, 4) for v in true_s],
            "rv_insertion_auto_deg": [_finite_or_none(v, 2) for v in auto.rv_insertion_deg],
            "rv_insertion_own_deg": [_finite_or_none(v, 2) for v in auto.rv_insertion_own_deg],
            "rv_insertion_true_deg": [_finite_or_none(v, 2) for v in true.rv_insertion_deg]})
    return rows


def write_evaluation(comparison: MbfComparison, automated: Sequence[StudyMbf], truth: Sequence[StudyMbf],
                     out_dir: Path) -> list[Path]:
    """Write the comparison JSON, the per-scan JSON and the global / sector Bland-Altman PNGs to ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "mbf_comparison.json", out_dir / "mbf_per_scan.json"]
    paths[0].write_text(comparison.model_dump_json(indent=2))
    paths[1].write_text(json.dumps(per_scan_rows(automated, truth), indent=1))
    g_auto = np.array([s.global_mbf for s in automated])
    g_truth = np.array([s.global_mbf for s in truth])
    ok = np.isfinite(g_auto) & np.isfinite(g_truth)
    paths.append(bland_altman_plot(g_auto[ok], g_truth[ok], out_dir / "bland_altman_global.png", title="global MBF"))
    s_auto = np.stack([s.segment_mbf for s in automated])
    s_truth = np.stack([s.segment_mbf for s in truth])
    paired = np.isfinite(s_auto) & np.isfinite(s_truth)
    paths.append(bland_altman_plot(s_auto[paired], s_truth[paired], out_dir / "bland_altman_sectors.png",
                                   title="per-sector MBF"))
    return paths


def run(args: argparse.Namespace) -> int:
    """Entry of ``perfline evaluate --mbf``: reads ``args.studies``, ``args.first_seed`` and ``args.out``
    (or the folder of ``args.json``; default ``evaluation_mbf``), ``args.lab_hematocrit`` (default
    True: the simulated hematocrit is sent to the chain) and ``args.chains`` (a chain directory
    whose ``perfusion.toml`` replaces the shipped one; default None, the shipped chains) and
    ``args.keep_kspace`` (default False: each simulated k-space file is removed after its scan)."""
    n_studies = int(getattr(args, "studies", 50))
    out = getattr(args, "out", None)
    json_path = getattr(args, "json", None)
    out_dir = Path(out) if out else (Path(json_path).parent / "evaluation_mbf" if json_path else Path("evaluation_mbf"))
    if n_studies < 2:
        raise EvaluationError(f"--studies must be at least 2 for a paired t-test, got {n_studies}")
    from tqdm import tqdm

    chain_dir = None if getattr(args, "chains", None) is None else Path(args.chains)
    if chain_dir is not None and not (chain_dir / "perfusion.toml").is_file():
        raise EvaluationError(f"--chains {chain_dir}: expected a chain directory holding perfusion.toml, "
                              f"found no such file")
    simulate = default_simulator(getattr(args, "first_seed", None))
    with tqdm(total=n_studies, desc="MBF evaluation", unit="study") as bar:
        automated, truth = evaluate_studies(n_studies, simulate, out_dir / "studies",
                                            lab_hematocrit=bool(getattr(args, "lab_hematocrit", True)),
                                            chain_dir=chain_dir, keep_kspace=bool(getattr(args, "keep_kspace", False)),
                                            progress=lambda done: bar.update(done - bar.n))
    comparison = compare_mbf(automated, truth)
    paths = write_evaluation(comparison, automated, truth, out_dir)
    for row in per_scan_rows(automated, truth):
        logger.info("%s: global %s / %s ml/min/g (%s %%), sectors %s, median |error| %s %%, flags %s",
                    row["scan"], row["global_auto"], row["global_true"], row["global_error_pct"], row["sectors"],
                    row["sector_median_abs_error_pct"], len(row["flags"]))  # type: ignore[arg-type]
    g, s = comparison.global_mbf, comparison.sector_mbf
    logger.info("global MBF: bias %+.3f ml/min/g, 95%% limits %+.3f/%+.3f, P=%s, mean |error| %.2f %%",
                g.bias, *g.limits_of_agreement, g.p_value, g.mean_abs_relative_error_pct)
    logger.info("sector MBF: bias %+.3f ml/min/g, 95%% limits %+.3f/%+.3f, P=%s, mean |error| %.2f %%",
                s.bias, *s.limits_of_agreement, s.p_value, s.mean_abs_relative_error_pct)
    if comparison.statistic_floor_global_mean_abs_pct is not None:
        logger.info("the report's statistic on the TRUE maps (no chain error): mean |error| %.2f %% global, %s sectors",
                    comparison.statistic_floor_global_mean_abs_pct,
                    "-" if comparison.statistic_floor_sector_mean_abs_pct is None
                    else f"{comparison.statistic_floor_sector_mean_abs_pct:.2f} %")
    if comparison.rv_insertion_within_5_deg_fraction is not None:
        logger.info("RV insertion: mean |error| %.2f deg, max %.1f deg, %.0f %% of %d slices within 5 deg",
                    comparison.rv_insertion_abs_error_deg_mean or math.nan, comparison.rv_insertion_abs_error_deg_max
                    or math.nan, 100 * comparison.rv_insertion_within_5_deg_fraction, comparison.n_rv_insertion_slices)
    logger.info("wrote %s", ", ".join(str(p) for p in paths))
    return 0
