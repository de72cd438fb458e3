"""Benchmark of perfusion preprocessing on simulated studies with known truth.

Prints (no assertions): per-stage times of the whole preprocessing of a 3-slice, 60-frame,
16-coil R=3 study, the recon NRMSE, the residual motion after motion correction, the Gd
accuracy at 1.5 and 3 T, the AIF peak error with and without T2* correction and the resampling
error on analytic curves, and the per-study Gd scale that PD frames left off the SR frames by motion
correction give (``--sections pd-scale``). Numbers go to docs/preprocessing.md.

    python benchmarks/bench_preprocessing.py [--seed 11] [--repeats 3] [--cache /tmp/perfline-bench]
    python benchmarks/bench_preprocessing.py --sections pd-scale [--pd-seeds 1073741824 ...]
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import time
from pathlib import Path

import ismrmrd
import ismrmrd.xsd as xsd
import numpy as np
from scipy import ndimage

from perfline.core.chain import resolve_chain
from perfline.core.gadget import ChainContext
from perfline.gadgets.perfusion_items import AifSeries, SliceSeries
from perfline.gadgets.perfusion_preprocessing import (
    AifT2StarCorrection,
    GdConversion,
    PerfusionMotionCorrection,
    SurfaceCoilCorrection,
    T2StarSettings,
    TemporalResample,
)
from perfline.gadgets.perfusion_recon import PerfusionRecon, PerfusionReconSettings
from perfline.server.client import dataset_items
from perfline.simulator import mrd, truth
from perfline.simulator import study as st
from perfline.simulator.image_study import coil_shading, image_slice
from perfline.simulator.motion import warp
from perfline.toolbox.gd_conversion import lookup_table, myocardial_gd
from perfline.toolbox.fft import centered_fft
from perfline.toolbox.interleaved_recon import reconstruct_compact
from perfline.toolbox.motion_correction import motion_correct_series
from perfline.toolbox.resample import resample_to_uniform
from perfline.toolbox import surface_coil
from perfline.toolbox.motion_correction import contrast_invariant_translation
from perfline.toolbox.surface_coil import coil_map_from_pd, normalize_by_pd


SECTIONS = ("timing", "recon", "chain-gd", "motion", "motion-real", "gd", "aif", "resample", "pd-scale")
DAUGS = Path("/work/shared/data/daugs/images")


def residual_motion_px(estimated: np.ndarray, truth_field: np.ndarray, mask: np.ndarray) -> float:
    """RMS residual heart motion (pixels) of pull-back fields [2, T, rows, cols], common offset removed."""
    rows, cols = np.indices(mask.shape, dtype=np.float64)
    residual = np.empty(estimated.shape, dtype=np.float64)
    for frame in range(estimated.shape[1]):
        where = [rows + estimated[0, frame], cols + estimated[1, frame]]
        for component in range(2):
            residual[component, frame] = estimated[component, frame] + ndimage.map_coordinates(
                truth_field[component, frame], where, order=1, mode="nearest")
    residual -= residual.mean(axis=1, keepdims=True)
    return float(np.sqrt(np.mean((residual[0] ** 2 + residual[1] ** 2)[:, mask])))


def simulator_version() -> str:
    """Short hash of the simulator's source (a cached study is stale once the simulator changes)."""
    import perfline.simulator
    import perfline.toolbox.bloch

    digest = hashlib.sha1()
    for path in sorted(Path(perfline.simulator.__file__).parent.glob("*.py")) + [Path(perfline.toolbox.bloch.__file__)]:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:10]


def make_study(seed: int, cache: Path, acceleration: int = 3) -> tuple[st.StudyParameters, Path, Path]:
    study = st.sample_study(seed, n_slices=3, n_frames=60, n_coils=16, acceleration=acceleration,
                            flow_model="fermi")
    cache.mkdir(parents=True, exist_ok=True)
    stem = f"study{seed}_r{acceleration}_{simulator_version()}"
    scan, truth_path = cache / f"{stem}.h5", cache / f"{stem}_truth.h5"
    if not scan.exists() or not truth_path.exists():
        phantoms = [st.slice_phantom(study, k) for k in range(study.n_slices)]
        mrd.write_kspace(study, str(scan), phantoms=phantoms)
        truth.write_truth(study, str(truth_path), phantoms=phantoms)
    return study, scan, truth_path


