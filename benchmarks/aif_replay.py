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

The capture also keeps the AIF series as it reaches ``aif-t2star`` (both echoes, PD frames):
:func:`replay_from_t2star` runs ``aif-t2star`` .. ``gd-conversion`` with any chain directory's settings,
resamples onto the cached grid as ``temporal-resample`` does, and then ``aif-extract``: T2* and surface-coil
variants are tried in seconds (docs/preprocessing.md, "T2* fit noise in the AIF"). ``--noise-free``
captures the same scans from k-space simulated without noise (the study's SNR x 1e5), to separate what noise
does from what the method does. ``mbf`` refits each captured scan's MBF with the AIF of one or more chain
directories and the chain's cached tissue series (``mbf_error_sources``), against the simulator's truth.

    python benchmarks/aif_replay.py capture --first-seed 1073742574 --studies 50 --out DIR [--part 0 --parts 2] [--noise-free]
    python benchmarks/aif_replay.py check DIR [--from-t2star]
    python benchmarks/aif_replay.py mbf DIR --chains shipped /path/to/variant [--part 0 --parts 2] --json OUT.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger("perfline.benchmarks.aif_replay")


def save_aif_inputs(path: Path, context: Any, series: Any, hint: Any, curve: Any, t2star_input: Any = None) -> Path:
    """Write one scan's ``aif-extract`` inputs (series, hint, header, parameters) and output curve; with
    ``t2star_input`` (the ``AifSeries`` as it reached ``aif-t2star``) that too, keys ``t2_*``."""
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
    if t2star_input is not None:
        arrays.update({"t2_data": np.asarray(t2star_input.data, np.float32),
                       "t2_time_s": np.asarray(t2star_input.time_s, np.float64),
                       "t2_echo_times_ms": np.asarray(t2star_input.echo_times_ms, np.float64),
                       "t2_units": np.array(t2star_input.units), "t2_n_pd_frames": np.array(t2star_input.n_pd_frames),
                       "t2_stages": np.array(json.dumps(list(t2star_input.stages)))})
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


def load_t2star_input(path: Path) -> Any:
    """The ``AifSeries`` as it reached ``aif-t2star`` (saved by a capture since session 16)."""
    from perfline.gadgets.perfusion_items import AifSeries

    series = load_aif_inputs(path)[0]
    with np.load(path, allow_pickle=False) as z:
        if "t2_data" not in z.files:
            raise ValueError(f"{path}: no aif-t2star input saved (captured before session 16): capture it again")
        return AifSeries(data=z["t2_data"], time_s=z["t2_time_s"],
                         echo_times_ms=tuple(float(v) for v in z["t2_echo_times_ms"]), units=str(z["t2_units"]),
                         n_pd_frames=int(z["t2_n_pd_frames"]), geometry=series.geometry,
                         stages=tuple(json.loads(str(z["t2_stages"]))))


def chain_settings(chain_dir: Path | None = None) -> dict[str, Any]:
    """{gadget name: validated settings} of the ``perfusion`` chain (shipped, or ``chain_dir``'s)."""
    from perfline.core.chain import resolve_chain

    return {step.gadget.name: step.settings for step in resolve_chain("perfusion", chain_dir).gadgets}


def replay_from_t2star(path: Path, chain_dir: Path | None = None) -> Any:
    """The ``AifCurve`` of a cached scan from its ``aif-t2star`` input on: ``aif-t2star``,
    ``surface-coil-correction`` and ``gd-conversion`` with ``chain_dir``'s ``perfusion`` settings (None:
    the shipped chain), linear resampling onto the cached grid as ``temporal-resample`` does (acquired
    frames kept), then ``aif-extract`` with that chain's settings."""
    from perfline.gadgets.perfusion_preprocessing import AifT2StarCorrection, GdConversion, SurfaceCoilCorrection
    from perfline.toolbox.resample import resample_series

    cached, hint, xml, parameters, _ = load_aif_inputs(path)
    settings = chain_settings(chain_dir)
    context = _context(xml, parameters)
    series = load_t2star_input(path)
    for gadget in (AifT2StarCorrection(settings.get("aif-t2star"), context),
                   SurfaceCoilCorrection(settings.get("surface-coil-correction"), context),
                   GdConversion(settings.get("gd-conversion"), context)):
        series = gadget.process_item(series)
    grid = np.asarray(cached.time_s, dtype=np.float64)  # temporal-resample's grid spans every series of the scan
    series = dataclasses.replace(series, data=resample_series(series.data[0], series.time_s, grid)[None],
                                 time_s=grid.copy(), stages=series.stages + ("resample",),
                                 acquired_time_s=np.asarray(series.time_s, dtype=np.float64).copy(),
                                 acquired_data=np.asarray(series.data))
    return _extract(settings["aif-extract"], context, series, hint)


def _context(xml: str, parameters: dict) -> Any:
    """The chain context of a cached scan: its MRD header (None without XML) and client parameters."""
    import ismrmrd

    from perfline.core.gadget import ChainContext

    return ChainContext(header=ismrmrd.xsd.CreateFromDocument(xml) if xml else None, header_xml=xml,
                        parameters=parameters)


def _extract(settings: Any, context: Any, series: Any, hint: Any) -> Any:
    """``aif-extract``'s curve of ``series`` as its ``process`` makes it: the client's hematocrit, and the
    CNN's LV only with ``lv_hint`` on."""
    from perfline.gadgets.mapping import AifExtract, hematocrit_from_parameters

    gadget = AifExtract(settings, context)
    gadget._hematocrit = hematocrit_from_parameters(context.parameters, settings.hematocrit)
    return gadget._extract(series, hint if settings.lv_hint else None)


def replay(path: Path, settings: Any) -> Any:
    """The ``AifCurve`` that ``aif-extract`` with ``settings`` (``AifExtractSettings``) makes of a cached scan."""
    series, hint, xml, parameters, _ = load_aif_inputs(path)
    return _extract(settings, _context(xml, parameters), series, hint)


def shipped_settings(chain_dir: Path | None = None) -> Any:
    """``AifExtractSettings`` of the ``perfusion`` chain (the shipped one, or ``chain_dir``'s)."""
    return chain_settings(chain_dir)["aif-extract"]


def capture(first_seed: int, studies: int, out: Path, part: int = 0, parts: int = 1, noise_free: bool = False) -> int:
    """Run ``studies`` stress + rest scans from ``first_seed`` through the chain; save their AIF inputs
    (and the AIF series as it reached ``aif-t2star``). ``noise_free``: k-space simulated without noise."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import mbf_error_sources
    from perfline.gadgets import mapping, perfusion_preprocessing

    original = mapping.AifExtract._extract
    original_t2star = perfusion_preprocessing.AifT2StarCorrection.process_item
    current: dict[str, Any] = {}

    def recording(self: Any, series: Any, hint: Any) -> Any:
        curve = original(self, series, hint)
        save_aif_inputs(out / f"{current['name']}.npz", self.context, series, hint, curve, current.get("t2star"))
        return curve

    def recording_t2star(self: Any, item: Any) -> Any:
        current["t2star"] = item
        return original_t2star(self, item)

    mapping.AifExtract._extract = recording  # type: ignore[method-assign]
    perfusion_preprocessing.AifT2StarCorrection.process_item = recording_t2star  # type: ignore[method-assign]
    try:
        jobs = [(seed, kind) for seed in range(first_seed, first_seed + studies) for kind in ("stress", "rest")]
        for index, (seed, kind) in enumerate(jobs):
            if index % parts != part or (out / f"{seed}_{kind}.npz").is_file():
                continue
            current.update(name=f"{seed}_{kind}", t2star=None)
            mbf_error_sources.prepare_scan(seed, kind, out / "chain", noise_free=noise_free)
            logger.info("captured %d %s", seed, kind)
    finally:
        mapping.AifExtract._extract = original  # type: ignore[method-assign]
        perfusion_preprocessing.AifT2StarCorrection.process_item = original_t2star  # type: ignore[method-assign]
    return 0


def check(directory: Path, from_t2star: bool = False) -> int:
    """Replay every cached scan with the shipped settings (``from_t2star``: from its ``aif-t2star`` input
    on); 1 if any curve differs from the cached one."""
    settings = shipped_settings()
    worst = 0.0
    files = sorted(directory.glob("*_*.npz"))
    for path in files:
        curve = replay_from_t2star(path) if from_t2star else replay(path, settings)
        cached = load_aif_inputs(path)[4]["curve_blood_gd_mmol_l"]
        difference = float(np.max(np.abs(np.asarray(curve.blood_gd_mmol_l) - cached)))
        worst = max(worst, difference)
        if difference > 1e-9:
            logger.error("%s: replayed curve differs by %.3g mmol/L", path.name, difference)
    print(f"{len(files)} scans replayed, largest difference {worst:.3g} mmol/L")
    return int(worst > 1e-9 or not files)


def refit_mbf(path: Path, curve: Any, cache: Path, chain_dir: Path | None = None) -> dict[str, float]:
    """Global MBF error (%) and sector mean abs error (%) of one captured scan refitted with ``curve``
    (an ``AifCurve``) and the chain's cached tissue series (``cache``: the capture's ``chain`` folder),
    flow-map and aha-report at ``chain_dir``'s ``perfusion`` settings (None: the shipped chain's), report
    summary as ``mbf_error_sources``."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import mbf_error_sources as sources

    settings = chain_settings(chain_dir)
    flow_map = settings["flow-map"]
    report = settings["aha-report"].report_settings()
    seed, kind = path.stem.split("_")
    scan = sources.load_scan(int(seed), kind, cache)
    arrival = curve.arrival_time_s
    grid_aif = np.interp(scan.grid_s, curve.time_s, curve.blood_gd_mmol_l)
    grid_aif[scan.grid_s < arrival] = 0.0
    upsample = flow_map.aif_upsample
    fine = sources.fine_chain_aif(curve.sample_time_s, curve.sample_blood_gd_mmol_l, scan.grid_s, upsample,
                                  flow_map.aif_smoothing, arrival)
    global_pct, sectors_pct = sources.errors_pct(scan, *sources.fit_and_summarise(
        scan, scan.chain_gd, grid_aif, (fine, upsample), scan.cnn, flow_map, place_rv=True, report_settings=report))
    return {"global_pct": global_pct, "sectors_abs_pct": sectors_pct}


