"""Physics of the simulator: tissue curves follow their model, the ideal model recovers MBF."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import optimize

from perfline.simulator import dynamics
from perfline.simulator import study as st
from perfline.simulator.image_study import image_slice
from perfline.toolbox import flow_models


def _pure_myocardium_pixels(phantom: st.SlicePhantom, count: int) -> np.ndarray:
    """Flat indices of pixels that are 100 % myocardium, evenly picked around the ring."""
    pure = np.flatnonzero((phantom.anatomy.fractions["myocardium"].ravel() >= 0.999)
                          & (phantom.anatomy.labels.ravel() == 2))
    assert pure.size >= count
    return pure[np.linspace(0, pure.size - 1, count).astype(int)]


@pytest.mark.parametrize("model", ["fermi", "btex"])
def test_truth_gd_of_myocardium_follows_the_flow_model(model):
    study = st.sample_study(11, kind="stress", n_frames=40, flow_model=model)
    phantom = st.slice_phantom(study, 1)
    pixels = _pure_myocardium_pixels(phantom, 6)
    mbf = phantom.mbf.ravel()[pixels].astype(np.float64)
    fine = st.contrast_model(study).fine_time_s
    lv = dynamics.blood_curves(fine, study.bolus)["lv"]
    plasma = lv / (1.0 - study.bolus.hematocrit)
    t = study.tissue
    if model == "fermi":
        expected = flow_models.fermi_tissue_curves(plasma, dynamics.FINE_DT_S, mbf, np.full(6, t.fermi_k_per_s),
                                                   np.full(6, t.fermi_tau_s), t.delay_s)
    else:
        expected = flow_models.btex_tissue_curves(plasma, dynamics.FINE_DT_S, mbf, np.full(6, t.ps_ml_min_g),
                                                  np.full(6, t.vp), np.full(6, t.visf), t.delay_s)
    expected_at_frames = np.array([np.interp(phantom.time_s, fine, curve) for curve in expected])
    simulated = phantom.gd.reshape(phantom.gd.shape[0], -1)[:, pixels].T
    peak = expected_at_frames.max(axis=1, keepdims=True)
    assert np.all(np.abs(simulated - expected_at_frames) <= 0.005 * peak)


def test_blood_curves_rv_ahead_of_lv_and_peaks_in_range():
    for seed in range(20):
        study = st.sample_study(seed)
        fine = st.contrast_model(study).fine_time_s
        blood = dynamics.blood_curves(fine, study.bolus)
        assert fine[np.argmax(blood["rv"])] < fine[np.argmax(blood["lv"])]
        assert 2.8 <= blood["lv"].max() <= 7.5
        # recirculation and plateau: blood stays enhanced after the first pass
        assert blood["lv"][-1] > 0.05 * blood["lv"].max()
        # fat has no dynamics, muscle enhances slowly
        curves = st.contrast_model(study).class_curves
        assert np.all(curves["subcutaneous_fat"] == 0)
        assert curves["muscle"].max() < 0.3 * blood["lv"].max()


def _fermi_model(params: np.ndarray, plasma: np.ndarray, fine: np.ndarray, times: np.ndarray) -> np.ndarray:
    mbf, k, tau, delay = params
    curve = flow_models.fermi_tissue_curves(plasma, dynamics.FINE_DT_S, np.array([mbf]), np.array([k]),
                                            np.array([tau]), max(delay, 0.0))[0]
    return np.interp(times, fine, curve)


def test_fit_of_noise_free_motion_free_study_recovers_true_mbf_within_one_percent():
    """Gd from the image path (SR/PD through the LUT, no noise, no motion) fitted with the
    ideal model (Fermi, direct least squares with the true AIF) gives the true MBF."""
    study = st.sample_study(5, kind="stress", n_frames=50, flow_model="fermi")
    sl = image_slice(study, 1, noise=False, motion=False)
    phantom = st.slice_phantom(study, 1)
    fine = st.contrast_model(study).fine_time_s
    plasma = dynamics.blood_curves(fine, study.bolus)["lv"] / (1.0 - study.bolus.hematocrit)
    times = sl.time_s[sl.n_pd_frames:]
    pixels = _pure_myocardium_pixels(phantom, 8)
    errors = []
    for pixel in pixels:
        measured = sl.gd.reshape(sl.gd.shape[0], -1)[:, pixel].astype(np.float64)
        true_mbf = float(sl.mbf.ravel()[pixel])
        start = np.array([0.7 * true_mbf, 0.3, 2.0, 0.5])
        fit = optimize.least_squares(lambda p: _fermi_model(p, plasma, fine, times) - measured, start,
                                     bounds=([0.05, 0.01, 0.1, 0.0], [8.0, 3.0, 10.0, 3.0]), x_scale=[1, 0.1, 1, 0.5])
        errors.append(fit.x[0] / true_mbf - 1.0)
    print("relative MBF errors", np.round(errors, 5))
    assert np.max(np.abs(errors)) < 0.01, f"relative MBF errors {np.round(errors, 4)}"


def test_image_gd_equals_truth_gd_in_pure_myocardium_without_noise():
    study = st.sample_study(8, kind="rest", n_frames=30, flow_model="fermi")
    sl = image_slice(study, 0, noise=False, motion=False)
    phantom = st.slice_phantom(study, 0)
    pixels = _pure_myocardium_pixels(phantom, 20)
    truth = phantom.gd.reshape(phantom.gd.shape[0], -1)[sl.n_pd_frames:, pixels]
    measured = sl.gd.reshape(sl.gd.shape[0], -1)[:, pixels]
    assert np.allclose(measured, truth, atol=0.01 * truth.max())


def test_noise_level_matches_the_requested_snr():
    study = st.sample_study(3, n_frames=20)
    noisy = image_slice(study, 1, noise=True, motion=False)
    clean = image_slice(study, 1, noise=False, motion=False)
    sigma = st.noise_sigma(study)
    # where the signal is far above the noise, Rician noise is nearly Gaussian with SD sigma
    strong = clean.signal > 20 * sigma
    measured = np.std((noisy.signal - clean.signal)[strong])
    assert measured == pytest.approx(sigma, rel=0.05)


def test_dual_echo_aif_recovers_blood_gd_after_t2star_correction():
    """Noise-free AIF echoes of pure LV-blood pixels: T2* correction from the two echoes, SR/PD
    through the AIF LUT (blood, FLASH) gives the true LV Gd; echo 2 is darker at the peak."""
    from perfline.toolbox.bloch import GdLookupTable

    study = st.sample_study(12, kind="rest", n_frames=40)
    echoes, sl = st.aif_phantom(study)
    time_s, truth = st.aif_gd_truth(study)
    pure = sl.fractions["lv_blood"] >= 0.999
    assert pure.sum() >= 4
    s1, s2 = echoes[0][:, pure].mean(axis=1), echoes[1][:, pure].mean(axis=1)
    peak = int(np.argmax(truth))
    assert s2[peak] < 0.97 * s1[peak], "T2* decay between the echoes at the bolus peak"
    te1, te2 = st.AIF_ECHO_TIMES_MS
    r2star = np.log(s1 / s2) / ((te2 - te1) / 1000.0)
    corrected = s1 * np.exp(te1 / 1000.0 * r2star)
    ratio = corrected[study.n_pd_frames:] / corrected[:study.n_pd_frames].mean()
    lut = GdLookupTable(study.aif_sequence, "blood", gd_max_mmol_l=40.0)
    recovered = lut.to_gd(ratio)
    expected = truth[study.n_pd_frames:]
    assert np.max(np.abs(recovered - expected)) < 0.01 * expected.max()
    # uncorrected echo 1 underestimates the peak (the reason for the dual echo)
    uncorrected = lut.to_gd(s1[study.n_pd_frames:] / s1[:study.n_pd_frames].mean())
    assert uncorrected.max() < 0.99 * expected.max()


def _feet_s(bolus: dynamics.BolusParameters) -> dict[str, float]:
    """Foot of each blood curve (s), as ``dynamics.blood_curves`` places them."""
    return {"lv": bolus.lv_foot_s, "rv": bolus.lv_foot_s - bolus.rv_lead_s,
            "aorta": bolus.lv_foot_s + bolus.aorta_delay_s, "pulmonary": bolus.lv_foot_s - 0.5 * bolus.rv_lead_s}


@pytest.mark.parametrize("kind", ["stress", "rest"])
def test_blood_curves_are_causal_and_continuous(kind):
    """No Gd in any blood curve before its own foot (rest scans have no residual dose either);
    the curves rise from 0 continuously: on a 5 ms grid no step exceeds a slope of 5 peaks per s."""
    for seed in range(8):
        bolus = st.sample_study(seed, kind=kind).bolus
        fine = np.arange(0.0, 70.0, 0.005)
        blood = dynamics.blood_curves(fine, bolus)
        for name, foot in _feet_s(bolus).items():
            curve = blood[name]
            assert np.all(curve[fine <= foot] == 0.0), (seed, name)
            assert curve[fine > foot + 0.5].min() > 0.0, (seed, name)
            # continuity: 5 ms steps at most 2.5 % of the peak (a jump, e.g. a plateau switched
            # on at the foot, would be 12-22 % of it)
            assert np.abs(np.diff(curve)).max() < 0.025 * curve.max(), (seed, name)
            # and smooth at the foot: 0.1 s after it the curve is still under 1 % of its peak
            assert curve[np.searchsorted(fine, foot + 0.1)] < 0.01 * curve.max(), (seed, name)


def test_plateau_is_causal_and_keeps_the_late_level_of_the_former_logistic():
    rise = 4.0
    t = np.linspace(-20.0, 80.0, 10001)
    plateau = dynamics.plateau_fraction(t, rise)
    assert np.all(plateau[t <= 0] == 0.0)
    assert np.all(np.diff(plateau) >= 0.0) and plateau[-1] == pytest.approx(1.0, abs=1e-6)
    former = 1.0 / (1.0 + np.exp(-(t - 1.5 * rise) / (0.8 * rise)))
    late = t >= 1.5 * rise
    assert np.abs(plateau[late] - former[late]).max() < 0.02
    # the logistic was the reason for this change: 0.13 of the plateau already at the foot
    assert former[np.searchsorted(t, 0.0)] > 0.1


def test_late_blood_level_is_the_plateau():
    """Long after the first pass and the recirculation only the plateau is left:
    peak x plateau_ratio x exp(-(t - foot) / 400 s)."""
    for seed in range(6):
        bolus = st.sample_study(seed).bolus
        t = bolus.lv_foot_s + np.array([60.0, 90.0, 120.0])
        lv = dynamics.blood_curves(t, bolus)["lv"]
        expected = bolus.lv_peak_mmol_l * bolus.plateau_ratio * np.exp(-(t - bolus.lv_foot_s) / 400.0)
        assert np.allclose(lv, expected, rtol=0.01), seed


@pytest.mark.parametrize("kind", ["stress", "rest"])
def test_tissue_curves_are_causal_and_reach_the_linear_steady_state(kind):
    """Myocardium (BTEX) and the Tofts tissues are zero before their feeding blood curve's foot
    (+ the myocardial delay); on the slow plateau the BTEX tissue approaches its steady state
    (vp + visf) Cp (the plateau washes out with 400 s, so it lags by a few %)."""
    study = st.sample_study(21, kind=kind, flow_model="btex")
    bolus, tissue = study.bolus, study.tissue
    fine = dynamics.fine_grid(bolus.lv_foot_s + 200.0)
    lv = dynamics.blood_curves(fine, bolus)["lv"]
    myocardium = dynamics.MyocardialCurves(tissue, lv, bolus.hematocrit)
    curves = dynamics.tissue_curves_fine(fine, bolus, myocardium, study.perfusion.normal_mbf_ml_min_g)
    myo = myocardium.curves(np.array([study.perfusion.normal_mbf_ml_min_g]))[0]
    # the flow models take the AIF as linear between fine-grid samples, which spreads the first
    # non-zero AIF sample over the grid step before it: exactly 0 up to one step before the foot
    onset = bolus.lv_foot_s + tissue.delay_s
    assert np.all(myo[fine <= onset - dynamics.FINE_DT_S] == 0.0)
    assert np.all(np.abs(myo[fine <= onset]) < 1e-4 * myo.max())
    assert myo.max() > 0.1
    feet = _feet_s(bolus)
    for name, (_, _, _, feed) in dynamics._TOFTS.items():
        assert np.all(curves[name][fine <= feet[feed]] == 0.0), name
        assert curves[name][-1] > 0.0, name
    plasma = lv / (1.0 - bolus.hematocrit)
    late = fine >= bolus.lv_foot_s + 150.0
    ratio = myo[late] / plasma[late]
    assert np.all(ratio > tissue.vp + tissue.visf) and np.all(ratio < 1.08 * (tissue.vp + tissue.visf))
