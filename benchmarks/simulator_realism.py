"""Realism of the simulator in numbers: simulated studies side by side with the real data.

Real data (../shared/data, evaluation only, nothing is tuned on it):
- DAUGS: 3 short-axis slices (basal, mid, apical) of one patient, signal normalised to [0, 1],
  128 x 128, about one frame per heartbeat, labels for LV blood pool and myocardium (no RV).
  Pixel spacing is not recorded; 1.2 mm is assumed (README: about 1.0-1.3 mm).
- QPerf: rest and stress myocardial Gd series (mmol/L, 0.5 s grid) with their AIFs; the three
  AIF-detection series (raw AIF images with LV and RV masks).

Simulated studies are rendered like the DAUGS slices (image-domain path, cropped around the LV,
resampled to 1.2 mm, 128 x 128, normalised to [0, 1] by the series maximum) and like the QPerf
examples (Gd from SR/PD through the LUT, AIF truth). The same measurement code runs on both.

Usage: python benchmarks/simulator_realism.py [--studies 12] [--figure docs/simulator_vs_real.png]
"""

from __future__ import annotations

import argparse
import pathlib

import numpy as np
import scipy.io
from scipy import ndimage, signal

from perfline.simulator import simulate_image_study
from perfline.simulator import study as st
from perfline.simulator.dynamics import blood_curves, fine_grid

DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
if not DATA.exists():
    DATA = pathlib.Path("/work/shared/data")
DAUGS_PIXEL_MM = 1.2
CROP = 128


def immerkaer_sigma(image: np.ndarray) -> float:
    """Noise SD of an image by Immerkaer's Laplacian-difference estimator (CVIU 1996)."""
    kernel = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], dtype=np.float64)
    response = ndimage.convolve(image.astype(np.float64), kernel)[1:-1, 1:-1]
    return float(np.sqrt(np.pi / 2) * np.abs(response).mean() / 6.0)


def baseline_and_peak(curve: np.ndarray, stop: int | None = None) -> tuple[float, float, int]:
    """Baseline = lowest 3-frame mean before the peak; (baseline, peak value, peak frame)."""
    peak_frame = int(np.argmax(curve if stop is None else curve[:stop]))
    smooth = np.convolve(curve, np.ones(3) / 3, mode="valid")
    base = float(smooth[: max(1, peak_frame - 1)].min()) if peak_frame > 1 else float(curve[0])
    return base, float(curve[peak_frame]), peak_frame


def upslope_frame(curve: np.ndarray) -> int:
    """First frame where the curve reaches 90 % of its rise from its first value to its maximum."""
    return int(np.argmax(curve >= curve[0] + 0.9 * (curve.max() - curve[0])))


def wall_thickness_mm(lv: np.ndarray, myo: np.ndarray, pixel_mm: float) -> float:
    r_endo = np.sqrt(lv.sum() / np.pi)
    r_epi = np.sqrt((lv | myo).sum() / np.pi)
    return float((r_epi - r_endo) * pixel_mm)


def rv_curve_by_detection(series: np.ndarray, heart: np.ndarray, lv_curve: np.ndarray) -> np.ndarray | None:
    """Mean curve of unlabelled pixels near the heart that enhance like blood before the LV peak
    (the RV, for data without an RV label)."""
    lv_peak = int(np.argmax(lv_curve))
    near = ndimage.binary_dilation(heart, iterations=30) & ~ndimage.binary_dilation(heart, iterations=2)
    enhancement = series.max(axis=0) - series[0]
    candidates = near & (enhancement > 0.5 * (lv_curve.max() - lv_curve[0])) & (series.argmax(axis=0) < lv_peak)
    return series[:, candidates].mean(axis=1) if candidates.sum() > 20 else None


def texture_cv(frame: np.ndarray, heart: np.ndarray, pixel_mm: float) -> float:
    """Coefficient of variation of the 3x3-smoothed signal in a ring 5-25 mm around the heart
    (pixels above 5 % of the frame maximum, so that air is excluded)."""
    inner = ndimage.binary_dilation(heart, iterations=max(1, round(5 / pixel_mm)))
    outer = ndimage.binary_dilation(heart, iterations=max(2, round(25 / pixel_mm)))
    smooth = ndimage.uniform_filter(frame, 3)
    ring = outer & ~inner & (smooth > 0.05 * frame.max())
    values = smooth[ring]
    return float(values.std() / values.mean())


