"""Where the end-to-end MBF error of the ``perfusion`` chain comes from (issue 7).

The chain is run in-process (no server) up to ``flow-map`` (so through ``cnn-segmentation`` and
``aif-extract``) on simulated studies and its
intermediates are cached per scan (``prepare``: the uniform-grid Gd series of each slice, the AIF
curve, the CNN labels, LV centre and RV insertion). ``attribute`` then refits the BTEX maps
(the ``flow-map`` gadget's settings) with each input swapped for the simulator's truth:

- AIF: the chain's ``AifCurve`` or the true LV blood Gd (``simulator.study.aif_gd_truth``)
  resampled onto the same grid (plasma = blood / (1 - Hct) either way, the study's hematocrit);
- tissue curves: the chain's Gd series or the true fraction-weighted tissue Gd of the phantom
  (``slice_phantom(...).gd``, noise-free, no blur), resampled onto the same grid and shifted by the
  integer offset between the motion-corrected series and the phantom's reference position;
- mask: the CNN labels (LV centre, RV insertion) or the phantom's labels (shifted the same way);
- "true+noise": the true tissue Gd plus white noise of the SD measured on the chain's curves
  (second differences, ``btex.noise_sd``), which separates the fit at the chain's noise from the
  chain's tissue-curve errors;

and summarises every combination as ``perfline evaluate --mbf`` does (``toolbox.aha_report.build_report``:
sector medians without the border ring and the fit-limit pixels; global = their pixel-weighted mean,
``mbf_evaluation.study_mbf_from_report``), against its target (``truth_from_simulator``: mean true
MBF per AHA segment / of the myocardium). The "oracle" columns apply the same pixel selection and
statistic to the TRUE MBF map, which isolates the pixel selection / statistic from the fit.

    python benchmarks/mbf_error_sources.py prepare --first-seed 1073741824 --studies 8
    python benchmarks/mbf_error_sources.py attribute --first-seed 1073741824 --studies 8
    python benchmarks/mbf_error_sources.py attribute --chain-only --global-statistic report-median \
        --flow-map '{"coarse_stride": [2, 2, 2, 2, 2], "n_starts": 3}'    # the chain before 2026-11-26 21:00
    python benchmarks/mbf_error_sources.py aif-tail --first-seed 1073741824 --studies 8   # cached AIF vs truth

``prepare`` caches under ``--cache`` (default ``/tmp/mbf_error_sources``, 8-19 MB per scan;
the simulated MRD file of a scan, about 40 MB, is deleted unless ``--keep-mrd``); about 15-35 s
per scan on this 2-core machine. ``attribute`` takes about 20 s per scan (9 fits of 3 slices).
Needs only the package (no server). Results and their reading: docs/integration.md (fourth pass).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from perfline.gadgets.mapping import FlowMapSettings
    from perfline.toolbox.aha_report import ReportSettings

logger = logging.getLogger("mbf_error_sources")

KINDS = ("stress", "rest")
DEFAULT_CACHE = Path("/tmp/mbf_error_sources")
CHAIN_UNTIL = "flow-map"  # the chain is run up to (not including) this gadget
NOISE_FREE_SNR_FACTOR = 1e5  # prepare_scan(noise_free=True): the study's SNR times this


# ------------------------------------------------------------------------------ prepare
def prepare_scan(seed: int, kind: str, cache: Path, *, keep_mrd: bool = False, chains: Path | None = None,
                 noise_free: bool = False, oracle: str | None = None) -> Path:
    """Run the ``perfusion`` chain up to ``flow-map`` on one simulated scan; cache its intermediates (npz).

    ``chains``: a chain directory whose ``perfusion.toml`` replaces the shipped one (a settings
    variant, e.g. ``perfusion-moco interpolation = "cubic"``); default the shipped chains.
    ``noise_free``: the study's k-space without noise (its SNR times ``NOISE_FREE_SNR_FACTOR``; same
    anatomy, motion, contrast and timing), e.g. to separate the chain's systematic errors from its noise.
    ``oracle``: the myocardial slices reconstructed by a lab oracle of ``recon_oracles`` (``coil-maps``: TSENSE with
    the simulator's TRUE coil maps, ``coil-maps-masked`` zeroed where the chain's calibration masks; ``image`` /
    ``image-unwarped``: its image-domain frames, noise-free only)."""
    import contextlib
    import dataclasses

    import ismrmrd
    from recon_oracles import ORACLES, myocardial_recon_oracle

    from perfline.core.chain import resolve_chain
    from perfline.core.gadget import ChainContext
    from perfline.core.runtime import run_gadgets
    from perfline.gadgets.perfusion_items import AifCurve, SliceSegmentation, SliceSeries
    from perfline.server.client import dataset_items
    from perfline.simulator.mrd import write_kspace
    from perfline.simulator.study import sample_study

    if oracle is not None and oracle not in ORACLES:
        raise ValueError(f"oracle must be one of {ORACLES}, got {oracle!r}")
    if oracle in ("image", "image-unwarped") and not noise_free:
        raise ValueError(f"the {oracle!r} oracle replaces the recon by noise-free image-domain frames: "
                         f"prepare with noise_free=True")
    out = cache / f"{seed}_{kind}.npz"
    if out.is_file():
        return out
    study = sample_study(seed, kind=kind)
    if noise_free:
        study = dataclasses.replace(study, snr_blood_peak=study.snr_blood_peak * NOISE_FREE_SNR_FACTOR)
    mrd = cache / "mrd" / f"{seed}_{kind}.h5"
    mrd.parent.mkdir(parents=True, exist_ok=True)
    if not mrd.is_file():
        write_kspace(study, str(mrd))
    xml, items = dataset_items(str(mrd))
    header = ismrmrd.xsd.CreateFromDocument(xml)
    parameters = {"scan": kind, "hematocrit": round(float(study.bolus.hematocrit), 4)}
    spec = resolve_chain("perfusion", chains)
    gadgets = spec.instantiate(ChainContext(header=header, header_xml=xml, parameters=parameters))
    names = [g.gadget.name for g in spec.gadgets]
    started = time.perf_counter()
    with myocardial_recon_oracle(study, oracle) if oracle else contextlib.nullcontext():
        outputs = run_gadgets(gadgets[: names.index(CHAIN_UNTIL)], items)
    arrays: dict[str, np.ndarray] = {"hematocrit": np.array(parameters["hematocrit"])}
    for item in outputs:
        if isinstance(item, SliceSeries) and item.units == "gd_mmol_l":
            n_pd = item.n_pd_frames
            arrays[f"gd{item.slice_index}"] = np.asarray(item.data[n_pd:], dtype=np.float32)
            arrays[f"time{item.slice_index}"] = np.asarray(item.time_s[n_pd:], dtype=np.float64)
        elif isinstance(item, SliceSegmentation):
            arrays[f"labels{item.slice_index}"] = np.asarray(item.labels, dtype=np.uint8)
            arrays[f"rvi{item.slice_index}"] = np.array(item.rv_insertion_deg)
            arrays[f"lvc{item.slice_index}"] = np.array(item.lv_center_rc, dtype=np.float64)
        elif isinstance(item, AifCurve):
            arrays["aif_time"] = np.asarray(item.time_s, dtype=np.float64)
            arrays["aif_blood"] = np.asarray(item.blood_gd_mmol_l, dtype=np.float64)
            arrays["aif_foot"] = np.array(item.foot_index)
            if item.foot_time_s is not None:  # aif-extract foot_from_samples: the arrival between grid frames
                arrays["aif_foot_time"] = np.array(item.foot_time_s, dtype=np.float64)
            arrays["aif_mask"] = np.asarray(item.mask, dtype=bool)
            if item.sample_time_s is not None and item.sample_blood_gd_mmol_l is not None:
                # the AIF at its acquisition times, as flow-map's sampled table (aif_upsample > 1) takes it
                arrays["aif_sample_time"] = np.asarray(item.sample_time_s, dtype=np.float64)
                arrays["aif_sample_blood"] = np.asarray(item.sample_blood_gd_mmol_l, dtype=np.float64)
    np.savez_compressed(out, **arrays)
    if not keep_mrd:
        mrd.unlink()
    logger.info("seed %d %s: chain to %s in %.1f s -> %s", seed, kind, CHAIN_UNTIL, time.perf_counter() - started, out)
    return out



# ------------------------------------------------------------------------------ truth
@dataclass(frozen=True)
class ScanInputs:
    """Chain and true inputs of one scan on the chain's uniform grid ``grid_s`` [T] (s).

    Series are ``[time, rows, cols]`` Gd (mmol/L); masks/labels ``[rows, cols]``; the truth
    is shifted onto the motion-corrected grid of the chain (``shift_rc``, pixels).
    """

    seed: int
    kind: str
    grid_s: np.ndarray
    hematocrit: float
    chain_aif: np.ndarray         # blood Gd, baseline subtracted, zero before its foot
    true_aif: np.ndarray          # blood Gd of the simulator's LV (its AIF frames, linear onto the grid)
    true_aif_samples: tuple[np.ndarray, np.ndarray]  # (AIF frame times s, LV blood Gd) as acquired
    chain_gd: list[np.ndarray]
    true_gd: list[np.ndarray]
    cnn: list[tuple[np.ndarray, tuple[float, float], float]]   # labels, LV centre, RV insertion
    true: list[tuple[np.ndarray, tuple[float, float], float]]
    true_mbf: list[np.ndarray]    # true pixel MBF, NaN outside the true myocardium
    levels: tuple[str, ...]
    shift_rc: list[tuple[int, int]]
    truth: object                 # StudyMbf of truth_from_simulator
    slice_times: list[np.ndarray] | None = None  # each slice's acquisition times (s), the phantom's frames
    chain_aif_samples: tuple[np.ndarray, np.ndarray] | None = None  # (s, blood Gd) as aif-extract takes them
    chain_aif_foot_s: float | None = None  # the chain AIF's arrival (s): foot_time_s, else its foot frame on the grid


def _best_shift(chain: np.ndarray, truth: np.ndarray, region: np.ndarray, radius: int = 4) -> tuple[int, int]:
    """Integer (rows, cols) shift of ``truth`` that best matches ``chain`` (correlation inside ``region``)."""
    best, best_score = (0, 0), -np.inf
    a = chain[region] - chain[region].mean()
    for dr in range(-radius, radius + 1):
        for dc in range(-radius, radius + 1):
            b = np.roll(truth, (dr, dc), axis=(0, 1))[region]
            b = b - b.mean()
            score = float(a @ b) / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12)
            if score > best_score:
                best, best_score = (dr, dc), score
    return best


def load_scan(seed: int, kind: str, cache: Path, aif_cache: Path | None = None) -> ScanInputs:
    """Cached chain intermediates of one scan and the simulator's truth on the same grid.

    ``aif_cache``: a folder of ``{seed}_{kind}_aif.npz`` files whose AIF (``aif_time``, ``aif_blood``,
    ``aif_foot``, optional ``aif_sample_time`` / ``aif_sample_blood``: the curve at the AIF's acquisition
    times, as ``AifCurve.sample_*``) replaces the cached chain AIF: an AIF variant on the same tissue
    curves and masks."""
    import scipy.ndimage as ndi

    from perfline.simulator import study as simulated
    from perfline.toolbox.mbf_evaluation import truth_from_simulator
    from perfline.toolbox.resample import resample_series

    data = dict(np.load(cache / f"{seed}_{kind}.npz"))
    if aif_cache is not None:
        data.update(np.load(aif_cache / f"{seed}_{kind}_aif.npz"))
    samples = ((np.asarray(data["aif_sample_time"], dtype=np.float64), np.asarray(data["aif_sample_blood"], dtype=np.float64))
               if "aif_sample_time" in data else None)
    study = simulated.sample_study(seed, kind=kind)
    grid = data["time0"]
    aif_time, aif_blood = simulated.aif_gd_truth(study)
    true_aif = np.interp(grid, aif_time, aif_blood)
    chain_aif = np.interp(grid, data["aif_time"], data["aif_blood"])
    chain_foot_s = float(data["aif_foot_time"]) if "aif_foot_time" in data \
        else float(data["aif_time"][int(data["aif_foot"])])
    chain_aif[grid < chain_foot_s] = 0.0
    chain_gd, true_gd, cnn, true, true_mbf, shifts, slice_times = [], [], [], [], [], [], []
    for index in range(study.n_slices):
        phantom = simulated.slice_phantom(study, index)
        gd = data[f"gd{index}"].astype(np.float64)
        if not np.allclose(data[f"time{index}"], grid):
            raise ValueError(f"seed {seed} {kind}: slice {index} is not on the grid of slice 0")
        truth_gd = resample_series(phantom.gd.astype(np.float64), phantom.time_s, grid)
        labels = phantom.anatomy.labels
        region = ndi.binary_dilation(labels > 0, iterations=8)
        shift = _best_shift(gd.mean(axis=0), truth_gd.mean(axis=0), region)
        roll = lambda a: np.roll(a, shift, axis=(-2, -1))  # noqa: E731
        centre = phantom.anatomy.lv_center_rc
        chain_gd.append(gd)
        true_gd.append(roll(truth_gd))
        cnn.append((data[f"labels{index}"], tuple(data[f"lvc{index}"]), float(data[f"rvi{index}"])))
        true.append((roll(labels).astype(np.uint8), (centre[0] + shift[0], centre[1] + shift[1]),
                     float(phantom.anatomy.rv_insertion_deg)))
        true_mbf.append(roll(phantom.mbf.astype(np.float64)))
        shifts.append(shift)
        slice_times.append(np.asarray(phantom.time_s, dtype=np.float64))
    return ScanInputs(seed=seed, kind=kind, grid_s=grid, hematocrit=float(data["hematocrit"]), chain_aif=chain_aif,
                      true_aif=true_aif, true_aif_samples=(aif_time, aif_blood), chain_gd=chain_gd, true_gd=true_gd,
                      cnn=cnn, true=true, true_mbf=true_mbf, levels=tuple(study.levels), shift_rc=shifts,
                      truth=truth_from_simulator(study), slice_times=slice_times, chain_aif_samples=samples,
                      chain_aif_foot_s=chain_foot_s)


# ------------------------------------------------------------------------------ attribution
def fit_slice(gd: np.ndarray, blood_aif: np.ndarray, hematocrit: float, dt_s: float, mask: np.ndarray,
              table_cache: dict, flow_map: FlowMapSettings, *,
              fine_blood_aif: tuple[np.ndarray, int] | None = None,
              sampling: tuple[np.ndarray, np.ndarray] | None = None,
              labels: np.ndarray | None = None, slice_index: int = 0) -> np.ndarray:
    """MBF map (ml/min/g) [rows, cols] of one slice as ``flow-map`` fits it (BTEX with the gadget's
    ``flow_map`` settings, tissue baseline = mean before the AIF foot). ``fine_blood_aif`` = (blood
    AIF on a k times finer grid, k): the table is built from it (``btex.build_aif_table(upsample=k)``);
    with ``sampling`` = (grid s [T], the slice's acquisition times s) too, the table is flow-map's with
    ``aif_upsample = k``: its curves sampled like the slice (``btex.sampled_aif_table``). With
    ``flow_map.simex_pairs`` and ``labels`` the SIMEX correction as flow-map applies it to slice ``slice_index``."""
    from perfline.gadgets.mapping import FlowMap, _btex_settings, simex_options
    from perfline.toolbox.aif import aif_foot_peak
    from perfline.toolbox.btex import blood_pool_curves, build_aif_table, fine_table_curves, map_btex, \
        sampled_aif_table, spillover_reach, tissue_sampling

    settings = _btex_settings(flow_map)
    plasma = blood_aif / (1.0 - hematocrit)
    key = plasma.tobytes() if fine_blood_aif is None else (fine_blood_aif[0].tobytes(), fine_blood_aif[1])
    if sampling is not None and fine_blood_aif is not None:
        upsample = fine_blood_aif[1]
        settings = FlowMap(flow_map.model_copy(update={"aif_upsample": upsample}))._sampled_settings(dt_s)
        if key not in table_cache:
            table_cache[key] = fine_table_curves(fine_blood_aif[0] / (1.0 - hematocrit), dt_s / upsample, settings)
        curves = table_cache[key]
        key = (key, sampling[1].tobytes())
        if key not in table_cache:
            table_cache[key] = sampled_aif_table(curves, dt_s / upsample, tissue_sampling(*sampling, upsample),
                                                 settings)
    elif key not in table_cache:
        if fine_blood_aif is None:
            table_cache[key] = build_aif_table(plasma, dt_s, settings)
        else:
            table_cache[key] = build_aif_table(fine_blood_aif[0] / (1.0 - hematocrit), dt_s, settings,
                                               upsample=fine_blood_aif[1])
    foot, _ = aif_foot_peak(blood_aif)
    tissue = gd - gd[: max(foot, 1)].mean(axis=0)
    spillover = reach = None
    if flow_map.spillover_labels and labels is not None:
        spillover, kept = blood_pool_curves(tissue, labels, flow_map.spillover_labels)
        # as flow-map: no pool kept, no spill-over term (spillover_reach gives None for no pool)
        reach = spillover_reach(labels, kept, flow_map.spillover_reach_px)
        if not kept:
            spillover = None
    simex = simex_options(flow_map, labels, slice_index) if flow_map.simex_pairs and labels is not None else None
    maps = map_btex(tissue, plasma, dt_s, mask=mask, settings=settings, delay_smoothing_px=flow_map.delay_smoothing_px,
                    delay_prior_sd_s=flow_map.delay_prior_sd_s,
                    delay_prefit_erosion_px=flow_map.delay_prefit_erosion_px,
                    delay_prefit_erosion_shape=flow_map.delay_prefit_erosion_shape,
                    aif_table=table_cache[key], spillover_curves=spillover, spillover_masks=reach, simex=simex)
    return maps.mbf_ml_min_g.astype(np.float64)


def summarise(mbf: list[np.ndarray], segmentation: list[tuple[np.ndarray, tuple[float, float], float]],
              levels: tuple[str, ...], global_statistic: str = "sectors", *,
              place_rv: bool = False, report_settings: ReportSettings | None = None) -> tuple[float, np.ndarray]:
    """(global, [16] sector) MBF as ``perfline evaluate --mbf`` takes them from the report
    (``build_report`` defaults: sector medians without the border ring and the fit-limit pixels,
    failing slices dropped; ``study_mbf_from_report``: global from the sector medians), or with
    ``global_statistic="report-median"`` the report's global median (the evaluation before 2026-11-26 21:00).
    ``place_rv``: the RV insertions placed across the slices as ``aha-report`` does since 2026-11-26
    (``place_rv_insertions``, default settings; for the CNN's labels; the true labels keep the truth's).
    ``report_settings``: ``aha_report.ReportSettings`` of the report (default: its defaults)."""
    from perfline.toolbox.aha_report import SliceAnalysis, build_report, place_rv_insertions
    from perfline.toolbox.mbf_evaluation import study_mbf_from_report

    slices = [SliceAnalysis(slice_index=i, mbf_ml_min_g=m, labels=labels, lv_center_rc=centre, rv_insertion_deg=rvi)
              for i, (m, (labels, centre, rvi)) in enumerate(zip(mbf, segmentation))]
    if place_rv:
        slices = place_rv_insertions(slices, list(levels))
    report = build_report(slices, levels=list(levels), settings=report_settings)
    study = study_mbf_from_report(report.model_dump())
    value = study.global_mbf
    if global_statistic == "report-median":
        median = report.global_values.mbf_median_ml_min_g
        value = np.nan if median is None else median
    return value, np.asarray(study.segment_mbf, dtype=np.float64)


def fine_chain_aif(sample_time_s: np.ndarray, blood: np.ndarray, grid_s: np.ndarray, upsample: int,
                   smoothing: str, arrival_s: float) -> np.ndarray:
    """A chain AIF's acquired samples on flow-map's fine grid, as flow-map builds its sampled table: the
    spline (``smoothing``) of ``btex.aif_on_fine_grid``, zero before the AIF's arrival ``arrival_s`` (s)."""
    from perfline.toolbox.btex import aif_on_fine_grid, fine_grid

    fine = aif_on_fine_grid(sample_time_s, blood, grid_s, upsample, smoothing=smoothing)
    fine[fine_grid(grid_s, upsample) < arrival_s] = 0.0
    return fine


def fit_and_summarise(scan: ScanInputs, series: Sequence[np.ndarray], blood_aif: np.ndarray,
                      fine_blood_aif: tuple[np.ndarray, int] | None,
                      segmentation: list[tuple[np.ndarray, tuple[float, float], float]], flow_map: FlowMapSettings,
                      *, place_rv: bool, global_statistic: str = "sectors", tissue_sampling: bool = True,
                      tables: dict | None = None, report_settings: ReportSettings | None = None
                      ) -> tuple[float, np.ndarray]:
    """(global, [16] sector) MBF of one scan: every slice's ``series`` fitted by :func:`fit_slice` with the
    labels of ``segmentation`` (its table sampled at the slice's acquisition times when ``tissue_sampling``
    and a fine AIF are given), summarised by :func:`summarise` (with ``report_settings``). ``tables``:
    :func:`fit_slice`'s table cache, to share between calls with the same AIF."""
    dt_s = float(np.mean(np.diff(scan.grid_s)))
    tables = {} if tables is None else tables
    maps = []
    for index, (labels, _, _) in enumerate(segmentation):
        sampled = (scan.grid_s, scan.slice_times[index]) if (tissue_sampling and fine_blood_aif is not None) else None
        maps.append(fit_slice(series[index], blood_aif, scan.hematocrit, dt_s, labels == 2, tables, flow_map,
                              fine_blood_aif=fine_blood_aif, sampling=sampled, labels=labels, slice_index=index))
    return summarise(maps, segmentation, scan.levels, global_statistic, place_rv=place_rv,
                     report_settings=report_settings)


def errors_pct(scan: ScanInputs, global_mbf: float, sectors: np.ndarray) -> tuple[float, float]:
    """(global error %, mean abs sector error % over the sectors found) against the scan's truth."""
    truth = np.asarray(scan.truth.segment_mbf, dtype=np.float64)
    found = np.isfinite(sectors) & np.isfinite(truth)
    return (100.0 * (global_mbf / float(scan.truth.global_mbf) - 1.0),
            float(np.mean(np.abs(sectors[found] / truth[found] - 1.0)) * 100.0))


COMBINATIONS = [  # (AIF, tissue Gd, mask)
    ("chain", "chain", "cnn"), ("true", "chain", "cnn"), ("chain", "true", "cnn"), ("true", "true", "cnn"),
    ("chain", "chain", "true"), ("true", "chain", "true"), ("chain", "true", "true"), ("true", "true", "true"),
    ("true", "true+noise", "true"),
]


def attribute_scan(scan: ScanInputs, rng: np.random.Generator, flow_map: FlowMapSettings,
                   global_statistic: str = "sectors",
                   combinations: Sequence[tuple[str, str, str]] = COMBINATIONS,
                   aif_upsample: int = 1, tissue_sampling: bool = False) -> dict[str, object]:
    """Global / sector errors (%) of every combination and the oracle statistic for one scan.

    ``aif_upsample = k > 1``: the TRUE AIF's table is built from its acquired samples by a cubic
    spline on a k times finer grid (``btex.aif_on_fine_grid``, ``build_aif_table(upsample=k)``)
    instead of their linear interpolation onto the grid; the chain AIF's too where the cache holds its
    samples (``--aif-cache``; zero before its foot, as ``flow-map``), else its grid curve;
    ``tissue_sampling``: and its table curves are sampled at each slice's acquisition times and
    interpolated onto the grid (flow-map's ``aif_upsample``, ``btex.sampled_aif_table``)."""
    from perfline.toolbox.btex import aif_on_fine_grid, noise_sd

    truth_global = float(scan.truth.global_mbf)
    truth_sectors = np.asarray(scan.truth.segment_mbf, dtype=np.float64)
    tables: dict = {}
    row: dict[str, object] = {"seed": scan.seed, "kind": scan.kind, "truth": truth_global,
                              "shift": [list(s) for s in scan.shift_rc]}

    def errors(name: str, global_value: float, sectors: np.ndarray) -> None:
        paired = np.isfinite(sectors) & np.isfinite(truth_sectors)
        row[name] = 100.0 * (global_value / truth_global - 1.0)
        row[name + " sectors"] = float(np.mean(np.abs(sectors[paired] / truth_sectors[paired] - 1.0)) * 100.0)
        row[name + " sector bias"] = float(np.mean(sectors[paired] - truth_sectors[paired]))

    # inputs: AIF area and tissue-curve area against the truth
    row["aif area"] = 100.0 * (scan.chain_aif.sum() / scan.true_aif.sum() - 1.0)
    row["aif peak"] = 100.0 * (scan.chain_aif.max() / scan.true_aif.max() - 1.0)
    chain_sum = true_sum = 0.0
    before = slice(0, max(int(np.argmax(scan.true_aif > 0.05 * scan.true_aif.max())), 1))  # before the bolus foot
    for gd, tgd, (labels, _, _) in zip(scan.chain_gd, scan.true_gd, scan.cnn):
        core = _core(labels == 2)
        # after the baseline subtraction flow-map does (the chain's Gd has a constant offset of
        # 0.01-0.1 mmol/L before the bolus, larger at 1.5 T)
        chain_sum += (gd[:, core] - gd[before][:, core].mean(axis=0)).sum()
        true_sum += (tgd[:, core] - tgd[before][:, core].mean(axis=0)).sum()
    row["tissue area (cnn core)"] = 100.0 * (chain_sum / true_sum - 1.0)
    row["tissue baseline"] = float(np.mean([gd[before][:, _core(labels == 2)].mean()
                                            for gd, (labels, _, _) in zip(scan.chain_gd, scan.cnn)]))
    for source, segmentation in (("cnn", scan.cnn), ("true", scan.true)):
        errors(f"oracle {source}", *summarise(scan.true_mbf, segmentation, scan.levels, global_statistic,
                                              place_rv=source == "cnn"))
    noise = float(np.median(np.concatenate([noise_sd(gd[:, labels == 2].T) for gd, (labels, _, _)
                                            in zip(scan.chain_gd, scan.cnn)])))
    row["tissue noise sd"] = noise
    fine_true = None
    fine_chain = None
    if aif_upsample > 1:
        # as flow-map builds its table (FlowMapSettings allows aif_smoothing only with aif_upsample > 1)
        smoothing = flow_map.aif_smoothing
        fine_true = (aif_on_fine_grid(*scan.true_aif_samples, scan.grid_s, aif_upsample, smoothing=smoothing),
                     aif_upsample)
        if scan.chain_aif_samples is not None:
            fine_chain = (fine_chain_aif(*scan.chain_aif_samples, scan.grid_s, aif_upsample, smoothing,
                                         scan.chain_aif_foot_s), aif_upsample)
    for aif_name, gd_name, mask_name in combinations:
        aif = scan.chain_aif if aif_name == "chain" else scan.true_aif
        fine = fine_true if aif_name == "true" else fine_chain
        segmentation = scan.cnn if mask_name == "cnn" else scan.true
        series = list(scan.chain_gd if gd_name == "chain" else scan.true_gd)
        if gd_name == "true+noise":
            series = [gd + rng.normal(0.0, noise, gd.shape) for gd in series]
        errors(f"{aif_name} AIF / {gd_name} Gd / {mask_name} mask",
               *fit_and_summarise(scan, series, aif, fine, segmentation, flow_map, place_rv=mask_name == "cnn",
                                  global_statistic=global_statistic, tissue_sampling=tissue_sampling, tables=tables))
    return row


def _core(myocardium: np.ndarray) -> np.ndarray:
    """The myocardium without its border ring, as the report analyses it."""
    from perfline.toolbox.aha_report import _myocardial_core

    return _myocardial_core(myocardium, 1)


def attribute(seeds: range, cache: Path, json_path: Path | None, flow_map: FlowMapSettings,
              global_statistic: str, combinations: Sequence[tuple[str, str, str]], aif_upsample: int = 1,
              tissue_sampling: bool = False, aif_cache: Path | None = None) -> int:
    """Print the per-scan table of global errors (%) and the mean signed / absolute error per scan kind."""
    rng = np.random.default_rng(0)
    rows = []
    for seed in seeds:
        for kind in KINDS:
            started = time.perf_counter()
            rows.append(attribute_scan(load_scan(seed, kind, cache, aif_cache), rng, flow_map, global_statistic, combinations,
                                       aif_upsample, tissue_sampling))
            logger.info("seed %d %s: %.1f s", seed, kind, time.perf_counter() - started)
    columns = ["oracle cnn", "oracle true"] + [f"{a} AIF / {g} Gd / {m} mask" for a, g, m in combinations]
    print("global MBF error, % (auto / truth - 1); AIF area, tissue area (CNN core without its border ring, "
          "baseline-subtracted) in % against the truth; tissue baseline: chain Gd before the bolus, mmol/L")
    header = ["scan", "truth", "aif area", "tissue area (cnn core)", "tissue baseline"] + columns
    print(" | ".join(header))
    for row in rows:
        print(" | ".join([f"{row['seed'] - 2**30} {row['kind']}", f"{row['truth']:.2f}"] +
                         [f"{row[c]:+.3f}" if c == "tissue baseline" else f"{row[c]:+.1f}" for c in header[2:]]))
    for kind in KINDS + ("all",):
        chosen = [r for r in rows if kind in ("all", r["kind"])]
        for stat, fn in (("mean", np.mean), ("mean abs", lambda v: np.mean(np.abs(v)))):
            print(" | ".join([f"{kind} {stat}", ""] + [f"{fn([r[c] for r in chosen]):+.3f}" if c == "tissue baseline"
                                                       else f"{fn([r[c] for r in chosen]):+.1f}" for c in header[2:]]))
        print(" | ".join([f"{kind} sectors mean abs", "", "", "", ""] +
                         [f"{np.mean([r[c + ' sectors'] for r in chosen]):.1f}" for c in columns]))
    if json_path is not None:
        json_path.write_text(json.dumps(rows, indent=1, default=float))
    return 0


def aif_tail(seeds: range, cache: Path, aif_cache: Path | None = None) -> int:
    """Print the cached chain AIF's late tail, peak and area against the simulator's LV blood Gd.

    Tail = mean of the last 10 grid samples. Two references: the truth itself, and the truth minus
    its own mean over the chain's baseline frames (1 .. foot), i.e. with the baseline convention of
    ``aif-extract``. Until 2026-11-26 22:20 (``2e11cff``) the simulator's LV blood held 0.02-0.08
    mmol/L before the bolus foot (a logistic plateau term), which the chain's baseline subtraction
    removes; its blood curves are causal now, so the two references differ only where the chain's
    foot lies after the true one (the last baseline frame then holds some Gd). ``aif_cache``: the AIF
    variant of ``{seed}_{kind}_aif.npz`` there instead of the cached chain AIF (as ``attribute``).
    """
    from perfline.simulator import study as simulated

    rows = []
    print("scan | tail / truth | tail / (truth - its pre-foot mean) | peak / truth | area / truth")
    for seed in seeds:
        for kind in KINDS:
            data = dict(np.load(cache / f"{seed}_{kind}.npz"))
            if aif_cache is not None:
                data.update(np.load(aif_cache / f"{seed}_{kind}_aif.npz"))
            aif_time, aif_blood = simulated.aif_gd_truth(simulated.sample_study(seed, kind=kind))
            truth = np.interp(data["aif_time"], aif_time, aif_blood)
            chain = np.asarray(data["aif_blood"], dtype=np.float64)
            foot = int(data["aif_foot"])
            pre_foot = float(truth[min(1, foot): foot + 1].mean())
            row = (chain[-10:].mean() / truth[-10:].mean(), chain[-10:].mean() / (truth[-10:].mean() - pre_foot),
                   chain.max() / truth.max(), chain.sum() / truth.sum())
            rows.append(row)
            print(f"{seed - 2**30} {kind} | " + " | ".join(f"{value:.3f}" for value in row))
    values = np.asarray(rows)
    for name, column in zip(("tail / truth", "tail / (truth - pre-foot)", "peak / truth", "area / truth"), values.T):
        print(f"{name}: mean {column.mean():.3f}, SD {column.std():.3f}, range {column.min():.2f} .. {column.max():.2f}, "
              f"mean |x - 1| {np.abs(column - 1).mean():.3f}")
    return 0


def rise_time_s(time_s: np.ndarray, curve: np.ndarray, fraction: float, baseline_samples: int = 5) -> float:
    """First time (s) a curve, less the mean of its first ``baseline_samples``, reaches ``fraction`` of its
    peak, linearly interpolated between the samples around the crossing."""
    values = np.asarray(curve, dtype=np.float64)
    values = values - values[:baseline_samples].mean()
    peak = int(np.argmax(values))
    level = fraction * values[peak]
    k = int(np.nonzero(values[: peak + 1] >= level)[0][0])
    if k == 0:
        return float(time_s[0])
    return float(time_s[k - 1] + (level - values[k - 1]) / (values[k] - values[k - 1]) * (time_s[k] - time_s[k - 1]))


RISE_FRACTIONS = (0.1, 0.2, 0.5)


def tissue_arrival(seeds: range, cache: Path) -> int:
    """How early the chain's tissue rises (docs/mapping.md "Session 27"): per scan, the mean Gd curve over the
    report's core of the CNN myocardium (eroded 1 px, on the chain's own frames) against the phantom's over the
    TRUE core, the difference of their rise times at 10 / 20 / 50 % of the peak (s, negative = the chain's curve
    rises first; slice mean), with the simulator's tissue delay. Comparing over the TRUE core instead is biased:
    the chain registers the frames to the series' own reference and the cache aligns them to the truth by whole
    pixels, so the TRUE core sits up to half a pixel off and holds blood."""
    from perfline.simulator import study as simulated
    from perfline.toolbox.aha_report import _myocardial_core

    rows = []
    print("scan | tissue delay s | rise chain - truth at " + " / ".join(f"{int(100 * f)} %" for f in RISE_FRACTIONS)
          + " (s)")
    for seed in seeds:
        for kind in KINDS:
            scan = load_scan(seed, kind, cache)
            delay = float(simulated.sample_study(seed, kind=kind).tissue.delay_s)
            shifts = []
            for chain_gd, true_gd, (labels, _, _), (true_labels, _, _) in zip(scan.chain_gd, scan.true_gd, scan.cnn,
                                                                             scan.true):
                chain = chain_gd[:, _myocardial_core(labels == 2, 1)].mean(axis=1)
                truth = true_gd[:, _myocardial_core(true_labels == 2, 1)].mean(axis=1)
                shifts.append([rise_time_s(scan.grid_s, chain, f) - rise_time_s(scan.grid_s, truth, f)
                               for f in RISE_FRACTIONS])
            shift = np.mean(shifts, axis=0)
            rows.append((kind, delay, shift))
            print(f"{seed - 2**30} {kind} | {delay:.2f} | " + " / ".join(f"{v:+.3f}" for v in shift))
    for kind in KINDS:
        kept = [(d, s) for k, d, s in rows if k == kind]
        if not kept:
            continue
        delays = np.array([d for d, _ in kept])
        shifts = np.array([s for _, s in kept])
        slope = float(np.polyfit(delays, shifts[:, 1], 1)[0]) if len(kept) > 2 and np.ptp(delays) > 0 else float("nan")
        print(f"{kind} ({len(kept)} scans): mean " + " / ".join(f"{v:+.3f}" for v in shifts.mean(axis=0))
              + f" s; at 20 %: {slope:+.3f} s per s of tissue delay")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("prepare", "attribute", "aif-tail", "tissue-arrival"))
    parser.add_argument("--first-seed", type=int, default=2**30)
    parser.add_argument("--studies", type=int, default=8)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--keep-mrd", action="store_true", help="prepare: keep the simulated MRD files")
    parser.add_argument("--noise-free", action="store_true", help="prepare: k-space simulated without noise")
    parser.add_argument("--chains", type=Path, default=None, help=(
        "prepare: chain directory whose perfusion.toml replaces the shipped one (a settings variant)"))
    from recon_oracles import ORACLES

    parser.add_argument("--oracle", choices=ORACLES, default=None, help=(
        "prepare: the myocardial recon by a lab oracle (benchmarks/recon_oracles.py): TSENSE with the TRUE coil "
        "maps (-masked: zeroed where the chain's calibration masks), or the image-domain frames (noise-free only; "
        "'image-unwarped' with a chain whose moco is off)"))
    parser.add_argument("--json", type=Path, default=None, help="attribute: also write the rows as JSON")
    parser.add_argument("--flow-map", default="{}", help=(
        "attribute: flow-map settings to change, JSON (e.g. '{\"coarse_stride\": [2, 2, 2, 2, 2], \"n_starts\": 3}')"))
    parser.add_argument("--global-statistic", choices=("sectors", "report-median"), default="sectors", help=(
        "attribute: global MBF as perfline evaluate --mbf takes it (pixel-weighted sector medians) or the "
        "report's global median (before 2026-11-26)"))
    parser.add_argument("--chain-only", action="store_true", help="attribute: only the chain's own inputs")
    parser.add_argument("--true-aif-only", action="store_true", help=(
        "attribute: only the rows with the true AIF (true AIF with chain Gd / CNN mask, true Gd, true + noise)"))
    parser.add_argument("--aif-upsample", type=int, default=1, help=(
        "attribute: build the TRUE AIF's BTEX table from its acquired samples, cubic spline on a k times finer "
        "grid (btex.aif_on_fine_grid); 1 = linear onto the grid, as the chain"))
    parser.add_argument("--tissue-sampling", action="store_true", help=(
        "attribute, with --aif-upsample k > 1: the true AIF's table curves are also sampled at each slice's "
        "acquisition times and interpolated onto the grid (flow-map aif_upsample = k)"))
    parser.add_argument("--aif-cache", type=Path, default=None, help=(
        "attribute, aif-tail: replace the cached chain AIF by {seed}_{kind}_aif.npz from this folder (an AIF variant; "
        "with its acquired samples, --aif-upsample applies to it too)"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for name in ("perfline", "numba", "openvino"):
        logging.getLogger(name).setLevel(logging.WARNING)
    args.cache.mkdir(parents=True, exist_ok=True)
    seeds = range(args.first_seed, args.first_seed + args.studies)
    if args.command == "prepare":
        for seed in seeds:
            for kind in KINDS:
                prepare_scan(seed, kind, args.cache, keep_mrd=args.keep_mrd, chains=args.chains,
                             noise_free=args.noise_free, oracle=args.oracle)
        return 0
    if args.command == "aif-tail":
        return aif_tail(seeds, args.cache, args.aif_cache)
    if args.command == "tissue-arrival":
        return tissue_arrival(seeds, args.cache)
    from perfline.gadgets.mapping import FlowMapSettings

    flow_map = FlowMapSettings(**json.loads(args.flow_map))
    combinations = COMBINATIONS[:1] if args.chain_only else COMBINATIONS
    if args.true_aif_only:
        combinations = [c for c in COMBINATIONS if c[0] == "true" and c in (
            ("true", "chain", "cnn"), ("true", "true", "true"), ("true", "true+noise", "true"))]
    return attribute(seeds, args.cache, args.json, flow_map, args.global_statistic, combinations, args.aif_upsample,
                     args.tissue_sampling, args.aif_cache)


if __name__ == "__main__":
    raise SystemExit(main())
