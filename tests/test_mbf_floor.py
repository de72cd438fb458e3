"""benchmarks/mbf_floor.py: the ladder's rungs on a scan whose "chain" intermediates are the simulator's truth."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SEED = 2**30 + 3  # any study: nothing is trained or tuned on it


def _module():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("mbf_floor", ROOT / "benchmarks" / "mbf_floor.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _truth_as_chain_cache(cache: Path, seed: int, kind: str) -> None:
    """A cache file in prepare_scan's format whose Gd series, labels and AIF are the simulator's truth."""
    from perfline.simulator import study as simulated
    from perfline.toolbox.resample import resample_series

    study = simulated.sample_study(seed, kind=kind)
    phantoms = [simulated.slice_phantom(study, i) for i in range(study.n_slices)]
    grid = np.arange(max(p.time_s[0] for p in phantoms), min(p.time_s[-1] for p in phantoms), 0.5)
    sample_time, sample_blood = simulated.aif_gd_truth(study)
    blood = np.interp(grid, sample_time, sample_blood)
    # the arrival as aif-extract's foot_from_samples places it: the last sample before the rise
    rise = int(np.argmax(sample_blood > 0.01 * sample_blood.max()))
    foot_time = float(sample_time[max(rise - 1, 0)])
    arrays = {"hematocrit": np.array(round(float(study.bolus.hematocrit), 4)), "aif_time": grid, "aif_blood": blood,
              "aif_foot": np.array(int(np.searchsorted(grid, foot_time))), "aif_foot_time": np.array(foot_time),
              "aif_sample_time": sample_time, "aif_sample_blood": sample_blood}
    for i, phantom in enumerate(phantoms):
        arrays[f"gd{i}"] = resample_series(phantom.gd.astype(np.float64), phantom.time_s, grid).astype(np.float32)
        arrays[f"time{i}"] = grid
        arrays[f"labels{i}"] = phantom.anatomy.labels.astype(np.uint8)
        arrays[f"lvc{i}"] = np.asarray(phantom.anatomy.lv_center_rc, dtype=np.float64)
        arrays[f"rvi{i}"] = np.array(float(phantom.anatomy.rv_insertion_deg))
    cache.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(cache / f"{seed}_{kind}.npz", **arrays)


def test_rungs_agree_where_their_inputs_are_the_same(tmp_path):
    floor = _module()
    _truth_as_chain_cache(tmp_path / "noisy", SEED, "stress")
    _truth_as_chain_cache(tmp_path / "clean", SEED, "stress")
    out = tmp_path / "ladder.jsonl"
    assert floor.main(["ladder", "--noisy", str(tmp_path / "noisy"), "--noise-free", str(tmp_path / "clean"),
                       "--json", str(out), "--kinds", "stress"]) == 0
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert set(floor.RUNGS) <= set(row)
    # identical runs: no noise residual, and the noise-free rung is the true-AIF rung
    assert row["chain noise"] == row["perfect"]
    assert row["noise-free"] == row["true AIF"]
    # the noise-free run's tissue is the truth here (stored as float32): its rung is the perfect one
    assert abs(row["chain tissue"] - row["perfect"]) < 1e-3
    # the "chain" AIF is the true one zeroed before its foot: the same MBF within a fraction of a per cent
    assert abs(row["chain"] - row["true AIF"]) < 0.5
    for rung in floor.RUNGS:
        assert np.isfinite(row[rung]) and np.isfinite(row[rung + " sectors"]), rung
    # perfect inputs: within the estimator's own error of the truth (this study: +7.6 %, of which the report's
    # statistic +2.9 %; docs/mapping.md "Session 17")
    assert abs(row["perfect"]) < 15 and abs(row["summary"]) < 10
    # a second run skips the scan already written
    assert floor.main(["ladder", "--noisy", str(tmp_path / "noisy"), "--noise-free", str(tmp_path / "clean"),
                       "--json", str(out), "--kinds", "stress"]) == 0
    assert len(out.read_text().splitlines()) == 1
    # "tissue": the same rungs from the noise-free cache alone (for caches of a recon oracle)
    alone = tmp_path / "tissue.jsonl"
    assert floor.main(["tissue", "--cache", str(tmp_path / "clean"), "--json", str(alone), "--kinds", "stress"]) == 0
    (tissue,) = [json.loads(line) for line in alone.read_text().splitlines()]
    assert {key for key in tissue if key not in ("seed", "kind", "truth")} == \
        {name + suffix for name in floor.TISSUE_RUNGS for suffix in ("", " sectors")}
    for rung in floor.TISSUE_RUNGS:
        assert tissue[rung] == row[rung] and tissue[rung + " sectors"] == row[rung + " sectors"], rung


def test_table_averages_each_rung_per_kind(tmp_path):
    floor = _module()
    rows = []
    for seed, kind, value in ((1, "stress", -4.0), (2, "stress", 2.0), (1, "rest", 1.0)):
        row = {"seed": seed, "kind": kind}
        for rung in floor.RUNGS:
            row[rung], row[rung + " sectors"] = value, abs(value) * 2
        rows.append(row)
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    text = floor.table([path])
    line = next(line for line in text.splitlines() if line.startswith("| perfect |"))
    stress, rest, both = [cell.strip() for cell in line.strip("|").split("|")[1:]]
    assert stress == "-1.00 (3.00, 3.00) / 6.00 (2)"
    assert rest == "+1.00 (1.00, 1.00) / 2.00 (1)"
    assert both.endswith("(3)")


def test_unknown_kind_is_refused(tmp_path, capsys):
    floor = _module()
    with pytest.raises(SystemExit):
        floor.main(["ladder", "--noisy", str(tmp_path), "--noise-free", str(tmp_path), "--json",
                    str(tmp_path / "x.jsonl"), "--kinds", "stres"])
    assert "--kinds takes stress, rest, found stres" in capsys.readouterr().err