def slice_metrics(series: np.ndarray, lv: np.ndarray, myo: np.ndarray, rv: np.ndarray | None,
                  pixel_mm: float) -> dict[str, float]:
    """Metrics of one normalised series [time, rows, cols] with its masks."""
    lv_curve, myo_curve = series[:, lv].mean(axis=1), series[:, myo].mean(axis=1)
    lv_base, lv_peak, lv_frame = baseline_and_peak(lv_curve)
    myo_base, myo_peak, _ = baseline_and_peak(myo_curve)
    rv_curve = series[:, rv].mean(axis=1) if rv is not None else rv_curve_by_detection(series, lv | myo, lv_curve)
    # bolus timing by the upslope (first frame at 90 % of the enhancement): robust to the flat,
    # saturated tops of blood curves (and to the T2 darkening of the densest RV bolus)
    rv_frame = upslope_frame(rv_curve) if rv_curve is not None else -1
    lv_up = upslope_frame(lv_curve)
    return {
        "LV blood peak / baseline": lv_peak / max(lv_base, 1e-6),
        "myocardium peak / baseline": myo_peak / max(myo_base, 1e-6),
        "RV -> LV bolus delay (frames, 90 % upslope)": float(lv_up - rv_frame) if rv_frame >= 0 else np.nan,
        "wall thickness (mm)": wall_thickness_mm(lv, myo, pixel_mm),
        "noise SD / LV peak (Immerkaer)": immerkaer_sigma(series[lv_frame]) / lv_peak,
        "background texture CV (baseline)": texture_cv(series[0], lv | myo, pixel_mm),
        "background texture CV (LV peak)": texture_cv(series[lv_frame], lv | myo, pixel_mm),
    }


def daugs_metrics() -> list[dict[str, float]]:
    out = []
    for level in ("Basal", "Mid", "Apical"):
        image = scipy.io.loadmat(DATA / "daugs" / "images" / f"Fig5-exD1-{level}.mat")["final_img"]
        mask = scipy.io.loadmat(DATA / "daugs" / "labels" / f"Fig5-exD1-{level}.mat")["final_mask"]
        series = np.moveaxis(image, -1, 0).astype(np.float64)
        out.append(slice_metrics(series, mask == 3, mask == 1, None, DAUGS_PIXEL_MM))
    return out


