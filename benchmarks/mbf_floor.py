"""The ladder from the ``perfusion`` chain's MBF error down to what its estimator reaches on perfect inputs (issue 7).

Each scan is run through the chain twice by ``mbf_error_sources.prepare_scan``: with the study's noise
(``--noisy`` cache) and from the same k-space without noise (``--noise-free`` cache; same anatomy, motion,
contrast and heartbeat timing). ``ladder`` refits the BTEX maps with flow-map's shipped settings and
summarises each rung as ``perfline evaluate --mbf`` does (sector medians of the analysed pixels, global =
their pixel-weighted mean; target: the mean true MBF of the myocardium / of each AHA segment):

==============  =====================================================================================
rung            AIF / tissue Gd / mask
==============  =====================================================================================
chain           the chain's AIF / the chain's Gd / the CNN's labels (noisy run: what the chain reports)
true AIF        the TRUE AIF's heartbeat samples / the chain's Gd / the CNN (noisy run)
noise-free      TRUE AIF / the noise-free run's Gd / its CNN (the chain's own systematic tissue errors)
chain tissue    TRUE AIF / the noise-free run's Gd / TRUE labels: the tissue curves' part of "noise-free"
CNN labels      TRUE AIF / TRUE Gd / the noise-free run's CNN (its RV insertions placed as aha-report does):
                the labels' and the sector placement's part
nf chain AIF    the noise-free run's AIF / its Gd / its CNN (with the AIF chain's systematic errors)
chain noise     TRUE AIF / TRUE Gd + (noisy - noise-free chain Gd) / TRUE labels: the chain's own noise,
                as it is (temporally correlated by the low-rank filter and the 0.5 s resampling), on
                perfect curves
perfect         TRUE AIF samples / TRUE Gd (noise-free, no blur) / TRUE labels
continuous AIF  the simulator's continuous LV blood curve / TRUE Gd / TRUE labels: what sampling the AIF
                once per heartbeat costs (a missed trigger at the first pass costs most)
summary         no fit: the TRUE MBF map through the report's statistic (median vs the target's mean)
==============  =====================================================================================

The TRUE AIF / Gd / labels are ``mbf_error_sources.load_scan``'s (the phantom shifted onto the chain's
motion-corrected grid by an integer offset). "chain noise" needs both runs on the same grid: the two
runs' motion corrections differ by little, and what they differ by is counted as noise.

    python benchmarks/mbf_floor.py prepare --first-seed 1073742574 --studies 50 --noisy N --noise-free F [--part 0 --parts 2]
    python benchmarks/mbf_floor.py ladder --noisy N --noise-free F --json L.jsonl [--kinds stress] [--part 0 --parts 2]
    python benchmarks/mbf_floor.py table L.jsonl [L2.jsonl ...]
    python benchmarks/mbf_floor.py tissue --cache C --json T.jsonl [--kinds stress]   # one cache alone

``tissue`` refits only the rungs that need one noise-free cache ("noise-free", "chain tissue", "perfect"): for a
cache prepared with a recon oracle (``mbf_error_sources.py prepare --noise-free --oracle coil-maps``,
``benchmarks/recon_oracles.py``; docs/preprocessing.md "Where the tissue curves' error comes from").

``prepare`` takes 8-15 s per scan and run, ``ladder`` 11 s per scan (9 fitted rungs of 3 slices, the TRUE AIF's
tables shared; one quiet core) on this 2-core machine. Results and their reading: docs/mapping.md, "Session 17" and "Session 18" (the two rungs that
split "noise-free" -> "perfect"; rows written before them lack them and are skipped by ``table``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mbf_error_sources as sources  # noqa: E402

logger = logging.getLogger("mbf_floor")

UPSAMPLE = 4  # flow-map aif_upsample in the shipped chain
RUNGS = ("chain", "true AIF", "noise-free", "chain tissue", "CNN labels", "nf chain AIF", "chain noise", "perfect",
         "continuous AIF", "summary")


def continuous_aif(seed: int, kind: str, grid_s: np.ndarray, upsample: int) -> np.ndarray:
    """The simulator's LV blood Gd (mmol/L) on flow-map's fine grid [upsample * T]: the AIF between heartbeats."""
    from perfline.simulator import dynamics
    from perfline.simulator import study as simulated
    from perfline.toolbox.btex import fine_grid

    study = simulated.sample_study(seed, kind=kind)
    return np.asarray(dynamics.blood_curves(fine_grid(grid_s, upsample), study.bolus)["lv"], dtype=np.float64)


def _fine_chain_aif(scan: sources.ScanInputs, smoothing: str) -> tuple[np.ndarray, int]:
    """The chain AIF's fine curve as flow-map builds it (its samples, zero before its arrival)."""
    if scan.chain_aif_samples is None or scan.chain_aif_foot_s is None:
        raise ValueError(f"seed {scan.seed} {scan.kind}: the cache holds no AIF samples (prepared before session 9?)")
    return sources.fine_chain_aif(*scan.chain_aif_samples, scan.grid_s, UPSAMPLE, smoothing,
                                  scan.chain_aif_foot_s), UPSAMPLE


