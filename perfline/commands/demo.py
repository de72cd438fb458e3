"""``perfline demo``: the one-click perfusion workflow on embedded defaults.

Simulates a stress and a rest scan of one phantom "patient" with a known perfusion defect,
starts a perfline server on a free loopback port, streams both scans through the ``perfusion``
chain like a scanner, and prints the reported against the true MBF per AHA segment, the
myocardial perfusion reserve, the latency from the last acquisition to the report, and the
per-stage times. Reports (PNG, JSON, DICOM) are written under ``--out``. The phantom's
hematocrit is sent as the JSON parameter ``hematocrit`` (a measured lab value) unless
``--no-lab-hematocrit`` (the chain then uses its 0.42 setting).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

# a held-out phantom (seed range never used for training the CNN, models/data.py) whose stress
# scan has a transmural LAD defect and whose rest scan is normal: inducible ischaemia
DEFAULT_SEED = 2**30 + 6


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "demo", help="simulate stress + rest scans and run them through the perfusion chain",
        description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("perfline_demo"), help="output folder (default perfline_demo)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"phantom seed (default {DEFAULT_SEED})")
    parser.add_argument("--field", type=float, choices=(1.5, 3.0), default=1.5, help="field strength, T (default 1.5)")
    parser.add_argument("--chain", default="perfusion", help="chain to run (default perfusion)")
    parser.add_argument("--no-lab-hematocrit", dest="lab_hematocrit", action="store_false",
                        help="do not send the phantom's hematocrit (the chain uses its 0.42 setting)")
    parser.set_defaults(func=run)
    return parser


def _simulate(seed: int, kind: str, field: float, out: Path):
    from perfline.simulator import mrd, study as simulated, truth

    study = simulated.sample_study(seed, kind=kind, field_strength_t=field)
    phantoms = [simulated.slice_phantom(study, k) for k in range(study.n_slices)]
    path = out / f"{kind}.h5"
    mrd.write_kspace(study, str(path), phantoms=phantoms)
    truth.write_truth(study, str(out / f"{kind}_truth.h5"), phantoms)
    return study, path


def run(args: argparse.Namespace) -> int:
    from perfline.server.client import send_dataset
    from perfline.server.testing import running_server
    from perfline.toolbox.aha import SEGMENT_NAMES, territory_of
    from perfline.toolbox.mbf_evaluation import report_from_results, study_mbf_from_report, truth_from_simulator

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    patient = f"demo-{args.seed}"
    rows: dict[str, tuple] = {}
    true_hematocrit: dict[str, float] = {}
    with running_server(output_dir=out / "reports", warm_up=True, wait_for_warm_up=True) as (host, port):
        logger.info("perfline server on %s:%d, reports in %s", host, port, out / "reports")
        for kind in ("stress", "rest"):
            started = time.perf_counter()
            study, path = _simulate(args.seed, kind, args.field, out)
            defects = [d.territory for d in study.perfusion.defects]
            logger.info("simulated %s scan in %.1f s (%s): %s", kind, time.perf_counter() - started,
                        path, f"defect in {', '.join(defects)}" if defects else "no defect")
            true_hematocrit[kind] = float(study.bolus.hematocrit)
            parameters = {"scan": kind, "patient_id": patient, "timings": True}
            if args.lab_hematocrit:
                parameters["hematocrit"] = round(float(study.bolus.hematocrit), 4)
            results = send_dataset(path, host, port, args.chain, parameters=parameters)
            if not results.ok:
                for error in results.errors:
                    print(f"{kind}: {error}", file=sys.stderr)
                return 1
            report_json = report_from_results(results.texts)
            arrival = results.text_times_s[results.texts.index(report_json)] if report_json in results.texts \
                else max(results.text_times_s)
            rows[kind] = (study_mbf_from_report(report_json), truth_from_simulator(study),
                          arrival - results.sent_s, results.stage_timings(), defects,
                          json.loads(report_json))

    print(f"\nperfline demo: patient {patient}, {args.field:g} T, chain {args.chain!r}")
    print(f"{'segment':<26}{'terr':>5}{'stress':>9}{'true':>7}{'rest':>9}{'true':>7}{'MPR':>7}{'true':>7}")
    stress_auto, stress_true = rows["stress"][0], rows["stress"][1]
    rest_auto, rest_true = rows["rest"][0], rows["rest"][1]
    for index in range(16):
        segment = index + 1
        values = (stress_auto.segment_mbf[index], stress_true.segment_mbf[index],
                  rest_auto.segment_mbf[index], rest_true.segment_mbf[index])
        mpr = values[0] / values[2] if values[2] > 0 else np.nan
        mpr_true = values[1] / values[3] if values[3] > 0 else np.nan
        print(f"{segment:>2} {SEGMENT_NAMES[segment]:<23}{territory_of(segment):>5}"
              + "".join(f"{v:>9.2f}{t:>7.2f}" for v, t in ((values[0], values[1]), (values[2], values[3])))
              + f"{mpr:>7.2f}{mpr_true:>7.2f}")
    print(f"{'global':<31}{stress_auto.global_mbf:>9.2f}{stress_true.global_mbf:>7.2f}"
          f"{rest_auto.global_mbf:>9.2f}{rest_true.global_mbf:>7.2f}")
    for kind in ("stress", "rest"):
        auto, truth, latency, stages, defects, report = rows[kind]
        error = 100.0 * (auto.global_mbf - truth.global_mbf) / truth.global_mbf
        hematocrit = (report.get("aif") or {}).get("hematocrit")
        floor = 100.0 * (truth.statistic_global_mbf / truth.global_mbf - 1.0)
        print(f"\n{kind}: true defect: {', '.join(defects) or 'none'}; global MBF error {error:+.1f} % "
              f"(the report's statistic on the TRUE map alone: {floor:+.1f} %); "
              f"hematocrit used {hematocrit if hematocrit is None else format(hematocrit, '.3f')} "
              f"(phantom {true_hematocrit[kind]:.3f}); "
              f"report {latency:.1f} s after the last acquisition; flags: {report.get('flags') or 'none'}")
        if stages:
            print("  stage times (s): " + ", ".join(f"{s['gadget']} {s['busy_s']:.2f}" for s in stages))
    print(f"\nreports (PNG, JSON, DICOM) under {out / 'reports'}")
    return 0
