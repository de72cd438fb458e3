"""Evaluation of the shipped segmentation on the real scans in ../shared/data (never trained or
tuned on): myocardium Dice per DAUGS slice (signal units, one pixel spacing fixed in advance)
and the closed-ring check on both QPerf examples (Gd units), drawn into one PNG.

    python -m perfline.models.real_data --data /work/shared/data --png docs/segmentation_real.png

:func:`qperf_format` gives a phantom slice the documented format of the QPerf examples (data
README only: Gd cropped tightly around the LV, clamped at 6.004 mmol/L, 0.5 s grid, pixel
spacing 1.8-2.1 mm), so that their failure modes can be studied on held-out phantoms with known
labels (``perfline evaluate --format qperf``) instead of on the two real examples.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from perfline.models.data import resample_frames_to_interval
from perfline.models.inference import SPACING_FACTORS, SliceSegmentation, Segmenter
from perfline.models.weights import default_model
from perfline.toolbox.resample import resample_series, uniform_grid
from perfline.toolbox.seg_metrics import dice

logger = logging.getLogger(__name__)

# stated in docs/segmentation.md before the first run; not tuned afterwards
DAUGS_PIXEL_SPACING_MM = 1.2
DAUGS_FRAME_INTERVAL_S = 1.0
QPERF_PIXEL_SPACING_MM = 1.9
QPERF_FRAME_INTERVAL_S = 0.5
# QPerf only (spacing not recorded): the label-free spacing search of Segmenter.segment
# (docs/segmentation.md, "Pixel spacing unknown": decided by the phantom rule before the real
# run). DAUGS keeps its stated 1.2 mm; the chain knows its spacing from the MRD header.
QPERF_SPACING_SEARCH = True
DAUGS_LABELS = {1: 2, 3: 1}  # DAUGS 1 myocardium, 3 LV blood pool -> ours 2, 1
# documented format of the QPerf examples (../shared/data/README.md), [rows, cols] and frames
QPERF_CLAMP_MMOL_L = 6.004
QPERF_MATRIX = {"stress": (40, 37), "rest": (51, 47)}
QPERF_FRAMES = {"stress": 59, "rest": 68}


@dataclass(frozen=True)
class QPerfFormatSlice:
    """A phantom slice in the QPerf examples' format.

    series: float32 [time, rows, cols] Gd (mmol/L) on a ``frame_interval_s`` grid from the first
    SR frame, clamped; labels: uint8 [rows, cols] truth on the same grid (nearest neighbour);
    pixel_spacing_mm: the grid's true spacing (the segmentation is told the nominal one);
    lv_center_rc: true LV centre in the new pixels.
    """

    series: np.ndarray
    labels: np.ndarray
    pixel_spacing_mm: float
    frame_interval_s: float
    lv_center_rc: tuple[float, float]


def qperf_format(gd: np.ndarray, time_s: np.ndarray, labels: np.ndarray,
                 pixel_spacing_mm: float, lv_center_rc: tuple[float, float], *,
                 matrix: tuple[int, int], spacing_mm: float, n_frames: int,
                 offset_rc: tuple[float, float] = (0.0, 0.0),
                 clamp_mmol_l: float = QPERF_CLAMP_MMOL_L,
                 frame_interval_s: float = QPERF_FRAME_INTERVAL_S) -> QPerfFormatSlice:
    """Resample a Gd series to the QPerf examples' documented format.

    Args:
        gd: float [time, rows, cols] Gd, mmol/L, one frame per SR acquisition.
        time_s: float [time] acquisition times of those frames, s (irregular).
        labels: uint8 [rows, cols] truth on the same grid.
        pixel_spacing_mm: square pixel size of ``gd``.
        lv_center_rc: LV centre (row, col) in ``gd`` pixels.
        matrix: (rows, cols) of the output, e.g. ``QPERF_MATRIX["stress"]`` (40 x 37).
        spacing_mm: output pixel size (QPerf: 1.8-2.1 mm, not recorded).
        n_frames: output frames (at most those inside the acquisition are kept).
        offset_rc: LV position relative to the matrix centre, output pixels (the real crops
            are "around the LV", not exactly centred).
        clamp_mmol_l: values above are set to it (QPerf: 6.004 mmol/L).
        frame_interval_s: output frame interval from the first frame (QPerf: 0.5 s).

    Bilinear in space and linear in time; labels nearest neighbour; outside the input grid 0.
    """
    gd = np.asarray(gd, dtype=np.float32)
    times = np.asarray(time_s, dtype=np.float64)
    grid_s = uniform_grid(times, frame_interval_s)[: int(n_frames)]
    frames = resample_series(gd, times, grid_s)
    step = spacing_mm / pixel_spacing_mm
    half = (np.asarray(matrix, dtype=np.float64) - 1.0) / 2.0
    origin = np.asarray(lv_center_rc, dtype=np.float64) - step * (half + np.asarray(offset_rc))
    rows = origin[0] + step * np.arange(matrix[0])
    cols = origin[1] + step * np.arange(matrix[1])
    coordinates = np.stack(np.meshgrid(rows, cols, indexing="ij"))
    series = np.stack([ndimage.map_coordinates(frame, coordinates, order=1, mode="constant",
                                               cval=0.0, prefilter=False) for frame in frames])
    np.minimum(series, np.float32(clamp_mmol_l), out=series)
    out_labels = ndimage.map_coordinates(np.asarray(labels), coordinates, order=0,
                                         mode="constant", cval=0).astype(np.uint8)
    center = (float(half[0] + offset_rc[0]), float(half[1] + offset_rc[1]))
    return QPerfFormatSlice(series=series.astype(np.float32), labels=out_labels,
                            pixel_spacing_mm=float(spacing_mm),
                            frame_interval_s=float(frame_interval_s), lv_center_rc=center)


def _load_mat(path: Path, variable: str) -> np.ndarray:
    from scipy.io import loadmat

    return np.asarray(loadmat(str(path))[variable])


def evaluate_daugs(segmenter: Segmenter, folder: Path) -> list[dict]:
    """Per slice: series [time, rows, cols], truth in our labels, result, myocardium Dice."""
    results = []
    for image_path in sorted((folder / "images").glob("*.mat")):
        series = np.moveaxis(_load_mat(image_path, "final_img").astype(np.float32), 2, 0)
        truth_raw = _load_mat(folder / "labels" / image_path.name, "final_mask")
        truth = np.zeros_like(truth_raw, dtype=np.uint8)
        for theirs, ours in DAUGS_LABELS.items():
            truth[truth_raw == theirs] = ours
        series = resample_frames_to_interval(series, DAUGS_FRAME_INTERVAL_S)
        result = segmenter.segment(series, DAUGS_PIXEL_SPACING_MM)
        results.append({"name": image_path.stem, "series": series, "truth": truth,
                        "result": result,
                        "dice_myocardium": dice(result.labels == 2, truth == 2),
                        "dice_lv_blood": dice(result.labels == 1, truth == 1)})
    return results


def evaluate_qperf(segmenter: Segmenter, folder: Path, *,
                   spacing_search: bool = QPERF_SPACING_SEARCH) -> list[dict]:
    """Both QPerf examples (Gd, 0.5 s frames): result and whether the ring is closed;
    ``spacing_search``: nominal 1.9 mm searched over ``SPACING_FACTORS`` when the ring is open."""
    results = []
    for name in ("perf_data", "perf_data_stress"):
        data = _load_mat(folder / f"{name}.mat", "data").astype(np.float32)
        series = resample_frames_to_interval(np.moveaxis(data, 2, 0), QPERF_FRAME_INTERVAL_S)
        result = segmenter.segment(series, QPERF_PIXEL_SPACING_MM,
                                   spacing_factors=SPACING_FACTORS if spacing_search else None)
        results.append({"name": name, "series": series, "result": result,
                        "closed_ring": result.closed_ring,
                        "pixel_spacing_mm": result.pixel_spacing_mm})
    return results


def _peak_image(series: np.ndarray) -> np.ndarray:
    return np.percentile(series, 98, axis=0)


def _draw(axis, image: np.ndarray, result: SliceSegmentation, title: str,
          truth: np.ndarray | None = None) -> None:
    axis.imshow(image, cmap="gray")
    colours = {1: "tab:red", 2: "tab:green", 3: "tab:blue"}
    for label, colour in colours.items():
        mask = result.labels == label
        if mask.any():
            axis.contour(mask.astype(float), levels=[0.5], colors=colour, linewidths=1.0)
    if truth is not None:
        for label in (1, 2):
            if (truth == label).any():
                axis.contour((truth == label).astype(float), levels=[0.5], colors="yellow",
                             linewidths=0.7, linestyles="dashed")
    if np.isfinite(result.rv_insertion_deg):
        r0, c0 = result.lv_center_rc
        angle = np.radians(result.rv_insertion_deg)
        length = 0.35 * min(image.shape)
        axis.plot([c0, c0 + length * np.cos(angle)], [r0, r0 - length * np.sin(angle)],
                  color="orange", linewidth=1.2)
    axis.set_title(title, fontsize=8)
    axis.set_axis_off()


def make_figure(daugs: list[dict], qperf: list[dict], png: Path) -> None:
    """One row of panels: DAUGS slices (truth dashed yellow) then the QPerf examples."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = len(daugs) + len(qperf)
    figure, axes = plt.subplots(1, panels, figsize=(2.6 * panels, 3.0), dpi=130)
    for axis, item in zip(axes, daugs):
        _draw(axis, _peak_image(item["series"]), item["result"],
              f"DAUGS {item['name'].split('-')[-1]}\nmyo Dice {item['dice_myocardium']:.3f}",
              truth=item["truth"])
    for axis, item in zip(axes[len(daugs):], qperf):
        completed = [flag for flag in item["result"].flags if "completed from the image" in flag]
        _draw(axis, _peak_image(item["series"]), item["result"],
              f"QPerf {item['name']} ({item['pixel_spacing_mm']:.2f} mm)\n"
              f"closed ring: {item['closed_ring']}"
              + (f"\n(from the image on {completed[0].split(' on ')[-1]})" if completed else ""))
    figure.suptitle("CNN (red LV, green myocardium, blue RV, orange RV insertion); "
                    "DAUGS truth dashed yellow", fontsize=8)
    figure.tight_layout()
    figure.savefig(png)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("/work/shared/data"))
    parser.add_argument("--png", type=Path, default=None)
    parser.add_argument("--model", type=Path, default=None,
                        help="one model for both (default: the shipped model per units)")
    parser.add_argument("--signal-model", type=Path, default=None,
                        help="model stem for the DAUGS signal series (overrides --model)")
    parser.add_argument("--gd-model", type=Path, default=None,
                        help="model stem for the QPerf Gd series (overrides --model)")
    parser.add_argument("--json", type=Path, default=None, help="write the summary here")
    parser.add_argument("--qperf-spacing-search", choices=("on", "off"), default=None,
                        help="QPerf examples only: label-free pixel spacing search (default: "
                             f"{'on' if QPERF_SPACING_SEARCH else 'off'}, by the phantom rule)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    signal_model = args.signal_model or args.model or default_model("signal")
    gd_model = args.gd_model or args.model or default_model("gd")
    daugs = evaluate_daugs(Segmenter(signal_model), args.data / "daugs")
    search = (QPERF_SPACING_SEARCH if args.qperf_spacing_search is None
              else args.qperf_spacing_search == "on")
    qperf = evaluate_qperf(Segmenter(gd_model), args.data / "qperf" / "examples",
                           spacing_search=search)
    summary = {
        "daugs_pixel_spacing_mm": DAUGS_PIXEL_SPACING_MM,
        "daugs": {item["name"]: {"dice_myocardium": round(item["dice_myocardium"], 4),
                                 "dice_lv_blood": round(item["dice_lv_blood"], 4),
                                 "flags": list(item["result"].flags)} for item in daugs},
        "qperf_spacing_search": search,
        "qperf": {item["name"]: {"closed_ring": item["closed_ring"],
                                 "pixel_spacing_mm": round(item["pixel_spacing_mm"], 3),
                                 "rv_insertion_deg": round(item["result"].rv_insertion_deg, 1),
                                 "flags": list(item["result"].flags)} for item in qperf},
    }
    summary["models"] = {"signal": str(signal_model), "gd": str(gd_model)}
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    if args.png:
        make_figure(daugs, qperf, args.png)
        print(f"figure written to {args.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