def mbf(directory: Path, chains: list[str], json_path: Path, part: int = 0, parts: int = 1) -> int:
    """Refit every captured scan's MBF with the AIF and the flow-map settings of each chain directory
    ("shipped": the shipped chains), one JSON line per scan appended to ``json_path`` (scans already there
    are skipped)."""
    done = set()
    if json_path.is_file():
        done = {row["scan"] for row in map(json.loads, json_path.read_text().splitlines())}
    with open(json_path, "a") as handle:
        for index, path in enumerate(sorted(directory.glob("*_*.npz"))):
            if index % parts != part or path.stem in done:
                continue
            row: dict[str, Any] = {"scan": path.stem, "aif_pixels": int(load_aif_inputs(path)[4]["curve_mask"].sum())}
            for chain in chains:
                chain_dir = None if chain == "shipped" else Path(chain)
                curve = replay_from_t2star(path, chain_dir)
                for key, value in refit_mbf(path, curve, directory / "chain", chain_dir).items():
                    row[f"{Path(chain).name}_{key}"] = value
            handle.write(json.dumps(row) + "\n")
            handle.flush()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    cap = sub.add_parser("capture", help="simulate, run the chain, save aif-extract's inputs")
    cap.add_argument("--first-seed", type=int, required=True)
    cap.add_argument("--studies", type=int, required=True)
    cap.add_argument("--out", type=Path, required=True)
    cap.add_argument("--part", type=int, default=0, help="this process's share (index %% parts == part)")
    cap.add_argument("--parts", type=int, default=1)
    cap.add_argument("--noise-free", action="store_true", help="k-space simulated without noise (SNR x 1e5)")
    chk = sub.add_parser("check", help="replay the cached scans with the shipped settings")
    chk.add_argument("directory", type=Path)
    chk.add_argument("--from-t2star", action="store_true", help="replay from the aif-t2star input on")
    refit = sub.add_parser("mbf", help="refit the captured scans' MBF with the AIF of chain variants")
    refit.add_argument("directory", type=Path)
    refit.add_argument("--chains", nargs="+", required=True, help="'shipped' or chain directories")
    refit.add_argument("--json", type=Path, required=True, help="JSON lines, appended")
    refit.add_argument("--part", type=int, default=0)
    refit.add_argument("--parts", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "capture":
        return capture(args.first_seed, args.studies, args.out, args.part, args.parts, args.noise_free)
    if args.command == "mbf":
        return mbf(args.directory, args.chains, args.json, args.part, args.parts)
    return check(args.directory, args.from_t2star)


if __name__ == "__main__":
    raise SystemExit(main())
