"""``perfline evaluate``: the paper's segmentation table over held-out simulated studies.

Study seeds start at ``TEST_SEED_START`` (never drawn for training or validation); kinds
alternate stress/rest and field strengths 1.5/3 T. ``--mbf`` hands over to the MBF evaluation
(``perfline.toolbox.mbf_evaluation``, the report engineer's module).

``--format qperf`` gives each Gd slice the documented format of the QPerf examples
(``perfline.models.real_data.qperf_format``: resampled to 1.8 / 1.9 / 2.1 mm in turn, cropped to
40 x 37 (stress) or 51 x 47 (rest) pixels around the LV with a random offset of up to
``--qperf-offset`` pixels, clamped at 6.004 mmol/L, 0.5 s grid) and segments it as the real
examples are (told 1.9 mm, 0.5 s resampled to 1 s); metrics on that grid at its true spacing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

ROWS = (("dice", "myocardium Dice", ""), ("false_positive", "false positive", ""),
        ("false_negative", "false negative", ""), ("precision", "precision", ""),
        ("recall", "recall", ""), ("boundary_error_mm", "boundary error", "mm"),
        ("hausdorff_endo_mm", "Hausdorff endo (max)", "mm"),
        ("hausdorff_epi_mm", "Hausdorff epi (max)", "mm"),
        ("hausdorff95_endo_mm", "Hausdorff endo (95th pct)", "mm"),
        ("hausdorff95_epi_mm", "Hausdorff epi (95th pct)", "mm"),
        ("rv_insertion_error_deg", "RV insertion error", "deg"))


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "evaluate", help="segmentation metrics on held-out simulated studies (or --mbf)",
        description="Segment N held-out simulated studies and print Dice, FP, FN, precision, "
                    "recall, boundary error, endo/epi Hausdorff and RV insertion error "
                    "(mean +- SD and 90 %% interval).")
    parser.add_argument("--mbf", action="store_true",
                        help="evaluate MBF mapping instead (perfline.toolbox.mbf_evaluation)")
    parser.add_argument("--studies", type=int, default=70, help="held-out studies (3 slices)")
    parser.add_argument("--first-seed", type=int, default=None,
                        help="first study seed (default: the held-out range start)")
    parser.add_argument("--units", choices=("gd", "signal"), default="gd")
    parser.add_argument("--center", choices=("detect", "truth"), default="detect",
                        help="LV centre from the detector on the series, or the true centre "
                             "(as an AIF-based detection would give)")
    parser.add_argument("--model", type=Path, default=None, help="model stem (default: the shipped model for --units)")
    parser.add_argument("--runtime", choices=("auto", "onnxruntime-int8", "onnxruntime", "torch"),
                        default="auto")
    parser.add_argument("--json", type=Path, default=None, help="write per-slice metrics here")
    parser.add_argument("--padding", choices=("zeros", "edge"), default="zeros",
                        help="crop beyond the series' edge: zeros or the edge pixels' curves")
    parser.add_argument("--ring-closing", choices=("on", "off"), default=None,
                        help="close open myocardial rings along rays (toolbox/segmentation_post; "
                             "default: the Segmenter's)")
    parser.add_argument("--format", choices=("plain", "qperf"), default="plain",
                        help="qperf: the QPerf examples' format (small crop around the LV, "
                             "clamped Gd, 0.5 s grid; Gd units only)")
    parser.add_argument("--qperf-spacings", type=float, nargs="+", default=[1.8, 1.9, 2.1],
                        help="--format qperf: true pixel spacings (mm), used in turn per study")
    parser.add_argument("--qperf-matrix", type=int, nargs=2, default=None, metavar=("ROWS", "COLS"),
                        help="--format qperf: crop size (default 40 37 stress, 51 47 rest)")
    parser.add_argument("--qperf-offset", type=float, default=3.0,
                        help="--format qperf: max LV offset from the crop centre, pixels")
    parser.add_argument("--spacing-search", choices=("on", "off"), default="off",
                        help="--format qperf: pixel spacing treated as unknown, the Segmenter's "
                             "label-free search over nominal x models.inference.SPACING_FACTORS")
    parser.add_argument("--out", type=Path, default=None,
                        help="--mbf only: output folder of the MBF evaluation")
    parser.add_argument("--no-lab-hematocrit", dest="lab_hematocrit", action="store_false",
                        help="--mbf only: do not send the simulated study's hematocrit as a lab value "
                             "(the chain then uses its 0.42 setting)")
    parser.add_argument("--chains", type=Path, default=None, metavar="DIR",
                        help="--mbf only: chain directory (its perfusion.toml) instead of the shipped "
                             "chains, to evaluate a settings variant")
    parser.add_argument("--keep-kspace", action="store_true",
                        help="--mbf only: keep each simulated k-space file (150-200 MB per scan) under "
                             "OUT/studies; by default it is removed once its scan has been analysed")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    if args.mbf:
        from perfline.toolbox import mbf_evaluation

        # the chain's segmentation runs with its own settings: say so rather than ignore an option
        ignored = [name for name, given in (("--padding", args.padding != "zeros"),
                                            ("--ring-closing", args.ring_closing is not None),
                                            ("--format", args.format != "plain"),
                                            ("--spacing-search", args.spacing_search != "off")) if given]
        if ignored:
            raise SystemExit(f"{', '.join(ignored)} apply to the segmentation evaluation, not to --mbf "
                             "(the chain's cnn-segmentation uses its own settings)")

        return int(mbf_evaluation.run(args))
    if args.chains is not None:
        raise SystemExit("--chains applies to --mbf only (the segmentation evaluation runs no chain)")
    from tqdm import tqdm

    from perfline.models.data import TEST_SEED_START, resample_frames_to_interval
    from perfline.models.inference import Segmenter
    from perfline.models.real_data import (QPERF_FRAMES, QPERF_MATRIX, QPERF_PIXEL_SPACING_MM,
                                           qperf_format)
    from perfline.models.weights import default_model
    from perfline.simulator import simulate_image_study
    from perfline.toolbox.rv_insertion import rv_insertion_deg
    from perfline.toolbox.seg_metrics import slice_metrics, summarize
    from perfline.toolbox.segmentation_post import is_closed_ring

    if args.format == "qperf" and args.units != "gd":
        raise SystemExit("--format qperf needs --units gd (the QPerf examples are Gd)")
    if args.spacing_search == "on" and args.format != "qperf":
        raise SystemExit("--spacing-search on needs --format qperf (the plain phantom's spacing "
                         "is known, as the chain's is from the MRD header)")
    from perfline.models.inference import SPACING_FACTORS
    search = SPACING_FACTORS if args.spacing_search == "on" else None
    ring = {} if args.ring_closing is None else {"close_ring": args.ring_closing == "on"}
    segmenter = Segmenter(args.model or default_model(args.units), runtime=args.runtime,
                          padding=args.padding, **ring)
    first = TEST_SEED_START if args.first_seed is None else args.first_seed
    records = []
    for index in tqdm(range(args.studies), unit="study", dynamic_ncols=True):
        seed = first + index
        kind = ("stress", "rest")[index % 2]
        field = (1.5, 3.0)[(index // 2) % 2]
        for number, slice_ in enumerate(simulate_image_study(seed, kind=kind,
                                                             field_strength_t=field)):
            series = slice_.gd if args.units == "gd" else slice_.signal[slice_.n_pd_frames:]
            truth, spacing, center, told = (slice_.labels, slice_.pixel_spacing_mm,
                                            slice_.lv_center_rc, slice_.pixel_spacing_mm)
            extra = {}
            if args.format == "qperf":
                rng = np.random.default_rng([seed, number])
                spacing = args.qperf_spacings[index % len(args.qperf_spacings)]
                formatted = qperf_format(
                    series, slice_.time_s[slice_.n_pd_frames:], slice_.labels,
                    slice_.pixel_spacing_mm, slice_.lv_center_rc,
                    matrix=tuple(args.qperf_matrix or QPERF_MATRIX[kind]), spacing_mm=spacing,
                    n_frames=QPERF_FRAMES[kind],
                    offset_rc=tuple(rng.uniform(-args.qperf_offset, args.qperf_offset, 2)))
                series = resample_frames_to_interval(formatted.series,
                                                     formatted.frame_interval_s)
                truth, center, told = (formatted.labels, formatted.lv_center_rc,
                                       QPERF_PIXEL_SPACING_MM)
                extra = {"spacing_mm": spacing, "matrix": list(truth.shape)}
            result = segmenter.segment(np.asarray(series), told,
                                       center_rc=center if args.center == "truth" else None,
                                       spacing_factors=search)
            if search is not None:
                extra["chosen_spacing_mm"] = result.pixel_spacing_mm
                extra["spacing_search"] = [list(row) for row in result.spacing_search]
            metrics = slice_metrics(result.labels, truth, spacing,
                                    auto_rv_insertion_deg=result.rv_insertion_deg,
                                    manual_rv_insertion_deg=slice_.rv_insertion_deg)
            records.append({"seed": seed, "slice": number, "kind": kind, "field_t": field,
                            "level": slice_.level, "flags": list(result.flags),
                            "closed_ring": bool(result.closed_ring),
                            "closed_ring_in_truth": bool(is_closed_ring(truth)),
                            "rv_found": bool((result.labels == 3).any()),
                            "rv_in_truth": bool((truth == 3).any()), **extra,
                            "truth_labels_rv_insertion_deg": _safe(rv_insertion_deg,
                                                                   slice_.labels),
                            **dataclasses.asdict(metrics)})
    print(f"{len(records)} slices from {args.studies} held-out studies (seeds {first}.."
          f"{first + args.studies - 1}), units {args.units}, format {args.format}, centre "
          f"{args.center}, runtime {segmenter.runtime} {segmenter.precision}, padding "
          f"{args.padding}, ring closing "
          f"{'on' if segmenter.close_ring else 'off'}, spacing search {args.spacing_search}")
    print(f"{'metric':28s} {'mean':>8s} {'SD':>8s} {'5%':>8s} {'95%':>8s}   n")
    summary = {}
    for key, name, unit in ROWS:
        stats = summarize(np.array([record[key] for record in records]))
        summary[key] = stats
        print(f"{name + (' (' + unit + ')' if unit else ''):28s} {stats['mean']:8.3f} "
              f"{stats['sd']:8.3f} {stats['p05']:8.3f} {stats['p95']:8.3f}   {stats['n']}")
    flagged = sum(bool(record["flags"]) for record in records)
    print(f"flagged slices: {flagged} of {len(records)}")
    for key, name in (("closed_ring", "closed myocardial ring"), ("rv_found", "RV found")):
        found = sum(record[key] for record in records)
        summary[key + "_rate"] = found / len(records)
        print(f"{name}: {found} of {len(records)} ({100.0 * found / len(records):.1f} %)")
    closed = [record for record in records if record["closed_ring_in_truth"]]
    if len(closed) < len(records):
        found = sum(record["closed_ring"] for record in closed)
        print(f"closed ring where the truth's ring is closed in the image: {found} of "
              f"{len(closed)}")
    if search is not None:
        for spacing in sorted({record["spacing_mm"] for record in records}):
            chosen = [record["chosen_spacing_mm"] for record in records
                      if record["spacing_mm"] == spacing]
            values, counts = np.unique(np.round(chosen, 3), return_counts=True)
            print(f"true {spacing} mm (told {QPERF_PIXEL_SPACING_MM} mm): chosen spacing "
                  + ", ".join(f"{v:g} mm x{c}" for v, c in zip(values, counts)))
    with_rv = [record for record in records if record["rv_in_truth"]]
    if with_rv:
        found = sum(record["rv_found"] for record in with_rv)
        print(f"RV found where the truth has RV in the image: {found} of {len(with_rv)}")
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "slices": records}, indent=1))
    return 0


def _safe(function, *arguments) -> float:
    try:
        return float(function(*arguments))
    except ValueError:
        return float("nan")
