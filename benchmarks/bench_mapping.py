"""Mapping benchmarks: speed per slice, and the QPerf example maps.

    python benchmarks/bench_mapping.py speed [--repeats 3] [--rows 176 --cols 176 --frames 60]
    python benchmarks/bench_mapping.py qperf [--figure docs/mapping_qperf_examples.png]
    python benchmarks/bench_mapping.py accuracy [--seeds 6]
    python benchmarks/bench_mapping.py aif

``speed`` times ``map_fermi`` and ``map_btex`` on a simulated slice (every pixel enhances,
no mask) and a straightforward per-pixel ``scipy.optimize.least_squares`` fit of the same
models on a sample of pixels, and prints medians. ``qperf`` runs the offline mapping on
both QPerf examples and prints the median MBF over a myocardium proxy (no manual mask
ships with the data): pixels 1-5 pixels outside the LV blood pool (the connected region of
peak Gd >= 3 mmol/L at the image centre) whose own peak stays below 2 mmol/L.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

import numpy as np
import scipy.ndimage as ndi
import scipy.optimize

from perfline.commands.map import compute_maps
from perfline.toolbox import grid_refine
from perfline.toolbox import flow_models as fm
from perfline.toolbox.array_io import load_array
from perfline.toolbox.btex import BtexSettings, build_aif_table, map_btex, residue_table
from perfline.toolbox.fermi import map_fermi
from perfline.toolbox.grid_refine import warm_compiled_refinement

QPERF = Path("/work/shared/data/qperf/examples")
DT = 0.5


def _plasma(time_s: np.ndarray) -> np.ndarray:
    x = np.clip(time_s - 8.0, 0.0, None)
    bolus = x**3 * np.exp(-x / 1.5)
    return (5.0 * bolus / (4.5**3 * np.exp(-3.0)) + 0.4 * (1.0 - np.exp(-x / 8.0))) / (1.0 - 0.42)


def _aif(frames: int) -> np.ndarray:
    return _plasma(np.arange(frames) * DT)


def _slice(rows: int, cols: int, frames: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    r, c = np.meshgrid(np.linspace(0, 1, rows), np.linspace(0, 1, cols), indexing="ij")
    fp = 0.5 + 4.5 * c
    aif = _aif(frames)
    curves = fm.btex_tissue_curves(aif, DT, fp.ravel(), (0.8 + 1.7 * r).ravel(), 0.07, 0.25,
                                   (2.0 * r * c).ravel())
    series = curves.T.reshape(frames, rows, cols) + rng.normal(0.0, 0.02, (frames, rows, cols))
    return aif, series


def _median_time(function, repeats: int) -> tuple[float, float, float]:
    """Median and minimum wall time (the minimum is the least disturbed by other jobs) and the
    median CPU time of this process (all its threads: less sensitive to the shared load)."""
    times, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        function()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return float(np.median(times)), float(np.min(times)), float(np.median(cpu))


def _scipy_fermi(aif: np.ndarray, curve: np.ndarray) -> float:
    def residual(p):
        return fm.fermi_tissue_curves(aif, DT, p[0], p[1], p[2], p[3])[0] - curve
    fit = scipy.optimize.least_squares(residual, [1.5, 0.5, 3.0, 0.5], bounds=([0, 0.01, 0, 0], [10, 5, 20, 3]))
    return float(fit.x[0])


def _scipy_btex(aif: np.ndarray, curve: np.ndarray) -> float:
    def residual(p):
        return fm.btex_tissue_curves(aif, DT, p[0], p[1], p[2], p[3], p[4])[0] - curve
    fit = scipy.optimize.least_squares(residual, [1.5, 1.3, 0.07, 0.25, 0.5],
                                       bounds=([0.1, 0.35, 0.04, 0.1, 0], [6, 4, 0.1, 0.475, 3]))
    return float(fit.x[0])


def speed(args: argparse.Namespace) -> None:
    rng = np.random.default_rng(0)
    aif, series = _slice(args.rows, args.cols, args.frames, rng)
    pixels = args.rows * args.cols
    refinement = "numba " + grid_refine.numba.__version__ if grid_refine.numba is not None else "numpy arrays (no numba)"
    print(f"load average before: {' '.join(f'{x:.1f}' for x in os.getloadavg())} ({os.cpu_count()} CPUs); "
          f"BTEX refinement: {refinement}")
    start = time.perf_counter()
    residue_table(args.frames, DT, BtexSettings())
    table_s = time.perf_counter() - start
    compile_s = warm_compiled_refinement()
    print(f"slice {args.rows}x{args.cols} ({pixels} pixels, all fitted: every pixel enhances, no mask), "
          f"{args.frames} frames, dt {DT} s")
    print(f"BTEX residue table (once per frame count and dt, cached): {table_s:.2f} s; "
          f"compiled refinement ready (numba compile or cache load): {compile_s:.2f} s")
    fast, thorough = BtexSettings(), BtexSettings().thorough()
    start = time.perf_counter()
    table = build_aif_table(aif, DT, fast)
    print(f"per-AIF table (once per AIF, shared by the slices of a scan): {time.perf_counter() - start:.2f} s")
    map_btex(series[:, :8, :8], aif, DT, aif_table=table)  # first call: numba dispatch
    rows, cols = np.ogrid[: args.rows, : args.cols]
    radius = np.hypot(rows - args.rows / 2, cols - args.cols / 2)
    ring = (radius >= 20) & (radius < 28)
    timings = {
        "fermi": (_median_time(lambda: map_fermi(series, aif, DT), args.repeats), pixels),
        "btex (default: fast search, two passes with the smoothed-delay prior)":
            (_median_time(lambda: map_btex(series, aif, DT, aif_table=table), args.repeats), pixels),
        "btex (thorough search, two passes)":
            (_median_time(lambda: map_btex(series, aif, DT, settings=thorough, aif_table=table), args.repeats),
             pixels),
        "btex (default, one pass, free delay)":
            (_median_time(lambda: map_btex(series, aif, DT, delay_smoothing_px=0, aif_table=table), args.repeats),
             pixels),
        f"btex (default) on a myocardium-like ring mask ({int(ring.sum())} px)":
            (_median_time(lambda: map_btex(series, aif, DT, mask=ring, aif_table=table), args.repeats),
             int(ring.sum())),
    }
    # flow-map's fit in the chain (its grid and search) on the ring: the linear table of the grid AIF
    # (aif_upsample 1, built once per scan) or, with aif_upsample 4, per slice its sampled table
    # (acquired every 0.62 s; the fine table curves are built once per scan, in the background)
    from perfline.gadgets.mapping import FlowMap, FlowMapSettings, _btex_settings
    from perfline.toolbox.btex import aif_on_fine_grid, fine_table_curves, sampled_aif_table, tissue_sampling

    chain = _btex_settings(FlowMapSettings())
    grid = np.arange(args.frames) * DT
    acquired = -0.2 + 0.62 * np.arange(int((grid[-1] + 0.2) / 0.62) + 2)
    start = time.perf_counter()
    chain_table = build_aif_table(aif, DT, chain)
    print(f"flow-map linear table (once per scan): {time.perf_counter() - start:.2f} s")
    sampled_settings = FlowMap(FlowMapSettings(aif_upsample=4))._sampled_settings(DT)
    start = time.perf_counter()
    fine = fine_table_curves(aif_on_fine_grid(acquired, _plasma(acquired), grid, 4), DT / 4, sampled_settings)
    print(f"flow-map aif_upsample 4: fine table curves (once per scan): {time.perf_counter() - start:.2f} s")
    sampling = tissue_sampling(grid, acquired + 0.3, 4)
    timings[f"flow-map fit, linear table, ring ({int(ring.sum())} px)"] = (_median_time(
        lambda: map_btex(series, aif, DT, mask=ring, settings=chain, aif_table=chain_table), args.repeats),
        int(ring.sum()))
    timings[f"flow-map fit, aif_upsample 4: the slice's sampled table + fit, ring ({int(ring.sum())} px)"] = (
        _median_time(lambda: map_btex(series, aif, DT, mask=ring, settings=sampled_settings,
                                      aif_table=sampled_aif_table(fine, DT / 4, sampling, sampled_settings)),
                     args.repeats), int(ring.sum()))
    if grid_refine.numba is not None:  # the same fit with the numpy array refinement, for comparison
        compiled, grid_refine.numba = grid_refine.numba, None
        try:
            timings["btex (default, numpy array refinement instead of numba)"] = (
                _median_time(lambda: map_btex(series, aif, DT, aif_table=table), args.repeats), pixels)
        finally:
            grid_refine.numba = compiled
    curves = series.reshape(args.frames, -1).T
    sample = rng.choice(pixels, args.sample, replace=False)
    start = time.perf_counter()
    for index in sample:  # the straightforward reference: one optimiser run per pixel
        _scipy_fermi(aif, curves[index])
    scipy_fermi_per_pixel = (time.perf_counter() - start) / args.sample
    start = time.perf_counter()
    for index in sample[: max(args.sample // 4, 2)]:
        _scipy_btex(aif, curves[index])
    scipy_btex_per_pixel = (time.perf_counter() - start) / max(args.sample // 4, 2)
    for name, ((seconds, fastest, cpu), fitted) in timings.items():
        reference = scipy_fermi_per_pixel if name == "fermi" else scipy_btex_per_pixel
        print(f"{name}: {seconds:.2f} s per slice (median of {args.repeats}, min {fastest:.2f}; CPU {cpu:.2f} s); "
              f"{fitted} pixels "
              f"fitted, {1e6 * seconds / fitted:.1f} us per pixel; per-pixel scipy least_squares "
              f"{1e3 * reference:.1f} ms per pixel -> {reference * fitted / seconds:.0f}x faster")
    print(f"load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


def _myocardium_proxy(series_rct: np.ndarray) -> np.ndarray:
    peak = series_rct.max(axis=-1)
    labels, _ = ndi.label(peak >= 3.0)
    centre = tuple(np.array(peak.shape) // 2)
    pool = labels == labels[centre] if labels[centre] else labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1
    distance = ndi.distance_transform_edt(~pool)
    return (distance >= 1) & (distance <= 5) & (peak < 2.0)


def qperf(args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = (("rest", "", 22, 2.0), ("stress", "_stress", 19, 4.0))
    figure, axes = plt.subplots(2, 2, figsize=(10, 9))
    for row, (name, suffix, foot, high) in enumerate(cases):
        aif = load_array(str(QPERF / f"aif{suffix}.hdr"))
        series = load_array(str(QPERF / f"data{suffix}.hdr"))
        ring = _myocardium_proxy(series)
        for column, model in enumerate(("btex", "fermi")):
            start = time.perf_counter()
            maps = compute_maps(aif, series, DT, 0.42, foot, model)
            seconds = time.perf_counter() - start
            mbf = maps.mbf_ml_min_g
            values = mbf[ring & np.isfinite(mbf)]
            median = float(np.median(values))
            q1, q3 = np.percentile(values, [25, 75])
            print(f"{name} {model}: myocardium proxy ({values.size} px) median MBF {median:.2f} "
                  f"ml/min/g (IQR {q1:.2f}-{q3:.2f}); {seconds:.2f} s for {series.shape[0]}x{series.shape[1]}")
            axis = axes[row, column]
            image = axis.imshow(np.ma.masked_invalid(mbf), cmap="jet", vmin=0, vmax=high)
            axis.contour(ring, [0.5], colors="white", linewidths=0.6)
            axis.set_title(f"{name}, {model}: median {median:.2f} ml/min/g")
            axis.axis("off")
            figure.colorbar(image, ax=axis, label="MBF, ml/min/g", fraction=0.046)
    figure.suptitle("perfline map on QPerf's examples (white: myocardium proxy used for the medians)")
    figure.tight_layout()
    figure.savefig(args.figure, dpi=90)
    print(f"wrote {args.figure}")


def accuracy(args: argparse.Namespace) -> None:
    """Global bias and per-pixel median absolute error against simulated truth, per noise seed."""
    aif = _aif(60)
    rows = cols = 32
    r, c = np.meshgrid(np.linspace(0, 1, rows), np.linspace(0, 1, cols), indexing="ij")
    truth = {"fp": 0.5 + 4.5 * c, "ps": 0.8 + 1.7 * r, "vp": 0.04 + 0.06 * (1 - r * c),
             "visf": 0.15 + 0.2 * (0.5 + 0.5 * np.sin(3 * r)), "delay": 2.0 * (0.5 + 0.5 * np.cos(2 * r + c))}
    btex_clean = fm.btex_tissue_curves(aif, DT, *(truth[k].ravel() for k in ("fp", "ps", "vp", "visf", "delay")))
    rng = np.random.default_rng(7)
    n = rows * cols
    fermi_truth = (rng.uniform(0.5, 5.0, n), np.exp(rng.uniform(np.log(0.1), np.log(1.5), n)),
                   rng.uniform(1.0, 8.0, n), rng.uniform(0.0, 2.0, n))
    fermi_clean = fm.fermi_tissue_curves(aif, DT, *fermi_truth)
    print(f"MBF 0.5-5 ml/min/g, {n} pixels, tissue peak about 1 mmol/L; noise SD in mmol/L")
    thorough = BtexSettings().thorough()
    for noise in (0.0, 0.02, 0.03):
        for model in ("fermi", "btex", "btex-thorough"):
            biases, medians = [], []
            for seed in range(args.seeds if noise > 0 else 1):
                noise_field = np.random.default_rng(seed).normal(0.0, noise, (n, 60))
                if model == "fermi":
                    fitted = map_fermi(fermi_clean + noise_field, aif, DT).mbf_ml_min_g
                    reference = fermi_truth[0]
                else:
                    series = (btex_clean + noise_field).T.reshape(60, rows, cols)
                    settings = thorough if model == "btex-thorough" else BtexSettings()
                    fitted = map_btex(series, aif, DT, settings=settings).mbf_ml_min_g.ravel()
                    reference = truth["fp"].ravel()
                biases.append(np.nanmean(fitted) / reference.mean() - 1)
                medians.append(np.nanmedian(np.abs(fitted / reference - 1)))
            print(f"noise {noise:.2f} {model}: global bias mean {100 * np.mean(biases):+.1f} % "
                  f"(range {100 * min(biases):+.1f} to {100 * max(biases):+.1f} over {len(biases)} seeds); "
                  f"per-pixel median |error| {100 * np.mean(medians):.1f} %")


def aif_detection(args: argparse.Namespace) -> None:
    from perfline.toolbox.aif import detect_aif

    folder = Path("/work/shared/data/qperf/aif_detection")
    dices = []
    for example in (1, 2, 3):
        series = np.moveaxis(np.load(folder / f"example{example}" / "aif_scc.npy"), -1, 0)
        labels = np.load(folder / f"example{example}" / "aif_masks_final.npy")
        start = time.perf_counter()
        result = detect_aif(series)
        seconds = time.perf_counter() - start
        manual = labels == 1
        dice = 2 * np.sum(result.mask & manual) / (result.mask.sum() + manual.sum())
        rv_dice = 2 * np.sum(result.rv_mask & (labels == 2)) / (result.rv_mask.sum() + np.sum(labels == 2))
        dices.append(dice)
        print(f"example{example}: LV Dice {dice:.2f} ({int(result.mask.sum())} px detected, {int(manual.sum())} "
              f"labelled), RV Dice {rv_dice:.2f}, foot {result.foot}, peak {result.peak}, {1e3 * seconds:.0f} ms")
    print(f"mean LV Dice {np.mean(dices):.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    actions = parser.add_subparsers(dest="action", required=True)
    speed_parser = actions.add_parser("speed")
    speed_parser.add_argument("--rows", type=int, default=176)
    speed_parser.add_argument("--cols", type=int, default=176)
    speed_parser.add_argument("--frames", type=int, default=60)
    speed_parser.add_argument("--repeats", type=int, default=3)
    speed_parser.add_argument("--sample", type=int, default=20, help="pixels fitted with scipy")
    speed_parser.set_defaults(func=speed)
    qperf_parser = actions.add_parser("qperf")
    qperf_parser.add_argument("--figure", type=Path, default=Path("docs/mapping_qperf_examples.png"))
    qperf_parser.set_defaults(func=qperf)
    accuracy_parser = actions.add_parser("accuracy")
    accuracy_parser.add_argument("--seeds", type=int, default=6)
    accuracy_parser.set_defaults(func=accuracy)
    actions.add_parser("aif").set_defaults(func=aif_detection)
    logging.basicConfig(level=logging.WARNING)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