def run_stages(header_xml: str, acquisitions: list, *, t2star: bool = True,
               recon: PerfusionReconSettings | None = None,
               t2star_model: str = "per-frame", chain: str | None = None) -> tuple[dict[str, float], list]:
    """All preprocessing gadgets in chain order, timed per stage (seconds); gadget defaults unless given.
    ``chain``: every stage with the settings of that shipped chain (e.g. "perfusion"); the other keywords
    are then ignored."""
    context = ChainContext(header=xsd.CreateFromDocument(header_xml), header_xml=header_xml)
    chosen: dict = {}
    if chain is not None:
        chosen = {step.gadget.name: step.settings for step in resolve_chain(chain).gadgets}
    else:
        chosen["perfusion-recon"] = recon or PerfusionReconSettings()
        chosen["aif-t2star"] = T2StarSettings(enabled=t2star, r2star_model=t2star_model)
    times: dict[str, float] = {}
    started = time.perf_counter()
    items = list(PerfusionRecon(chosen.get("perfusion-recon"), context=context).process(iter(acquisitions)))
    times["recon (TSENSE, 3 slices + 2-echo AIF)"] = time.perf_counter() - started
    stages = [("motion correction", PerfusionMotionCorrection(chosen.get("perfusion-moco"), context=context)),
              ("AIF T2* correction", AifT2StarCorrection(chosen.get("aif-t2star"), context=context)),
              ("surface-coil SR/PD", SurfaceCoilCorrection(chosen.get("surface-coil-correction"), context=context)),
              ("SR/PD -> Gd (LUT)", GdConversion(chosen.get("gd-conversion"), context=context))]
    for label, gadget in stages:
        started = time.perf_counter()
        items = [gadget.process_item(item) if isinstance(item, gadget.accepts) else item for item in items]
        times[label] = time.perf_counter() - started
    started = time.perf_counter()
    items = list(TemporalResample(chosen.get("temporal-resample"), context=context).process(iter(items)))
    times["temporal resampling"] = time.perf_counter() - started
    return times, items


