"""``perfline map``: offline pixel-wise MBF mapping of a Gd series with a given AIF.

Modelled on QPerf's ``gadgetron_QPerf_mapping``. The AIF is a 1-D blood Gd curve (mmol/L),
the series a [rows, cols, time] tissue Gd array on the same uniform time grid. Both are
baseline-corrected with the frames before the AIF foot; the AIF is zero before its foot and
converted to plasma with the hematocrit. The MBF map (ml/min/g) is written by the suffix of
``--out`` (.npy, .nii, .png preview).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

from perfline.toolbox.aif import AifError, aif_foot_peak, blood_to_plasma
from perfline.toolbox.array_io import ArrayIOError, load_array, save_map
from perfline.toolbox.btex import map_btex
from perfline.toolbox.fermi import map_fermi
from perfline.toolbox.flow_fit import FlowMaps, MappingInputError
from perfline.toolbox.flow_models import FlowModelError

logger = logging.getLogger(__name__)

BASELINE_SKIP_FRAMES = 1  # first frame(s) left out of the baseline (steady-state build-up)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "map", help="pixel-wise MBF map from a Gd series and an AIF (offline)",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument("--aif", required=True, help="AIF blood Gd curve, mmol/L: FILE or FILE:VARIABLE")
    parser.add_argument("--series", required=True, help="tissue Gd [rows, cols, time], mmol/L: FILE or FILE:VARIABLE")
    parser.add_argument("--dt", type=float, default=0.5, help="sampling interval, s (default 0.5)")
    parser.add_argument("--hematocrit", type=float, default=0.42, help="blood hematocrit (default 0.42)")
    parser.add_argument("--foot", type=int, default=None,
                        help="AIF foot, 0-based frame index (QPerf's .mat files count from 1); detected if omitted")
    parser.add_argument("--model", choices=("btex", "fermi"), default="btex", help="flow model (default btex)")
    parser.add_argument("--mask", default=None, help="optional [rows, cols] mask: FILE or FILE:VARIABLE, nonzero = fit")
    parser.add_argument("--out", required=True, type=Path, help="MBF map: .npy, .nii or .png")
    parser.add_argument("--all-maps", type=Path, default=None,
                        help="also write every map (MBF, PS, Vp, Visf, delay, fit RMSE) to this .npz")
    parser.set_defaults(func=run)
    return parser


def prepare_inputs(
    aif_blood: np.ndarray, series_rct: np.ndarray, hematocrit: float, foot: int | None
) -> tuple[np.ndarray, np.ndarray, int]:
    """Baseline-correct; return plasma AIF [T], tissue Gd [time, rows, cols] and the foot."""
    aif = np.squeeze(np.asarray(aif_blood, dtype=np.float64))
    if aif.ndim != 1:
        raise MappingInputError(f"AIF must be a 1-D curve, got shape {np.shape(aif_blood)}")
    series = np.asarray(series_rct, dtype=np.float64)
    if series.ndim != 3:
        raise MappingInputError(f"series must be [rows, cols, time], got shape {series.shape}")
    if series.shape[-1] != aif.size:
        raise MappingInputError(
            f"series has {series.shape[-1]} frames ([rows, cols, time] = {series.shape}) "
            f"but the AIF has {aif.size} samples"
        )
    if foot is None:
        foot, peak = aif_foot_peak(aif)
        logger.info("AIF foot detected at frame %d (peak %d)", foot, peak)
    elif not 0 <= foot < aif.size - 2:
        raise MappingInputError(f"--foot must be a frame index in [0, {aif.size - 3}], got {foot}")
    first = min(BASELINE_SKIP_FRAMES, foot)
    aif = aif - aif[first : foot + 1].mean()
    aif[:foot] = 0.0  # no tracer before the bolus arrives; removes baseline noise from the input
    tissue = np.moveaxis(series, -1, 0)
    tissue = tissue - tissue[first : foot + 1].mean(axis=0)
    return blood_to_plasma(aif, hematocrit), tissue, foot


def compute_maps(
    aif_blood: np.ndarray, series_rct: np.ndarray, dt_s: float, hematocrit: float,
    foot: int | None, model: str, mask: np.ndarray | None = None,
) -> FlowMaps:
    """The whole offline computation (used by ``run`` and by the tests)."""
    plasma, tissue, _ = prepare_inputs(aif_blood, series_rct, hematocrit, foot)
    mapper = map_btex if model == "btex" else map_fermi
    return mapper(tissue, plasma, dt_s, mask=mask)


def run(args: argparse.Namespace) -> int:
    try:
        aif = load_array(args.aif)
        series = load_array(args.series)
        mask = np.squeeze(load_array(args.mask)) != 0 if args.mask else None
        maps = compute_maps(aif, series, args.dt, args.hematocrit, args.foot, args.model, mask)
        mbf = maps.mbf_ml_min_g
        save_map(args.out, mbf, title=f"MBF ({args.model})")
        if args.all_maps is not None:
            np.savez(args.all_maps, **maps.as_dict())
    except (ArrayIOError, AifError, MappingInputError, FlowModelError) as error:
        print(f"perfline map: error: {error}", file=sys.stderr)
        return 1
    finite = mbf[np.isfinite(mbf)]
    if finite.size:
        logger.info("MBF (%s): %d pixels fitted, median %.2f ml/min/g (IQR %.2f-%.2f)",
                    args.model, finite.size, np.median(finite), *np.percentile(finite, [25, 75]))
    else:
        logger.warning("no pixel could be fitted")
    return 0
