"""benchmarks/recon_oracles.py: the lab oracles that replace the chain's myocardial recon (benchmarks only)."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SEED = 2**30 + 5  # any study: nothing is trained or tuned on it


def _module(name: str):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _recon_slices(tmp_path: Path, study, oracle: str | None) -> dict[int, np.ndarray]:
    """The myocardial frames [time, rows, cols] of perfusion-recon (shipped settings), by slice."""
    import ismrmrd

    from perfline.core.chain import resolve_chain
    from perfline.core.gadget import ChainContext
    from perfline.core.runtime import run_gadgets
    from perfline.gadgets.perfusion_items import SliceSeries
    from perfline.server.client import dataset_items
    from perfline.simulator.mrd import write_kspace

    oracles = _module("recon_oracles")
    path = tmp_path / "scan.h5"
    if not path.is_file():
        write_kspace(study, str(path))
    xml, items = dataset_items(str(path))
    context = ChainContext(header=ismrmrd.xsd.CreateFromDocument(xml), header_xml=xml,
                           parameters={"scan": "stress", "hematocrit": 0.42})
    recon = resolve_chain("perfusion", None).instantiate(context)[0]
    if oracle is None:
        outputs = run_gadgets([recon], items)
    else:
        with oracles.myocardial_recon_oracle(study, oracle):
            outputs = run_gadgets([recon], items)
    return {item.slice_index: np.asarray(item.data, dtype=np.float64) for item in outputs
            if isinstance(item, SliceSeries)}


def test_true_coil_maps_unfold_the_moving_frames(tmp_path):
    from perfline.gadgets import perfusion_recon
    from perfline.simulator import study as simulated
    from perfline.simulator.mrd import _coil_series

    study = simulated.sample_study(SEED, kind="stress", n_slices=1, n_frames=15)
    study = dataclasses.replace(study, snr_blood_peak=study.snr_blood_peak * 1e5)  # noise-free, with breathing
    moving = _coil_series(study, "myocardium", 0)[0][0].astype(np.float64)  # [time, rows, cols]
    body = moving.mean(axis=0) > 0.1 * moving.mean(axis=0).max()

    def error(frames: np.ndarray) -> float:
        """Median over the body of the per-pixel RMS (over frames) error after one global scale, relative to the
        pixel's mean signal."""
        scale = np.sum(frames[:, body] * moving[:, body]) / np.sum(frames[:, body] ** 2)
        rms = np.sqrt(np.mean((scale * frames[:, body] - moving[:, body]) ** 2, axis=0))
        return float(np.median(rms / moving[:, body].mean(axis=0)))

    shipped = _recon_slices(tmp_path, study, None)[0]
    original = (perfusion_recon.PerfusionRecon._slice, perfusion_recon.reconstruct_compact)
    oracle = _recon_slices(tmp_path, study, "coil-maps")[0]
    assert (perfusion_recon.PerfusionRecon._slice, perfusion_recon.reconstruct_compact) == original  # restored
    assert oracle.shape == shipped.shape == moving.shape
    shading = np.sqrt(np.sum(np.abs(simulated.coil_maps(study, "myocardium", 0, simulated.MYO_SHAPE,
                                                        simulated.MYO_PIXEL_MM)) ** 2, axis=0))
    # with the TRUE maps TSENSE returns the moving object itself (no coil shading: the maps are not normalised)
    assert error(oracle) < 0.005  # measured 0.0023 (the SENSE regularisation)
    # the maps calibrated from the interleaved time average of the breathing body are not (their shading aside)
    assert error(shipped / shading[None]) > 5 * error(oracle)  # measured 0.046
    # the TRUE maps zeroed where the gadget's calibration masks: still far closer than the calibrated maps
    masked = _recon_slices(tmp_path, study, "coil-maps-masked")[0]
    assert error(masked) < 0.5 * error(shipped / shading[None])  # measured 0.0026


def test_image_oracle_returns_the_image_path_frames(tmp_path):
    from perfline.simulator import study as simulated

    oracles = _module("recon_oracles")
    study = simulated.sample_study(SEED, kind="rest", n_slices=1, n_frames=12)
    study = dataclasses.replace(study, snr_blood_peak=study.snr_blood_peak * 1e5)
    frames = _recon_slices(tmp_path, study, "image")[0]
    np.testing.assert_array_equal(frames, oracles.image_domain_frames(study, 0, unwarp=False))
    unwarped = oracles.image_domain_frames(study, 0, unwarp=True)
    still = oracles.image_domain_frames(dataclasses.replace(study, breathing=dataclasses.replace(
        study.breathing, amplitude_mm=0.0, jitter_mm=0.0, expansion=0.0)), 0, unwarp=False)
    body = still.mean(axis=0) > 0.1 * still.mean(axis=0).max()
    # moved back by the TRUE field the frames are the motionless ones but for the simulator's bilinear blur
    moved = np.median(np.abs(frames[:, body] / still[:, body] - 1.0))
    back = np.median(np.abs(unwarped[:, body] / still[:, body] - 1.0))
    assert back < 0.5 * moved


def test_bad_oracle_requests_are_refused(tmp_path):
    oracles = _module("recon_oracles")
    sources = _module("mbf_error_sources")
    with pytest.raises(ValueError, match="oracle must be one of"):
        with oracles.myocardial_recon_oracle(object(), "exact"):
            pass
    with pytest.raises(ValueError, match="noise-free"):
        sources.prepare_scan(SEED, "stress", tmp_path, oracle="image")
    assert not list(tmp_path.iterdir())  # refused before anything was simulated


def test_rise_time_of_a_shifted_curve_and_of_one_with_a_little_early_blood():
    """``mbf_error_sources.rise_time_s`` (the tissue-arrival lab, docs/mapping.md "Session 27"): a curve
    moved 0.3 s earlier rises 0.3 s earlier at every fraction of its peak (within the linear
    interpolation between 0.5 s samples); 2 % of an earlier, taller blood curve moves the 10 % crossing
    most and the 50 % crossing least."""
    sources = _module("mbf_error_sources")
    t = np.arange(0.0, 40.0, 0.5)

    def gamma(start: float, scale: float) -> np.ndarray:
        x = np.clip(t - start, 0.0, None)
        return scale * x**2 * np.exp(-x / 2.0)

    tissue = gamma(10.0, 0.05)
    for fraction in (0.1, 0.2, 0.5):
        shift = sources.rise_time_s(t, gamma(9.7, 0.05), fraction) - sources.rise_time_s(t, tissue, fraction)
        assert abs(shift + 0.3) < 0.05
    blood = gamma(9.0, 1.0)
    early = [sources.rise_time_s(t, tissue + 0.02 * blood, f) - sources.rise_time_s(t, tissue, f) for f in (0.1, 0.5)]
    assert early[0] < early[1] < 0.0
