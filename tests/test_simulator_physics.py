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
