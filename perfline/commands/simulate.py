"""``perfline simulate``: write a simulated perfusion study (MRD HDF5) and its ground truth."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from tqdm import tqdm

from perfline.simulator import mrd, truth
from perfline.simulator import study as st

logger = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "simulate", help="simulate a first-pass perfusion study with ground truth",
        description="Write multi-coil Cartesian k-space (or reconstructed images with --images) of a "
                    "numerical perfusion phantom to an MRD HDF5 file, and its ground truth to another "
                    "HDF5 file (layout: docs/simulator.md).")
    parser.add_argument("out", type=Path, help="output MRD HDF5 file")
    parser.add_argument("--truth", type=Path, required=True, help="output ground-truth HDF5 file")
    parser.add_argument("--seed", type=int, default=0, help="study seed (default 0)")
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument("--stress", dest="kind", action="store_const", const="stress", help="adenosine stress")
    kind.add_argument("--rest", dest="kind", action="store_const", const="rest", help="rest")
    parser.add_argument("--field", type=float, choices=(1.5, 3.0), default=None,
                        help="field strength in T (default: random from the seed)")
    parser.add_argument("--slices", type=int, default=3, help="short-axis slices, base to apex (default 3)")
    parser.add_argument("--frames", type=int, default=60, help="saturation-recovery frames (default 60)")
    parser.add_argument("--coils", type=int, default=16, help="receive coils (default 16)")
    parser.add_argument("--acceleration", type=int, choices=(1, 3), default=3,
                        help="interleaved acceleration of the myocardial series (default 3)")
    parser.add_argument("--images", action="store_true", help="write reconstructed images instead of k-space")
    parser.add_argument("--flow-model", choices=("btex", "fermi"), default="btex",
                        help="myocardial flow model (default btex)")
    parser.set_defaults(func=run, kind=None)
    return parser


def run(args: argparse.Namespace) -> int:
    if args.out.resolve() == args.truth.resolve():
        print("error: OUT and --truth must be different files", file=sys.stderr)
        return 2
    try:
        study = st.sample_study(args.seed, kind=args.kind, field_strength_t=args.field, n_slices=args.slices,
                                n_frames=args.frames, n_coils=args.coils, acceleration=args.acceleration,
                                flow_model=args.flow_model)
    except st.SimulationSettingsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    steps = study.n_slices * 2 + 2
    with tqdm(total=steps, desc="simulate", unit="step", file=sys.stderr) as bar:
        phantoms = []
        for k in range(study.n_slices):
            phantoms.append(st.slice_phantom(study, k))
            bar.update(1)
        writer = mrd.write_images if args.images else mrd.write_kspace
        count = writer(study, str(args.out), phantoms=phantoms, progress=lambda _: bar.update(1))
        truth.write_truth(study, str(args.truth), phantoms)
        bar.update(1)
    logger.info("seed %d: %s, %.1f T, %d slices x %d frames (+%d PD), %d coils, R=%d: wrote %d %s to %s and "
                "truth to %s in %.1f s", study.seed, study.kind, study.field_strength_t, study.n_slices,
                study.n_frames, study.n_pd_frames, study.n_coils, study.acceleration, count,
                "images" if args.images else "acquisitions", args.out, args.truth, time.perf_counter() - started)
    return 0