def ladder_scan(noisy: sources.ScanInputs, clean: sources.ScanInputs, flow_map: Any) -> dict[str, Any]:
    """Global error (%) and sector mean abs error (%) of every rung for one scan (``noisy`` and ``clean``:
    the same scan's noisy and noise-free runs)."""
    if noisy.grid_s.shape != clean.grid_s.shape or len(noisy.chain_gd) != len(clean.chain_gd):
        raise ValueError(f"seed {noisy.seed} {noisy.kind}: the noisy and noise-free runs are not on one grid")
    smoothing = flow_map.aif_smoothing
    true_fine = _true_fine_aif(noisy, smoothing)
    residual = [a - b for a, b in zip(noisy.chain_gd, clean.chain_gd)]
    rungs = {
        "chain": (noisy.chain_aif, _fine_chain_aif(noisy, smoothing), noisy.chain_gd, noisy.cnn, True),
        "true AIF": (noisy.true_aif, true_fine, noisy.chain_gd, noisy.cnn, True),
        "noise-free": (noisy.true_aif, true_fine, clean.chain_gd, clean.cnn, True),
        "chain tissue": (noisy.true_aif, true_fine, clean.chain_gd, noisy.true, False),
        "CNN labels": (noisy.true_aif, true_fine, noisy.true_gd, clean.cnn, True),
        "nf chain AIF": (clean.chain_aif, _fine_chain_aif(clean, smoothing), clean.chain_gd, clean.cnn, True),
        "chain noise": (noisy.true_aif, true_fine, [g + r for g, r in zip(noisy.true_gd, residual)], noisy.true, False),
        "perfect": (noisy.true_aif, true_fine, noisy.true_gd, noisy.true, False),
        "continuous AIF": (noisy.true_aif, (continuous_aif(noisy.seed, noisy.kind, noisy.grid_s, UPSAMPLE), UPSAMPLE),
                           noisy.true_gd, noisy.true, False),
    }
    row = _fit_rungs(noisy, rungs, flow_map)
    # the report on the TRUE map and labels, as truth_from_simulator computed it (StudyMbf.statistic_*)
    row["summary"], row["summary sectors"] = sources.errors_pct(
        noisy, noisy.truth.statistic_global_mbf, noisy.truth.statistic_segment_mbf)
    return row


TISSUE_RUNGS = ("noise-free", "chain tissue", "perfect")


def tissue_scan(clean: sources.ScanInputs, flow_map: Any) -> dict[str, Any]:
    """The rungs of one cache alone (``TISSUE_RUNGS``, defined as in :func:`ladder_scan` with ``clean`` for
    both runs): a noise-free run, or one prepared with a recon oracle (``mbf_error_sources prepare --oracle``),
    against the same scan's TRUE curves."""
    true_fine = _true_fine_aif(clean, flow_map.aif_smoothing)
    rungs = {
        "noise-free": (clean.true_aif, true_fine, clean.chain_gd, clean.cnn, True),
        "chain tissue": (clean.true_aif, true_fine, clean.chain_gd, clean.true, False),
        "perfect": (clean.true_aif, true_fine, clean.true_gd, clean.true, False),
    }
    return _fit_rungs(clean, rungs, flow_map)


def _true_fine_aif(scan: sources.ScanInputs, smoothing: str) -> tuple[np.ndarray, int]:
    """The TRUE AIF's heartbeat samples on flow-map's fine grid, as flow-map builds its sampled table."""
    from perfline.toolbox.btex import aif_on_fine_grid

    return aif_on_fine_grid(*scan.true_aif_samples, scan.grid_s, UPSAMPLE, smoothing=smoothing), UPSAMPLE


def _fit_rungs(scan: sources.ScanInputs, rungs: dict[str, tuple], flow_map: Any) -> dict[str, Any]:
    """A JSON row: every rung's (AIF, fine AIF, series, segmentation, place the CNN's RV) fitted and summarised."""
    row: dict[str, Any] = {"seed": scan.seed, "kind": scan.kind, "truth": float(scan.truth.global_mbf)}
    tables: dict = {}  # the rungs with the TRUE AIF share its BTEX tables (fit_slice's cache is keyed by the AIF)
    for name, (aif, fine, series, segmentation, cnn) in rungs.items():
        global_mbf, sectors = sources.fit_and_summarise(scan, series, aif, fine, segmentation, flow_map,
                                                        place_rv=cnn, tables=tables)
        row[name], row[name + " sectors"] = sources.errors_pct(scan, global_mbf, sectors)
    return row


