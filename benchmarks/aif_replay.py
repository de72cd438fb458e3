"""An offline lab for the AIF: capture what reaches ``aif-extract`` and replay it with other settings.

The AIF of small LV pools is the largest per-scan error term of the MBF chain (docs/mapping.md,
"The chain's own noise bias, measured"). Working on it needs the AIF series as the chain hands it
to ``aif-extract``, without simulating and reconstructing each scan again (about 10 s per scan).

``capture`` runs simulated scans through the shipped ``perfusion`` chain (via
``mbf_error_sources.prepare_scan``, which also caches the tissue intermediates) and saves, per scan,
the ``AifSeries`` (SR/PD frames [echo, time, rows, cols], times, PD image, acquired frames), the CNN's
``LvHint``, the MRD header and client parameters, and the ``AifCurve`` the chain made of them (npz, no
pickles). :func:`replay` rebuilds ``aif-extract`` with any ``AifExtractSettings`` on those inputs;
``check`` confirms that the shipped settings reproduce the cached curves exactly.

    python benchmarks/aif_replay.py capture --first-seed 1073742574 --studies 50 --out DIR [--part 0 --parts 2]
    python benchmarks/aif_replay.py check DIR
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import tomllib
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger("perfline.benchmarks.aif_replay")


def save_aif_inputs(path: Path, context: Any, series: Any, hint: Any, curve: Any) -> Path:
    """Write one scan's ``aif-extract`` inputs (series, hint, header, parameters) and output curve."""
    arrays: dict[str, np.ndarray] = {
        "data": np.asarray(series.data, np.float32), "time_s": np.asarray(series.time_s, np.float64),
        "echo_times_ms": np.asarray(series.echo_times_ms, np.float64), "units": np.array(series.units),
        "n_pd_frames": np.array(series.n_pd_frames), "stages": np.array(json.dumps(list(series.stages))),
        "geometry": np.array(json.dumps(dataclasses.asdict(series.geometry))),
        "header_xml": np.array(context.header_xml or ""), "parameters": np.array(json.dumps(context.parameters or {})),
        "curve_time_s": np.asarray(curve.time_s), "curve_blood_gd_mmol_l": np.asarray(curve.blood_gd_mmol_l),
        "curve_mask": np.asarray(curve.mask, bool),
        "curve_foot_time_s": np.array(np.nan if curve.foot_time_s is None else curve.foot_time_s),
    }
    if series.pd_image is not None:
        arrays["pd_image"] = np.asarray(series.pd_image)
    if series.acquired_time_s is not None and series.acquired_data is not None:
        arrays["acquired_time_s"] = np.asarray(series.acquired_time_s, np.float64)
        arrays["acquired_data"] = np.asarray(series.acquired_data, np.float32)
    if hint is not None:
        arrays["hint_point_mm"] = np.asarray(hint.point_mm, np.float64)
        arrays["hint_radius_mm"] = np.array(np.nan if hint.radius_mm is None else hint.radius_mm)
        arrays["hint_slice_index"] = np.array(hint.slice_index)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return path