def _moving_masks(study: st.StudyParameters, index: int, n_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """(myocardium, LV blood pool) masks [time, rows, cols] moved with the simulated breathing."""
    phantom = st.slice_phantom(study, index)
    field = st.motion_fields(study, "myocardium", index, st.MYO_SHAPE, st.MYO_PIXEL_MM, phantom.anatomy.lv_center_rc)
    masks = []
    for label in (2, 1):
        inside = np.repeat((phantom.anatomy.labels == label)[None].astype(np.float32), n_frames, axis=0)
        masks.append(warp(inside, field) > 0.99)
    return masks[0], masks[1]


def _curve_errors(images: np.ndarray, reference: np.ndarray, mask: np.ndarray, n_pd: int) -> tuple[float, float]:
    """Relative error (%) of the peak and of the upslope (largest 2-frame central difference) of
    the mask-mean SR curve against the same curve of the reference."""
    frames = range(n_pd, images.shape[0])
    curve = np.array([images[t][mask[t]].mean() for t in frames])
    truth_curve = np.array([reference[t][mask[t]].mean() for t in frames])
    peak = 100 * (curve.max() / truth_curve.max() - 1)
    slope = 100 * (np.max(curve[2:] - curve[:-2]) / np.max(truth_curve[2:] - truth_curve[:-2]) - 1)
    return float(peak), float(slope)


def recon_accuracy(study: st.StudyParameters, items: list, label: str, settings: PerfusionReconSettings,
                   noise_sd: float) -> list[str]:
    """NRMSE of the TSENSE images against the noise-free fully sampled coil-combined truth, and
    the error of the myocardial and LV-blood SR curves (peak, upslope) that the filter might blur.

    The same recon is also run on noise-free k-space (undersampling + calibration + filter bias
    only), with the filter threshold of the noisy study's noise level.
    """
    lines = [f" {label}:"]
    slices = [item for item in items if isinstance(item, SliceSeries)]
    for item in slices:
        moving, sens = mrd._coil_series(study, "myocardium", item.slice_index, None)  # noqa: SLF001
        shading = np.sqrt(np.sum(np.abs(sens) ** 2, axis=0))
        reference = np.abs(moving[0]) * shading[None]
        body = reference.mean(axis=0) > 0.05 * reference.mean(axis=0).max()
        noisy = np.linalg.norm((item.data - reference)[:, body]) / np.linalg.norm(reference[:, body])
        # the same recon on noise-free k-space: undersampling artefacts, calibration, filter bias
        kspace = centered_fft(centered_fft(sens[None] * moving[0][:, None], axis=-2), axis=-1)
        offsets = np.arange(kspace.shape[0]) % study.acceleration
        compact = np.stack([kspace[t][:, offsets[t]::study.acceleration] for t in range(kspace.shape[0])])
        clean = reconstruct_compact(compact.astype(np.complex64), offsets, study.acceleration,
                                    virtual_coils=settings.virtual_coils or None, noise_sd=noise_sd,
                                    denoise_threshold=settings.denoise_threshold,
                                    denoise_patch_px=settings.denoise_patch_px,
                                    mask_fraction=settings.coil_mask_fraction)
        artefact = np.linalg.norm((clean - reference)[:, body]) / np.linalg.norm(reference[:, body])
        gain = float(np.median(item.data[:, body] / np.maximum(reference[:, body], 1e-9)))
        myocardium, pool = _moving_masks(study, item.slice_index, reference.shape[0])
        pd = item.n_pd_frames
        errors = [_curve_errors(images, reference, mask, pd) for mask in (myocardium, pool)
                  for images in (item.data, clean)]
        lines.append(f"  slice {item.slice_index}: NRMSE in the body {100 * noisy:.1f} % (noisy data, SNR "
                     f"{study.snr_blood_peak:.0f}; median gain {gain:.3f}); noise-free k-space {100 * artefact:.2f} %")
        lines.append("    SR curve error peak / upslope, noisy | noise-free: myocardium "
                     f"{errors[0][0]:+.1f} / {errors[0][1]:+.1f} % | {errors[1][0]:+.1f} / {errors[1][1]:+.1f} %; "
                     f"LV blood {errors[2][0]:+.1f} / {errors[2][1]:+.1f} % | {errors[3][0]:+.1f} / {errors[3][1]:+.1f} %")
    return lines


def chain_gd_accuracy(header_xml: str, acquisitions: list, truth_path: Path, n_pd: int) -> list[str]:
    """Myocardial Gd out of the whole preprocessing chain against the truth, with and without the
    recon's low-rank filter: pixel errors in the eroded myocardium and the peak and upslope
    (largest 2-sample central difference on the 0.5 s grid) of its median curve (the median,
    because a pixel of blood pool, 20 x the tissue Gd, shifts a mean a lot).

    The chain's series are motion corrected to their own reference position, which the truth
    anatomy only approximates (residual motion 0.1-0.3 px on this study), so the pixel errors
    include some misregistration; the comparison between the two recons is what matters.
    """
    reference = truth.read_truth(str(truth_path))
    lines = []
    for label, settings in (("low-rank filter on (default)", PerfusionReconSettings()),
                            ("filter off", PerfusionReconSettings(denoise_threshold=0.0))):
        _, items = run_stages(header_xml, acquisitions, recon=settings)
        parts = []
        for item in (i for i in items if isinstance(i, SliceSeries)):
            sl = reference.slices[item.slice_index]
            first = n_pd  # truth frames include the PD frames; the chain's Gd series does not
            times = sl.time_s[first:]
            mask = ndimage.binary_erosion(sl.labels == 2)
            truth_gd = np.stack([np.interp(item.time_s, times, sl.gd[first:, r, c])
                                 for r, c in zip(*np.nonzero(mask))], axis=1)
            gd = item.data[:, mask]
            absolute = np.median(np.abs(gd - truth_gd))
            curve, truth_curve = np.median(gd, axis=1), np.median(truth_gd, axis=1)
            peak = 100 * (curve.max() / truth_curve.max() - 1)
            slope = 100 * (np.max(curve[2:] - curve[:-2]) / np.max(truth_curve[2:] - truth_curve[:-2]) - 1)
            parts.append(f"slice {item.slice_index}: pixels median |error| {absolute:.3f} mmol/L (truth peak "
                         f"{truth_curve.max():.3f}); median curve peak {peak:+.1f} %, upslope {slope:+.1f} %")
        lines.append(f"  {label}:")
        lines.extend(f"    {part}" for part in parts)
    return lines


def motion_accuracy(seeds: list[int]) -> list[str]:
    """Residual heart motion (known fields, mid slice, image-domain simulation) of the default
    motion correction and of the same without its still-series decision (``still_series_px=0``,
    the method before it), and what each does to the motion-free series of the same study:
    motion introduced, the estimated motion and the still-series decision, and the RMS distance
    of the heart from the noise-free truth relative to the input's (> 1 = made worse)."""
    lines = []
    worst: dict[str, list[float]] = {}
    deep: dict[str, list[float]] = {}
    for seed in seeds:
        study = st.sample_study(seed, n_slices=3, n_frames=60, flow_model="fermi")
        sl = image_slice(study, 1)
        phantom = st.slice_phantom(study, 1)
        field = st.motion_fields(study, "myocardium", 1, st.MYO_SHAPE, st.MYO_PIXEL_MM, phantom.anatomy.lv_center_rc)
        true = field.displacement().transpose(1, 0, 2, 3)
        mask = sl.labels > 0
        pd = sl.n_pd_frames
        still = image_slice(study, 1, motion=False)
        clean = image_slice(study, 1, motion=False, noise=False)
        error_in = np.sqrt(np.mean((still.signal - clean.signal)[:, mask] ** 2))
        before = residual_motion_px(np.zeros_like(true[:, pd:]), true[:, pd:], mask)
        parts = []
        for label, options in (("default", {}), ("no still-series decision", {"still_series_px": 0.0})):
            started = time.perf_counter()
            result = motion_correct_series(sl.signal, n_pd_frames=pd, **options)
            seconds = time.perf_counter() - started
            after = residual_motion_px(result.displacement_px[:, pd:], true[:, pd:], mask)
            on_still = motion_correct_series(still.signal, n_pd_frames=pd, **options)
            jitter = residual_motion_px(on_still.displacement_px, np.zeros_like(true), mask)
            ratio = np.sqrt(np.mean((on_still.corrected - clean.signal)[:, mask] ** 2)) / error_in
            worst.setdefault(label, []).append(float(ratio))
            if study.breathing.amplitude_mm >= 11:
                deep.setdefault(label, []).append(after)
            parts.append(f"{label} {after:.2f} px ({seconds:.2f} s; estimated {result.heart_motion_px:.2f} px"
                         f"{', still' if result.still_series else ''}), motion-free: estimated "
                         f"{on_still.heart_motion_px:.2f} px{', still' if on_still.still_series else ''}, "
                         f"{jitter:.2f} px introduced, heart error x {ratio:.3f}")
        lines.append(f"  seed {seed}: breathing {study.breathing.amplitude_mm:.1f} mm, "
                     f"heart motion RMS {before:.2f} px")
        lines.extend(f"    {part}" for part in parts)
    for label, ratios in worst.items():
        worse = sum(ratio > 1.0005 for ratio in ratios)
        residual = f", deep breathing (>= 11 mm) max {max(deep[label]):.2f} px" if deep.get(label) else ""
        lines.append(f"  {label}: motion-free series made worse (x > 1.0005) {worse} of {len(ratios)}, "
                     f"max x {max(ratios):.3f}{residual}")
    return lines


def real_motion_estimates() -> list[str]:
    """The still-series decision on the 3 real DAUGS slices (evaluation only, nothing tuned on
    them): estimated motion and decision, and how many frames the correction moves without it.
    No truth: the slices' own motion is unknown."""
    import scipy.io

    lines = []
    for path in sorted(DAUGS.glob("*.mat")):
        series = np.moveaxis(scipy.io.loadmat(path)["final_img"], -1, 0).astype(np.float32)
        result = motion_correct_series(series)
        without = motion_correct_series(series, still_series_px=0.0)
        moved = int(np.count_nonzero(np.abs(without.displacement_px).max(axis=(0, 2, 3)) > 0))
        lines.append(f"  {path.stem} {series.shape}: estimated motion {result.heart_motion_px:.2f} px, "
                     f"{'still, left untouched' if result.still_series else 'corrected'}; without the "
                     f"decision {moved} of {len(series)} frames moved")
    return lines


def gd_accuracy() -> list[str]:
    lines = []
    for field in (1.5, 3.0):
        study = st.sample_study(4, n_slices=1, n_frames=60, field_strength_t=field, flow_model="fermi")
        phantom = st.slice_phantom(study, 0)
        for noise in (False, True):
            sl = image_slice(study, 0, motion=False, noise=noise)
            pd = sl.n_pd_frames
            sr = sl.signal[pd:]
            coil_map = coil_map_from_pd(sl.signal[:pd].mean(axis=0), box_size_px=5, guide=sr.mean(axis=0),
                                        guide_tolerance=0.05)
            gd = myocardial_gd(normalize_by_pd(sr, coil_map), study.myocardial_sequence)
            reference = phantom.gd[pd:]
            for name, mask in (("myocardium", sl.labels == 2),
                               ("eroded myocardium", ndimage.binary_erosion(sl.labels == 2))):
                inside = mask[None] & (reference >= 0.2) & (reference <= 6.0)
                relative = (gd[inside] - reference[inside]) / reference[inside]
                lines.append(f"  {field} T, {'noisy' if noise else 'noise-free'}, {name}: median |error| "
                             f"{100 * np.median(np.abs(relative)):.2f} %, median error "
                             f"{100 * np.median(relative):+.2f} % ({inside.sum()} pixel-frames)")
    return lines


def aif_peak(study: st.StudyParameters, items: list, truth_path: Path) -> float:
    aif = next(item for item in items if isinstance(item, AifSeries))
    _, anatomy = st.aif_phantom(study)
    pool = ndimage.binary_erosion(anatomy.labels == 1)
    curve = np.median(aif.data[0][:, pool], axis=1)
    reference = truth.read_truth(str(truth_path), load_series=False)
    return float(curve.max() / np.nanmax(reference.aif_gd) - 1)


def resampling_accuracy() -> str:
    rng = np.random.default_rng(0)
    times = np.cumsum(rng.uniform(0.6, 1.4, 60))
    times = np.delete(times, [20, 35, 36])  # missed triggers
    slope = rng.standard_normal((4, 5))
    data = 1.0 + slope[None] * times[:, None, None]
    grid, out = resample_to_uniform(data, times, 0.5)
    error = np.abs(out - (1.0 + slope[None] * grid[:, None, None])).max()
    return f"  linear curves, irregular stamps + 3 missed triggers: max error {error:.2e}"


def pd_scale(seeds: list[int]) -> list[str]:
    """Per-scan Gd scale of the myocardial core after motion correction, PD map as the chain makes
    it (PD frames as moco leaves them) / with the PD image aligned (surface-coil-correction
    ``align_pd``) / with the motion-free phantom's PD moved to where the SR frames sit (oracle).

    Noise-free image-domain series with breathing (``image_slice(noise=False)``), the chain's
    ``motion_correct_series``; truth and core (true myocardium eroded 1 px) moved to where the
    corrected SR frames sit, measured against the motion-free phantom by edge direction (same
    contrast); scale = slope of the baseline-subtracted core Gd on the truth's, 3 slices pooled.
    """
    lines = [" scan (field, breathing): scale plain / align_pd / oracle PD; PD-vs-SR shift per slice (px)"]
    for seed in seeds:
        for kind in ("stress", "rest"):
            study = st.sample_study(seed, kind=kind)
            table = lookup_table(study.myocardial_sequence, "myocardium", 10.0)
            shading = coil_shading(study)
            n_pd = study.n_pd_frames
            pooled: dict[str, tuple[list, list]] = {name: ([], []) for name in ("plain", "align", "oracle")}
            shifts = []
            for index in range(study.n_slices):
                phantom = st.slice_phantom(study, index)
                static = phantom.clean.astype(np.float64) * shading[None]
                moving = image_slice(study, index, noise=False, motion=True, shading=shading)
                corrected = motion_correct_series(moving.signal, n_pd_frames=n_pd).corrected.astype(np.float64)
                sr, pd = corrected[n_pd:], corrected[:n_pd].mean(axis=0)
                rows, cols = np.indices(pd.shape)
                centre = phantom.anatomy.lv_center_rc
                window = np.exp(-0.5 * ((rows - centre[0]) ** 2 + (cols - centre[1]) ** 2) / 15.0**2).astype(np.float32)
                where = contrast_invariant_translation(static[n_pd:].mean(axis=0)[None], sr.mean(axis=0), window)[0]
                truth = np.stack([surface_coil.translate_image(g, where) for g in phantom.gd[n_pd:]]).astype(np.float64)
                label = surface_coil.translate_image((phantom.anatomy.labels == 2).astype(np.float32), where)
                core = ndimage.binary_erosion(label > 0.5, iterations=1)
                pre = max(int(np.argmax(truth[:, core].mean(axis=1) > 1e-3)), 2)
                shift = surface_coil.pd_to_sr_translation(pd, sr)
                shifts.append(float(np.hypot(*shift)))
                for name, image in (("plain", pd), ("align", surface_coil.translate_image(pd, shift)),
                                    ("oracle", surface_coil.translate_image(static[:n_pd].mean(axis=0), where))):
                    pd_map = coil_map_from_pd(image, box_size_px=5, guide=sr.mean(axis=0), guide_tolerance=0.05)
                    gd = table.to_gd(sr / pd_map)[:, core]
                    pooled[name][0].append((gd - gd[:pre].mean(axis=0)).ravel())
                    pooled[name][1].append((truth[:, core] - truth[:pre][:, core].mean(axis=0)).ravel())
            scales = []
            for name in ("plain", "align", "oracle"):
                y, x = np.concatenate(pooled[name][0]), np.concatenate(pooled[name][1])
                scales.append(float(y @ x / (x @ x)))
            lines.append(f"  {seed} {kind:6s} ({study.field_strength_t} T, {study.breathing.amplitude_mm:.1f} mm): "
                         f"{scales[0]:.3f} / {scales[1]:.3f} / {scales[2]:.3f}; shifts "
                         + " ".join(f"{v:.2f}" for v in shifts))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/perfline-bench"))
    # 3, 11, 13: breathing 4-10 mm; 7, 52: deep breathing seen while developing the heart
    # translation; 131 ... 192: deep breathing (12-14 mm) held out until the heart translation
    # was fixed, then used to develop the still-series decision; 201 ... 272: motion-free twins
    # picked before the still-series decision was looked at (3-11 mm breathing); 301 ... 330:
    # the smallest breathing (3-5 mm, 4 with long breath holds), picked by amplitude from
    # seeds 300-339 before any result
    parser.add_argument("--motion-seeds", type=int, nargs="*",
                        default=[3, 11, 13, 7, 52, 131, 141, 154, 156, 162, 166, 179, 192,
                                 201, 213, 227, 239, 248, 255, 266, 272,
                                 301, 303, 311, 313, 314, 321, 324, 330])
    parser.add_argument("--pd-seeds", type=int, nargs="*", default=list(range(2**30, 2**30 + 8)),
                        help="pd-scale: study seeds (stress and rest of each; default the MBF reference studies)")
    parser.add_argument("--sections", nargs="*", default=list(SECTIONS), choices=SECTIONS,
                        help="what to measure (default: all)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    study, scan, truth_path = make_study(args.seed, args.cache)
    header_xml, stream = dataset_items(scan)
    acquisitions = [item for item in stream if isinstance(item, ismrmrd.Acquisition)]
    print(f"study seed {args.seed}: 3 slices, 60 SR + 3 PD frames, 16 coils, R=3, {study.field_strength_t} T, "
          f"{len(acquisitions)} acquisitions")
    items: list = []
    if "timing" in args.sections or "aif" in args.sections:
        runs, cpu = [], []
        load_before = os.getloadavg()
        for _ in range(args.repeats):
            started = time.process_time()
            times, items = run_stages(header_xml, acquisitions)
            cpu.append(time.process_time() - started)
            runs.append(times)
        load_after = os.getloadavg()
        print(f"per-stage wall time, median of {args.repeats} runs (s); load average (1 min) "
              f"{load_before[0]:.1f} before, {load_after[0]:.1f} after:")
        for stage in runs[0]:
            print(f"  {stage:40s} {np.median([r[stage] for r in runs]):6.2f}")
        print(f"  {'TOTAL':40s} {np.median([sum(r.values()) for r in runs]):6.2f}  "
              f"(process CPU time {np.median(cpu):.2f} s)")
    if "recon" in args.sections:
        _print_recon(study, header_xml, acquisitions)
    if "chain-gd" in args.sections:
        print("myocardial Gd out of the whole chain vs truth (eroded myocardium):")
        print("\n".join(chain_gd_accuracy(header_xml, acquisitions, truth_path, study.n_pd_frames)))
    if "motion" in args.sections:
        print(f"motion correction, residual heart motion (known fields, mid slice); load average "
              f"{os.getloadavg()[0]:.1f}:")
        print("\n".join(motion_accuracy(args.motion_seeds)))
    if "motion-real" in args.sections:
        print("motion correction on real DAUGS slices (signal, 30 frames, no PD frames):")
        print("\n".join(real_motion_estimates()))
    if "gd" in args.sections:
        print("Gd conversion (SR / guided PD map -> myocardial LUT), truth 0.2-6 mmol/L:")
        print("\n".join(gd_accuracy()))
    if "aif" in args.sections:
        _, uncorrected = run_stages(header_xml, acquisitions, t2star=False)
        # every preprocessing step with the shipped `perfusion` chain's settings
        _, shipped = run_stages(header_xml, acquisitions, chain="perfusion")
        print(f"AIF peak (LV pool median) vs truth: with T2* correction "
              f"{100 * aif_peak(study, items, truth_path):+.1f} % (gadget defaults: per-frame T2*), "
              f"{100 * aif_peak(study, shipped, truth_path):+.1f} % (the perfusion chain's settings), "
              f"without {100 * aif_peak(study, uncorrected, truth_path):+.1f} %")
    if "resample" in args.sections:
        print("temporal resampling:")
        print(resampling_accuracy())
    if "pd-scale" in args.sections:
        print(f"myocardial Gd scale after motion correction, PD frames as left / aligned / oracle; load average "
              f"{os.getloadavg()[0]:.1f}:")
        print("\n".join(pd_scale(args.pd_seeds)))


def _print_recon(study: st.StudyParameters, header_xml: str, acquisitions: list) -> None:
    print("recon NRMSE against the noise-free fully sampled truth (coil-combined, body mask):")
    context = ChainContext(header=xsd.CreateFromDocument(header_xml), header_xml=header_xml)
    noise = [item for item in acquisitions if item.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)]
    noise_sd = float(np.sqrt(np.mean(np.abs(np.concatenate([np.asarray(a.data) for a in noise], axis=1)) ** 2)))
    variants = [("previous default: no whitening, 16 coils, no filter",
                 PerfusionReconSettings(prewhiten=False, virtual_coils=0, denoise_threshold=0.0)),
                ("whitening, 8 virtual coils, no filter", PerfusionReconSettings(denoise_threshold=0.0)),
                ("chain default: whitening, 8 virtual coils, low-rank filter", PerfusionReconSettings())]
    for label, settings in variants:
        gadget = PerfusionRecon(settings, context=context)
        reconstructed = list(gadget.process(iter(acquisitions)))
        print("\n".join(recon_accuracy(study, reconstructed, label, settings, noise_sd)))


if __name__ == "__main__":
    main()
