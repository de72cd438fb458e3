"""Evaluation of the shipped segmentation on the real scans in ../shared/data (never trained or
tuned on): myocardium Dice per DAUGS slice (signal units, one pixel spacing fixed in advance)
and the closed-ring check on both QPerf examples (Gd units), drawn into one PNG.

    python -m perfline.models.real_data --data /work/shared/data --png docs/segmentation_real.png
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

from perfline.models.data import resample_frames_to_interval
from perfline.models.inference import SliceSegmentation, Segmenter
from perfline.models.weights import default_model
from perfline.toolbox.seg_metrics import dice

logger = logging.getLogger(__name__)

# stated in docs/segmentation.md before the first run; not tuned afterwards
DAUGS_PIXEL_SPACING_MM = 1.2
DAUGS_FRAME_INTERVAL_S = 1.0
QPERF_PIXEL_SPACING_MM = 1.9
QPERF_FRAME_INTERVAL_S = 0.5
DAUGS_LABELS = {1: 2, 3: 1}  # DAUGS 1 myocardium, 3 LV blood pool -> ours 2, 1


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


def evaluate_qperf(segmenter: Segmenter, folder: Path) -> list[dict]:
    """Both QPerf examples (Gd, 0.5 s frames): result and whether the ring is closed."""
    results = []
    for name in ("perf_data", "perf_data_stress"):
        data = _load_mat(folder / f"{name}.mat", "data").astype(np.float32)
        series = resample_frames_to_interval(np.moveaxis(data, 2, 0), QPERF_FRAME_INTERVAL_S)
        result = segmenter.segment(series, QPERF_PIXEL_SPACING_MM)
        results.append({"name": name, "series": series, "result": result,
                        "closed_ring": result.closed_ring})
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
        _draw(axis, _peak_image(item["series"]), item["result"],
              f"QPerf {item['name']}\nclosed ring: {item['closed_ring']}")
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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    signal_model = args.signal_model or args.model or default_model("signal")
    gd_model = args.gd_model or args.model or default_model("gd")
    daugs = evaluate_daugs(Segmenter(signal_model), args.data / "daugs")
    qperf = evaluate_qperf(Segmenter(gd_model), args.data / "qperf" / "examples")
    summary = {
        "daugs_pixel_spacing_mm": DAUGS_PIXEL_SPACING_MM,
        "daugs": {item["name"]: {"dice_myocardium": round(item["dice_myocardium"], 4),
                                 "dice_lv_blood": round(item["dice_lv_blood"], 4),
                                 "flags": list(item["result"].flags)} for item in daugs},
        "qperf": {item["name"]: {"closed_ring": item["closed_ring"],
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
