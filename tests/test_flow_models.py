"""Forward models: Fermi and BTEX tissue curves (perfline.toolbox.flow_models)."""

from __future__ import annotations

import numpy as np
import pytest

from perfline.toolbox import flow_models as fm

DT = 0.5
T = 60
TIME = np.arange(T) * DT


def _plasma_aif(peak: float = 5.0, foot_s: float = 8.0) -> np.ndarray:
    x = np.clip(TIME - foot_s, 0.0, None)
    bolus = x**3 * np.exp(-x / 1.5)
    recirculation = 0.4 * (1.0 - np.exp(-x / 8.0))
    return (peak * bolus / bolus.max() + recirculation) / (1.0 - 0.42)


def test_fermi_impulse_response_starts_at_one_and_decays():
    r = fermi_r = fm.fermi_impulse_response(TIME, np.array([0.3, 1.0]), np.array([2.0, 5.0]))
    assert fermi_r.shape == (2, T)
    np.testing.assert_allclose(r[:, 0], 1.0, rtol=1e-12)
    assert np.all(np.diff(r, axis=-1) <= 1e-15)
    assert np.all(fm.fermi_impulse_response(np.array([-1.0]), 0.5, 2.0) == 0.0)


def test_fermi_curve_matches_dense_quadrature():
    aif = _plasma_aif()
    mbf, k, tau = 2.5, 0.4, 3.0
    curve = fm.fermi_tissue_curves(aif, DT, mbf, k, tau)[0]
    # independent: upsample the piecewise-linear AIF 200x and integrate with the trapezoid rule
    fine_t = np.linspace(0.0, TIME[-1], (T - 1) * 200 + 1)
    fine_aif = np.interp(fine_t, TIME, aif)
    fine_r = fm.fermi_impulse_response(fine_t, k, tau)
    h = fine_t[1] - fine_t[0]
    reference = []
    for n in range(T):
        idx = n * 200
        prod = fine_aif[: idx + 1][::-1] * fine_r[: idx + 1]
        reference.append(mbf / 60.0 * h * (prod.sum() - 0.5 * (prod[0] + prod[-1])) if idx else 0.0)
    np.testing.assert_allclose(curve, reference, atol=2e-5 * max(reference))


@pytest.mark.parametrize(
    "params", [(1.0, 1.3, 0.10, 0.20), (3.0, 1.5, 0.05, 0.30), (0.5, 0.6, 0.08, 0.15)],
    ids=["rest", "stress", "low-flow"],
)
def test_btex_converges_to_finite_volume_reference(params):
    aif = _plasma_aif()
    fast = fm.btex_tissue_curves(aif, DT, *params)[0]
    errors = []
    for cells in (50, 200):
        ref = fm.btex_tissue_curves_finite_volume(
            aif, DT, *params, n_cells=cells, interstitial_diffusion_cm2_s=0.0
        )
        errors.append(np.abs(fast - ref).max() / fast.max())
    # the finite-volume solution approaches the closed-form one as the grid is refined
    assert errors[1] < 1e-4
    assert errors[1] <= errors[0] + 1e-7
    # the interstitial diffusion neglected by the fast solver changes the curve by < 0.1 %
    with_disf = fm.btex_tissue_curves_finite_volume(aif, DT, *params, n_cells=200)
    assert np.abs(fast - with_disf).max() / fast.max() < 1e-3


def test_btex_mass_balance_for_a_step_input():
    aif = np.ones(400)
    curve = fm.btex_tissue_curves(aif, DT, 1.5, 1.0, 0.08, 0.25)[0]
    # at equilibrium the tissue holds (Vp + Visf) times the plasma concentration
    np.testing.assert_allclose(curve[-1], 0.08 + 0.25, rtol=2e-3)
    assert abs(curve[0]) < 1e-9
    assert np.all(np.diff(curve) > -1e-9)


def test_btex_initial_slope_is_flow():
    # while no tracer has left the capillary, Q(t) = Fp/60 * integral Cin
    aif = np.ones(T)
    fp = 2.0
    curve = fm.btex_tissue_curves(aif, DT, fp, 1.0, 0.1, 0.2)[0]
    np.testing.assert_allclose(curve[1], fp / 60.0 * DT, rtol=1e-3)


def test_delay_is_a_linear_interpolation_shift_of_the_input():
    aif = _plasma_aif()
    delay = 1.3
    delayed = fm.btex_tissue_curves(aif, DT, 2.0, 1.2, 0.1, 0.2, delay_s=delay)[0]
    shifted_aif = np.interp(TIME - delay, TIME, aif, left=0.0)
    direct = fm.btex_tissue_curves(shifted_aif, DT, 2.0, 1.2, 0.1, 0.2)[0]
    np.testing.assert_allclose(delayed, direct, atol=1e-12)
    fermi_delayed = fm.fermi_tissue_curves(aif, DT, 2.0, 0.5, 3.0, delay_s=delay)[0]
    fermi_direct = fm.fermi_tissue_curves(shifted_aif, DT, 2.0, 0.5, 3.0)[0]
    np.testing.assert_allclose(fermi_delayed, fermi_direct, atol=1e-12)


def test_vectorised_over_parameters_and_linear_in_flow_for_fermi():
    aif = _plasma_aif()
    mbf = np.array([0.5, 1.0, 4.0])
    curves = fm.fermi_tissue_curves(aif, DT, mbf, np.full(3, 0.4), np.full(3, 3.0), np.zeros(3))
    assert curves.shape == (3, T)
    np.testing.assert_allclose(curves[2], 8.0 * curves[0])
    btex = fm.btex_tissue_curves(aif, DT, mbf, np.full(3, 1.0), np.full(3, 0.1), np.full(3, 0.2))
    assert btex.shape == (3, T)
    single = fm.btex_tissue_curves(aif, DT, 1.0, 1.0, 0.1, 0.2)[0]
    np.testing.assert_allclose(btex[1], single)
    assert np.all(np.diff(btex.max(axis=1)) > 0)  # more flow, more uptake


@pytest.mark.parametrize(
    "bad_aif, match",
    [(np.array([1.0, np.nan, 2.0]), "NaN"), (np.ones((3, 3)), "1-D")],
    ids=["nan", "2d"],
)
def test_bad_input_raises(bad_aif, match):
    with pytest.raises(fm.FlowModelError, match=match):
        fm.fermi_tissue_curves(bad_aif, DT, 1.0, 0.5, 3.0)


def test_bad_parameters_raise():
    with pytest.raises(fm.FlowModelError, match="Vp > 0"):
        fm.btex_tissue_curves(_plasma_aif(), DT, 1.0, 1.0, 0.0, 0.2)
    with pytest.raises(fm.FlowModelError, match="dt_s"):
        fm.btex_tissue_curves(_plasma_aif(), 0.0, 1.0, 1.0, 0.1, 0.2)
    with pytest.raises(fm.FlowModelError, match="delays"):
        fm.fermi_tissue_curves(_plasma_aif(), DT, 1.0, 0.5, 3.0, delay_s=-1.0)