def ladder(noisy: Path | None, clean: Path, json_path: Path, kinds: tuple[str, ...], part: int = 0,
           parts: int = 1) -> int:
    """Append one JSON line per scan found in both caches to ``json_path`` (scans already there are skipped);
    ``noisy`` None: the ``TISSUE_RUNGS`` of every scan of ``clean`` alone (:func:`tissue_scan`)."""
    import aif_replay

    flow_map = aif_replay.chain_settings()["flow-map"]
    done = set()
    if json_path.is_file():
        done = {(r["seed"], r["kind"]) for r in map(json.loads, json_path.read_text().splitlines())}
    found = {tuple(p.stem.split("_")) for p in clean.glob("*_*.npz")}
    if noisy is not None:
        found &= {tuple(p.stem.split("_")) for p in noisy.glob("*_*.npz")}
    scans = [(int(seed), kind) for seed, kind in sorted(found) if kind in kinds]
    first = "noise-free" if noisy is None else "chain"  # the rung logged
    if not scans:
        raise SystemExit(f"no scan of kinds {kinds} is in {clean}" + ("" if noisy is None else f" and {noisy}"))
    with open(json_path, "a") as handle:
        for index, (seed, kind) in enumerate(scans):
            if index % parts != part or (seed, kind) in done:
                continue
            if noisy is None:
                row = tissue_scan(sources.load_scan(seed, kind, clean), flow_map)
            else:
                row = ladder_scan(sources.load_scan(seed, kind, noisy), sources.load_scan(seed, kind, clean), flow_map)
            handle.write(json.dumps(row) + "\n")
            handle.flush()
            logger.info("%d %s: %s %+.1f %%, perfect %+.1f %%", seed, kind, first, row[first], row["perfect"])
    return 0


def table(paths: list[Path]) -> str:
    """Per kind: mean signed, mean abs and median abs global error (%), sector mean abs (%) of every rung."""
    rows = [json.loads(line) for path in paths for line in path.read_text().splitlines() if line.strip()]
    lines = ["| rung | " + " | ".join(f"{kind} (n)" for kind in ("stress", "rest", "all")) + " |",
             "|---|---|---|---|"]
    for rung in RUNGS:
        cells = []
        for kind in ("stress", "rest", "all"):
            chosen = [r for r in rows if kind in ("all", r["kind"]) and np.isfinite(r.get(rung, np.nan))]
            if not chosen:
                cells.append("-")
                continue
            values = np.array([r[rung] for r in chosen])
            sectors = np.nanmean([r[rung + " sectors"] for r in chosen])
            cells.append(f"{values.mean():+.2f} ({np.abs(values).mean():.2f}, {np.median(np.abs(values)):.2f}) / "
                         f"{sectors:.2f} ({len(chosen)})")
        lines.append(f"| {rung} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="run the chain on each scan with and without noise, cache both")
    prep.add_argument("--first-seed", type=int, required=True)
    prep.add_argument("--studies", type=int, required=True)
    lad = sub.add_parser("ladder", help="refit every rung of the cached scans")
    lad.add_argument("--json", type=Path, required=True, help="output, one JSON line per scan (appended)")
    for command in (prep, lad):
        command.add_argument("--noisy", type=Path, required=True, help="cache of the runs with noise")
        command.add_argument("--noise-free", type=Path, required=True, help="cache of the runs without noise")
        command.add_argument("--kinds", default="stress,rest", help="comma-separated: stress, rest")
        command.add_argument("--part", type=int, default=0, help="this process's share (index %% parts == part)")
        command.add_argument("--parts", type=int, default=1)
    tis = sub.add_parser("tissue", help=(
        "the rungs of one cache alone (noise-free, chain tissue, perfect): a noise-free run or a recon oracle's"))
    tis.add_argument("--json", type=Path, required=True, help="output, one JSON line per scan (appended)")
    tis.add_argument("--cache", type=Path, required=True, help="cache of noise-free (or oracle) runs")
    tis.add_argument("--kinds", default="stress,rest", help="comma-separated: stress, rest")
    tis.add_argument("--part", type=int, default=0, help="this process's share (index %% parts == part)")
    tis.add_argument("--parts", type=int, default=1)
    tab = sub.add_parser("table", help="mean signed (mean abs, median abs) global error %% / sector mean abs %%")
    tab.add_argument("json", type=Path, nargs="+")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for name in ("perfline", "numba", "openvino"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if args.command == "table":
        print(table(args.json))
        return 0
    kinds = tuple(kind for kind in args.kinds.split(",") if kind)
    unknown = set(kinds) - set(sources.KINDS)
    if unknown:
        parser.error(f"--kinds takes {', '.join(sources.KINDS)}, found {', '.join(sorted(unknown))}")
    if args.command == "prepare":
        jobs = [(seed, kind) for seed in range(args.first_seed, args.first_seed + args.studies) for kind in kinds]
        for index, (seed, kind) in enumerate(jobs):
            if index % args.parts == args.part:
                sources.prepare_scan(seed, kind, args.noisy)
                sources.prepare_scan(seed, kind, args.noise_free, noise_free=True)
        return 0
    if args.command == "tissue":
        return ladder(None, args.cache, args.json, kinds, args.part, args.parts)
    return ladder(args.noisy, args.noise_free, args.json, kinds, args.part, args.parts)


if __name__ == "__main__":
    raise SystemExit(main())