def load_aif_inputs(path: Path) -> tuple[Any, Any, str, dict, dict[str, np.ndarray]]:
    """(``AifSeries``, ``LvHint`` or None, header XML ("" if none), client parameters, the cached
    curve's arrays ``curve_*``) of a file written by :func:`save_aif_inputs`."""
    from perfline.gadgets.mapping import LvHint
    from perfline.gadgets.perfusion_items import AifSeries, ImageGeometry

    with np.load(path, allow_pickle=False) as z:
        fields = json.loads(str(z["geometry"]))
        geometry = ImageGeometry(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
        series = AifSeries(
            data=z["data"], time_s=z["time_s"], echo_times_ms=tuple(float(v) for v in z["echo_times_ms"]),
            units=str(z["units"]), n_pd_frames=int(z["n_pd_frames"]), geometry=geometry,
            pd_image=z["pd_image"] if "pd_image" in z.files else None, stages=tuple(json.loads(str(z["stages"]))),
            acquired_time_s=z["acquired_time_s"] if "acquired_time_s" in z.files else None,
            acquired_data=z["acquired_data"] if "acquired_data" in z.files else None)
        hint = None
        if "hint_point_mm" in z.files:
            radius = float(z["hint_radius_mm"])
            hint = LvHint(point_mm=z["hint_point_mm"], radius_mm=None if np.isnan(radius) else radius,
                          slice_index=int(z["hint_slice_index"]))
        curve = {k: z[k] for k in z.files if k.startswith("curve_")}
        return series, hint, str(z["header_xml"]), json.loads(str(z["parameters"])), curve


def replay(path: Path, settings: Any) -> Any:
    """The ``AifCurve`` that ``aif-extract`` with ``settings`` (``AifExtractSettings``) makes of a cached scan."""
    import ismrmrd

    from perfline.core.gadget import ChainContext
    from perfline.gadgets.mapping import AifExtract, hematocrit_from_parameters

    series, hint, xml, parameters, _ = load_aif_inputs(path)
    header = ismrmrd.xsd.CreateFromDocument(xml) if xml else None
    gadget = AifExtract(settings, ChainContext(header=header, header_xml=xml, parameters=parameters))
    gadget._hematocrit = hematocrit_from_parameters(parameters, settings.hematocrit)
    # as aif-extract's process: with lv_hint off it never takes the CNN's LV
    return gadget._extract(series, hint if settings.lv_hint else None)


def shipped_settings(chain_dir: Path | None = None) -> Any:
    """``AifExtractSettings`` of the ``perfusion`` chain (the shipped one, or ``chain_dir``'s)."""
    from perfline.gadgets.mapping import AifExtractSettings

    path = (chain_dir or Path(__file__).resolve().parents[1] / "chains") / "perfusion.toml"
    with open(path, "rb") as handle:
        chain = tomllib.load(handle)
    (settings,) = [g.get("settings", {}) for g in chain["gadgets"] if g["gadget"] == "aif-extract"]
    return AifExtractSettings(**settings)


def capture(first_seed: int, studies: int, out: Path, part: int = 0, parts: int = 1) -> int:
    """Run ``studies`` stress + rest scans from ``first_seed`` through the chain; save their AIF inputs."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import mbf_error_sources
    from perfline.gadgets import mapping

    original = mapping.AifExtract._extract
    current: dict[str, str] = {}

    def recording(self: Any, series: Any, hint: Any) -> Any:
        curve = original(self, series, hint)
        save_aif_inputs(out / f"{current['name']}.npz", self.context, series, hint, curve)
        return curve

    mapping.AifExtract._extract = recording  # type: ignore[method-assign]
    try:
        jobs = [(seed, kind) for seed in range(first_seed, first_seed + studies) for kind in ("stress", "rest")]
        for index, (seed, kind) in enumerate(jobs):
            if index % parts != part or (out / f"{seed}_{kind}.npz").is_file():
                continue
            current["name"] = f"{seed}_{kind}"
            mbf_error_sources.prepare_scan(seed, kind, out / "chain")
            logger.info("captured %d %s", seed, kind)
    finally:
        mapping.AifExtract._extract = original  # type: ignore[method-assign]
    return 0


def check(directory: Path) -> int:
    """Replay every cached scan with the shipped settings; 1 if any curve differs from the cached one."""
    settings = shipped_settings()
    worst = 0.0
    files = sorted(directory.glob("*_*.npz"))
    for path in files:
        curve = replay(path, settings)
        cached = load_aif_inputs(path)[4]["curve_blood_gd_mmol_l"]
        difference = float(np.max(np.abs(np.asarray(curve.blood_gd_mmol_l) - cached)))
        worst = max(worst, difference)
        if difference > 1e-9:
            logger.error("%s: replayed curve differs by %.3g mmol/L", path.name, difference)
    print(f"{len(files)} scans replayed, largest difference {worst:.3g} mmol/L")
    return int(worst > 1e-9 or not files)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    cap = sub.add_parser("capture", help="simulate, run the chain, save aif-extract's inputs")
    cap.add_argument("--first-seed", type=int, required=True)
    cap.add_argument("--studies", type=int, required=True)
    cap.add_argument("--out", type=Path, required=True)
    cap.add_argument("--part", type=int, default=0, help="this process's share (index % parts == part)")
    cap.add_argument("--parts", type=int, default=1)
    chk = sub.add_parser("check", help="replay the cached scans with the shipped settings")
    chk.add_argument("directory", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "capture":
        return capture(args.first_seed, args.studies, args.out, args.part, args.parts)
    return check(args.directory)


if __name__ == "__main__":
    raise SystemExit(main())