def like_daugs(series: np.ndarray, labels: np.ndarray, center_rc: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Crop 128 x 128 at 1.2 mm around the LV centre, normalise to [0, 1]."""
    step = DAUGS_PIXEL_MM / st.MYO_PIXEL_MM
    offsets = (np.arange(CROP) - (CROP - 1) / 2) * step
    rows = center_rc[0] + offsets[:, None] + 0 * offsets[None, :]
    cols = center_rc[1] + offsets[None, :] + 0 * offsets[:, None]
    coords = np.stack([rows, cols])
    frames = np.stack([ndimage.map_coordinates(f, coords, order=1, mode="nearest") for f in series])
    lab = ndimage.map_coordinates(labels, coords, order=0, mode="nearest").astype(np.uint8)
    return frames / frames.max(), lab


def qperf_metrics() -> list[dict[str, float]]:
    out = []
    for name in ("perf_data", "perf_data_stress"):
        mat = scipy.io.loadmat(DATA / "qperf" / "examples" / f"{name}.mat")
        gd = np.moveaxis(mat["data"], -1, 0).astype(np.float64)
        aif = mat["aif"].ravel().astype(np.float64)
        foot, peak = int(mat["foot"].ravel()[0]) - 1, int(mat["peak"].ravel()[0]) - 1
        pixel_peak = gd.max(axis=0)
        # myocardium-like pixels: enhance, but far below the (clamped) blood pool
        myo = (pixel_peak > 0.3) & (pixel_peak < 2.5) & (gd.argmax(axis=0) > peak)
        out.append(gd_metrics("rest" if name == "perf_data" else "stress", aif, 0.5, foot, peak, gd[:, myo]))
    return out


def gd_metrics(kind: str, aif: np.ndarray, dt_s: float, foot: int, peak: int, myo_curves: np.ndarray) -> dict:
    residual = myo_curves - signal.savgol_filter(myo_curves, 7, 2, axis=0)
    return {"kind": kind, "AIF peak (mmol/L)": float(aif.max()), "AIF foot -> peak (s)": (peak - foot) * dt_s,
            "myocardial peak Gd (mmol/L), median pixel": float(np.median(myo_curves.max(axis=0))),
            "myocardial Gd temporal noise SD (mmol/L)": float(np.median(residual[foot:].std(axis=0)))}


def simulated(n_studies: int) -> tuple[list[dict[str, float]], list[dict]]:
    daugs_like, gd_like = [], []
    for seed in range(n_studies):
        kind = "stress" if seed % 2 == 0 else "rest"
        slices = simulate_image_study(1000 + seed, kind=kind)
        study = st.sample_study(1000 + seed, kind=kind)
        for sl in slices:
            series, labels = like_daugs(sl.signal[sl.n_pd_frames:], sl.labels, sl.lv_center_rc)
            daugs_like.append(slice_metrics(series, labels == 1, labels == 2, labels == 3, DAUGS_PIXEL_MM))
        fine = fine_grid(float(sl.time_s[-1]))
        aif = blood_curves(fine, study.bolus)["lv"]
        foot = int(np.argmax(aif > 0.05 * aif.max()))
        mid = slices[len(slices) // 2]
        # the real examples are cropped around the LV and carry no labels: select
        # myocardium-like pixels with the same rule in a 100 mm box around the LV
        half = int(50 / st.MYO_PIXEL_MM)
        r0, c0 = (int(round(v)) for v in mid.lv_center_rc)
        box = np.zeros(mid.labels.shape, dtype=bool)
        box[r0 - half:r0 + half, c0 - half:c0 + half] = True
        pixel_peak = mid.gd.max(axis=0)
        aif_peak_time = fine[int(np.argmax(aif))]
        late = mid.time_s[mid.n_pd_frames:][mid.gd.argmax(axis=0)] > aif_peak_time
        selected = box & (pixel_peak > 0.3) & (pixel_peak < 2.5) & late
        # resample the myocardial Gd to the QPerf grid (0.5 s) before measuring noise
        grid = np.arange(mid.time_s[mid.n_pd_frames], mid.time_s[-1], 0.5)
        curves = mid.gd[:, selected]
        resampled = np.stack([np.interp(grid, mid.time_s[mid.n_pd_frames:], c) for c in curves.T], axis=1)
        record = gd_metrics(kind, aif, fine[1] - fine[0], foot, int(np.argmax(aif)), resampled)
        inner = ndimage.binary_erosion(mid.labels == 2)
        record["myocardial peak Gd (mmol/L), myocardium label, simulated only"] = float(
            np.median(mid.gd[:, inner].max(axis=0)))
        record["AIF foot -> peak (s)"] = (np.argmax(aif) - foot) * (fine[1] - fine[0])
        gd_like.append(record)
    return daugs_like, gd_like


def _phases(series: np.ndarray, lv: np.ndarray, myo: np.ndarray, rv_curve: np.ndarray | None) -> list[int]:
    """Frames at baseline, RV peak, LV peak and myocardial peak."""
    lv_curve, myo_curve = series[:, lv].mean(axis=1), series[:, myo].mean(axis=1)
    rv_frame = int(np.argmax(rv_curve)) if rv_curve is not None else 0
    return [0, rv_frame, int(np.argmax(lv_curve)), int(np.argmax(myo_curve))]


def make_figure(path: pathlib.Path, seed: int) -> None:
    """Simulated (rendered like DAUGS) and real slices at baseline / RV / LV / myocardial peak."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    slices = simulate_image_study(seed, kind="stress")
    titles = ["baseline", "RV peak", "LV peak", "myocardial peak"]
    fig, axes = plt.subplots(6, 4, figsize=(10, 15.5))
    for row, (sl, level) in enumerate(zip(slices, ("Basal", "Mid", "Apical"))):
        series, labels = like_daugs(sl.signal[sl.n_pd_frames:], sl.labels, sl.lv_center_rc)
        frames = _phases(series, labels == 1, labels == 2, series[:, labels == 3].mean(axis=1))
        image = scipy.io.loadmat(DATA / "daugs" / "images" / f"Fig5-exD1-{level}.mat")["final_img"]
        mask = scipy.io.loadmat(DATA / "daugs" / "labels" / f"Fig5-exD1-{level}.mat")["final_mask"]
        real = np.moveaxis(image, -1, 0)
        real_frames = _phases(real, mask == 3, mask == 1, rv_curve_by_detection(real, mask > 0, real[:, mask == 3].mean(axis=1)))
        for column in range(4):
            ax = axes[2 * row, column]
            ax.imshow(series[frames[column]], cmap="gray", vmin=0, vmax=1)
            ax.contour(labels == 1, levels=[0.5], colors="yellow", linewidths=0.6)
            ax.contour(labels >= 1, levels=[0.5], colors="lime", linewidths=0.6)
            ax.contour(labels == 3, levels=[0.5], colors="cyan", linewidths=0.6)
            ax.set_title(f"simulated {sl.level}: {titles[column]} (frame {frames[column]})", fontsize=7)
            ax = axes[2 * row + 1, column]
            ax.imshow(real[real_frames[column]], cmap="gray", vmin=0, vmax=1)
            ax.contour(mask == 3, levels=[0.5], colors="yellow", linewidths=0.6)
            ax.contour(mask > 0, levels=[0.5], colors="lime", linewidths=0.6)
            ax.set_title(f"real DAUGS {level.lower()}: {titles[column]} (frame {real_frames[column]})", fontsize=7)
        for ax in axes[2 * row:2 * row + 2].ravel():
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(f"perfline simulator (seed {seed}, stress, truth contours: LV blood yellow, epicardium green, "
                 f"RV cyan)\nvs real DAUGS slices (expert labels, no RV label); both 128 x 128 at 1.2 mm, "
                 f"normalised to [0, 1]", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def _row(name: str, real: list[float], sim: list[float]) -> str:
    sim_arr = np.array([v for v in sim if np.isfinite(v)])
    real_text = ", ".join(f"{v:.3g}" for v in real)
    inside = "yes" if sim_arr.size and np.percentile(sim_arr, 10) <= max(real) and np.percentile(sim_arr, 90) >= min(real) else "no"
    return (f"| {name} | {real_text} | {np.median(sim_arr):.3g} [{np.percentile(sim_arr, 10):.3g}, "
            f"{np.percentile(sim_arr, 90):.3g}] | {inside} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=12)
    parser.add_argument("--figure", type=pathlib.Path, help="also write the side-by-side PNG here")
    parser.add_argument("--figure-seed", type=int, default=4)
    args = parser.parse_args()
    if args.figure:
        make_figure(args.figure, args.figure_seed)
    real_d = daugs_metrics()
    real_q = qperf_metrics()
    sim_d, sim_q = simulated(args.studies)
    print(f"## Signal, rendered like DAUGS (real: basal, mid, apical; simulated: {len(sim_d)} slices of "
          f"{args.studies} studies, median [p10, p90]; overlap = simulated p10-p90 meets the real range)\n")
    print("| metric | real DAUGS | simulated | overlap |\n|---|---|---|---|")
    for key in real_d[0]:
        print(_row(key, [m[key] for m in real_d], [m[key] for m in sim_d]))
    print("\n## Gd, like the QPerf examples (real: rest, stress; simulated: mid slices, half stress)\n")
    print("| metric | real QPerf | simulated | overlap |\n|---|---|---|---|")
    for key in [k for k in real_q[0] if k != "kind"]:
        print(_row(key, [m[key] for m in real_q], [m[key] for m in sim_q]))
    for kind in ("rest", "stress"):
        values = [m["myocardial peak Gd (mmol/L), myocardium label, simulated only"] for m in sim_q if m["kind"] == kind]
        print(f"\nsimulated {kind}: myocardial peak Gd in the eroded myocardium label, median pixel per study: "
              + ", ".join(f"{v:.2f}" for v in values))
    rv_lv = []
    for example in (1, 2, 3):
        folder = DATA / "qperf" / "aif_detection" / f"example{example}"
        images, masks = np.load(folder / "aif_scc.npy"), np.load(folder / "aif_masks_final.npy")
        rv_lv.append(upslope_frame(images[masks == 1].mean(axis=0)) - upslope_frame(images[masks == 2].mean(axis=0)))
    print(f"\nQPerf AIF-detection series, RV -> LV bolus delay in frames (90 % upslope; frame rate not "
          f"recorded): {rv_lv}")


if __name__ == "__main__":
    main()
