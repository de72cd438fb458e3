"""``perfline segment``: LV blood pool, myocardium and RV labels of one 2D+T slice."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "segment", help="segment one perfusion slice with the CNN",
        description="Segment a [rows, cols, time] series (from the first SR frame) into "
                    "0 background, 1 LV blood pool, 2 myocardium, 3 RV; writes the labels on "
                    "the input grid and prints the anterior RV insertion angle.")
    parser.add_argument("series", help="array file (.npy, .mat as PATH:VARIABLE, ...), "
                                       "[rows, cols, time]")
    parser.add_argument("--pixel-spacing", type=float, required=True, metavar="MM",
                        help="pixel size, mm (with --spacing-search: the nominal value)")
    parser.add_argument("--spacing-search", action="store_true",
                        help="the pixel spacing is not known (e.g. a crop without a header): "
                             "when the ring is open at --pixel-spacing, also try it x "
                             "0.7-1.2 and keep a spacing that closes the ring "
                             "(docs/segmentation.md, 'Pixel spacing unknown')")
    parser.add_argument("--dt", type=float, required=True, metavar="S",
                        help="frame interval, s (series far from 1 frame/s are resampled)")
    parser.add_argument("--units", choices=("gd", "signal"), default="gd",
                        help="Gd mmol/L or signal intensity (the network was trained on both)")
    parser.add_argument("--first-frame", type=int, default=0,
                        help="index of the first saturation-recovery frame")
    parser.add_argument("--center", type=float, nargs=2, default=None, metavar=("ROW", "COL"),
                        help="LV centre in pixels (default: detected on the series)")
    parser.add_argument("--out", type=Path, required=True, help="labels .npy, uint8 [rows, cols]")
    parser.add_argument("--model", type=Path, default=None, help="model stem (default: the shipped model for --units)")
    parser.add_argument("--runtime", choices=("auto", "onnxruntime-int8", "onnxruntime", "torch"),
                        default="auto")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from perfline.models.data import SeriesError, resample_frames_to_interval
    from perfline.models.inference import SPACING_FACTORS, Segmenter
    from perfline.models.weights import default_model
    from perfline.toolbox.array_io import load_array  # the mapping engineer's loader

    array = np.asarray(load_array(args.series), dtype=np.float32)
    if array.ndim != 3:
        raise SeriesError(f"expected SERIES [rows, cols, time], got shape {array.shape}")
    if not 0 <= args.first_frame < array.shape[2]:
        raise SeriesError(f"--first-frame {args.first_frame} outside 0..{array.shape[2] - 1}")
    series = np.moveaxis(array, 2, 0)[args.first_frame:]
    series = resample_frames_to_interval(series, args.dt)
    segmenter = Segmenter(args.model or default_model(args.units), runtime=args.runtime)
    result = segmenter.segment(series, args.pixel_spacing,
                               center_rc=tuple(args.center) if args.center else None,
                               spacing_factors=SPACING_FACTORS if args.spacing_search else None)
    np.save(args.out, result.labels)
    counts = np.bincount(result.labels.ravel(), minlength=4)
    print(f"labels written to {args.out} ({args.units} units, runtime {segmenter.runtime} "
          f"{segmenter.precision}): "
          f"LV {counts[1]} px, myocardium {counts[2]} px, RV {counts[3]} px, "
          f"closed ring: {result.closed_ring}")
    print(f"LV centre (row, col): {result.lv_center_rc[0]:.1f}, {result.lv_center_rc[1]:.1f}")
    print(f"RV insertion (anterior): {result.rv_insertion_deg:.1f} deg")
    if args.spacing_search:
        tried = ", ".join(f"{spacing:.2f} mm ({'closed' if closed else 'open'})"
                          for spacing, closed, _ in result.spacing_search)
        print(f"pixel spacing used: {result.pixel_spacing_mm:.3f} mm (nominal "
              f"{args.pixel_spacing:g} mm; tried {tried})")
    for flag in result.flags:
        print(f"flag: {flag}")
    return 1 if result.empty else 0
