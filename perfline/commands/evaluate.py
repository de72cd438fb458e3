"""``perfline evaluate``: the paper's segmentation table over held-out simulated studies.

Study seeds start at ``TEST_SEED_START`` (never drawn for training or validation); kinds
alternate stress/rest and field strengths 1.5/3 T. ``--mbf`` hands over to the MBF evaluation
(``perfline.toolbox.mbf_evaluation``, the report engineer's module).
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
    parser.add_argument("--runtime", choices=("auto", "onnxruntime", "torch"), default="auto")
    parser.add_argument("--json", type=Path, default=None, help="write per-slice metrics here")
    parser.add_argument("--out", type=Path, default=None,
                        help="--mbf only: output folder of the MBF evaluation")
    parser.add_argument("--no-lab-hematocrit", dest="lab_hematocrit", action="store_false",
                        help="--mbf only: do not send the simulated study's hematocrit as a lab value "
                             "(the chain then uses its 0.42 setting)")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    if args.mbf:
        from perfline.toolbox import mbf_evaluation

        return int(mbf_evaluation.run(args))
    from tqdm import tqdm

    from perfline.models.data import TEST_SEED_START
    from perfline.models.inference import Segmenter
    from perfline.models.weights import default_model
    from perfline.simulator import simulate_image_study
    from perfline.toolbox.rv_insertion import rv_insertion_deg
    from perfline.toolbox.seg_metrics import slice_metrics, summarize

    segmenter = Segmenter(args.model or default_model(args.units), runtime=args.runtime)
    first = TEST_SEED_START if args.first_seed is None else args.first_seed
    records = []
    for index in tqdm(range(args.studies), unit="study", dynamic_ncols=True):
        seed = first + index
        kind = ("stress", "rest")[index % 2]
        field = (1.5, 3.0)[(index // 2) % 2]
        for number, slice_ in enumerate(simulate_image_study(seed, kind=kind,
                                                             field_strength_t=field)):
            series = slice_.gd if args.units == "gd" else slice_.signal[slice_.n_pd_frames:]
            result = segmenter.segment(np.asarray(series), slice_.pixel_spacing_mm,
                                       center_rc=slice_.lv_center_rc
                                       if args.center == "truth" else None)
            metrics = slice_metrics(result.labels, slice_.labels, slice_.pixel_spacing_mm,
                                    auto_rv_insertion_deg=result.rv_insertion_deg,
                                    manual_rv_insertion_deg=slice_.rv_insertion_deg)
            records.append({"seed": seed, "slice": number, "kind": kind, "field_t": field,
                            "level": slice_.level, "flags": list(result.flags),
                            "truth_labels_rv_insertion_deg": _safe(rv_insertion_deg,
                                                                   slice_.labels),
                            **dataclasses.asdict(metrics)})
    print(f"{len(records)} slices from {args.studies} held-out studies (seeds {first}.."
          f"{first + args.studies - 1}), units {args.units}, centre {args.center}, runtime "
          f"{segmenter.runtime}")
    print(f"{'metric':28s} {'mean':>8s} {'SD':>8s} {'5%':>8s} {'95%':>8s}   n")
    summary = {}
    for key, name, unit in ROWS:
        stats = summarize(np.array([record[key] for record in records]))
        summary[key] = stats
        print(f"{name + (' (' + unit + ')' if unit else ''):28s} {stats['mean']:8.3f} "
              f"{stats['sd']:8.3f} {stats['p05']:8.3f} {stats['p95']:8.3f}   {stats['n']}")
    flagged = sum(bool(record["flags"]) for record in records)
    print(f"flagged slices: {flagged} of {len(records)}")
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "slices": records}, indent=1))
    return 0


def _safe(function, *arguments) -> float:
    try:
        return float(function(*arguments))
    except ValueError:
        return float("nan")
