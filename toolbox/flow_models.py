"""Forward models of myocardial tissue Gd curves: Fermi and two-region BTEX.

Shared by the simulator (ground truth) and the mappers (fitting). Conventions (binding):

- The input is the **plasma** AIF ``Cp = Cb / (1 - Hct)`` in mmol/L on a uniform time grid
  ``t_n = n * dt_s`` (``n = 0 .. T-1``), taken as piecewise linear between samples (hat basis).
- MBF is plasma flow ``Fp`` in ml/min/g with tissue density 1 g/ml, so the flow per second is
  ``Fp / 60``. The tissue curve is ``Q(t) = (Fp / 60) * integral Cp(t - u) R(u) du`` where R is
  the tissue residue function with ``R(0+) = 1`` (REFERENCES.md section 4).
- A delay ``d`` (s) shifts the input later: the model is evaluated with ``Cp(t - d)`` linearly
  interpolated from the samples (zero before ``t = 0``). Because the discrete model is a
  convolution, this is exactly a linear-interpolation shift of the output curve.
- Parameters broadcast to a leading shape ``[N]``; curves come back as ``[N, T]`` float64.

The convolution is exact for a piecewise-linear input: the residue function is integrated
against the hat functions (``hat_weights``), then ``Q[n] = (Fp/60) sum_m Cp[m] W[n - m]``.

BTEX (Bassingthwaighte two-region blood-tissue exchange, capillary length L = 0.1 cm,
plasma axial dispersion Dp = 1e-5 cm2/s, Danckwerts inflow boundary, zero flux at x = L):
solved in the Laplace domain, where the plasma equation is a constant-coefficient ODE in x
with the closed-form outflow transfer function (Wehner-Wilhelm form)

    H(s) = 4 q exp(Pe (1 - q) / 2) / ((1 + q)^2 - (1 - q)^2 exp(-Pe q)),
    q = sqrt(1 + 4 g(s) tau / Pe),  g(s) = s + (PS / Vp) s / (s + PS / Visf),
    tau = Vp / Fp,  Pe = L^2 / (Dp tau),

and the residue function is ``R = 1 - integral h``. The interstitial axial diffusion
(Disf = 1e-6 cm2/s) is neglected in this fast solver: its diffusion time over L is about
1e4 s against a 60 s acquisition. ``btex_tissue_curves_finite_volume`` solves the full PDE
(including Disf) by finite volumes with exact time stepping, as the independent reference.
"""

from __future__ import annotations

import logging

import numpy as np
import scipy.linalg
import scipy.special

logger = logging.getLogger(__name__)

CAPILLARY_LENGTH_CM = 0.1
PLASMA_DISPERSION_CM2_S = 1e-5
INTERSTITIAL_DIFFUSION_CM2_S = 1e-6

# Gauss-Legendre nodes/weights on [0, 1] used to integrate the Fermi residue over each sample
# interval against the two linear halves of the hat functions (exact for degree 7 polynomials)
_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(4)
_GL_NODES = 0.5 * (_GL_NODES + 1.0)
_GL_WEIGHTS = 0.5 * _GL_WEIGHTS

# aliases kept on each side when sampling the hat-filtered BTEX residue from its spectrum; the
# truncation error is below dt / (2 pi^3 K^2), i.e. < 0.1 % of a sample weight for K = 6
_ALIAS_TERMS = 6
# damping of the spectrum (exp(-sigma t)) in units of 1 / (FFT period): removes wrap-around
_DAMPING_PER_PERIOD = 25.0


class FlowModelError(ValueError):
    """Invalid input to a flow model (shape, grid or parameter range)."""


def _check_aif(aif_plasma_mmol_l: np.ndarray, dt_s: float) -> np.ndarray:
    aif = np.asarray(aif_plasma_mmol_l, dtype=np.float64)
    if aif.ndim != 1 or aif.size < 2:
        raise FlowModelError(f"AIF must be a 1-D curve of at least 2 samples, got shape {aif.shape}")
    if not np.all(np.isfinite(aif)):
        raise FlowModelError("AIF contains NaN or infinite values")
    if not (np.isfinite(dt_s) and dt_s > 0):
        raise FlowModelError(f"dt_s must be a positive number of seconds, got {dt_s}")
    return aif


def fermi_impulse_response(
    time_s: np.ndarray, k_per_s: np.ndarray | float, tau_s: np.ndarray | float
) -> np.ndarray:
    """Normalised Fermi residue function (Jerosch-Herold 1998).

    ``R(t) = (1 + exp(-k tau)) / (1 + exp(k (t - tau)))`` for ``t >= 0`` and 0 before, so that
    ``R(0) = 1`` exactly and the flow is the amplitude of ``F * R``. ``time_s`` has shape [T];
    ``k_per_s`` (1/s, > 0) and ``tau_s`` (s, the shoulder) broadcast over leading axes.
    Returns ``[..., T]``.
    """
    t = np.asarray(time_s, dtype=np.float64)
    k = np.asarray(k_per_s, dtype=np.float64)[..., None]
    tau = np.asarray(tau_s, dtype=np.float64)[..., None]
    # expit(-x) = 1 / (1 + exp(x)) without overflow
    r = scipy.special.expit(-k * (t - tau)) / scipy.special.expit(k * tau)
    return np.where(t >= 0, r, 0.0)


def hat_weights_fermi(
    n_samples: int, dt_s: float, k_per_s: np.ndarray | float, tau_s: np.ndarray | float
) -> np.ndarray:
    """Hat-weighted Fermi residue in seconds, shape ``[..., 2, n_samples]``.

    Index 0: ``W[n] = integral R(u) phi(u - n dt) du`` with ``phi`` the linear-interpolation
    hat of half-width ``dt``; index 1: the same with only the half of the hat before its
    centre (``W_left``), used to cut the first sample's hat at ``t = 0`` (no input before).
    """
    k = np.asarray(k_per_s, dtype=np.float64)
    tau = np.asarray(tau_s, dtype=np.float64)
    # R at the Gauss nodes of each interval [m dt, (m + 1) dt], m = 0 .. n_samples - 1
    starts = np.arange(n_samples, dtype=np.float64) * dt_s
    nodes = (starts[:, None] + _GL_NODES[None, :] * dt_s).ravel()
    shape = np.broadcast(k, tau).shape
    r = fermi_impulse_response(nodes, k, tau).reshape(*shape, n_samples, _GL_NODES.size)
    rising = dt_s * np.einsum("...mg,g->...m", r, _GL_WEIGHTS * _GL_NODES)  # weight (u - m dt)/dt
    falling = dt_s * np.einsum("...mg,g->...m", r, _GL_WEIGHTS * (1.0 - _GL_NODES))
    w = np.zeros((*shape, 2, n_samples))
    w[..., 0, :] = falling
    w[..., 0, 1:] += rising[..., :-1]
    w[..., 1, :] = falling
    return w


def _btex_transfer(s: np.ndarray, fp_per_s, ps_per_s, vp, visf) -> np.ndarray:
    """Outflow/inflow transfer function H(s) of the two-region model (Danckwerts inflow)."""
    tau = vp / fp_per_s
    peclet = CAPILLARY_LENGTH_CM**2 / (PLASMA_DISPERSION_CM2_S * tau)
    g = s + (ps_per_s / vp) * s / (s + ps_per_s / visf)
    z = 4.0 * g * tau / peclet
    q = np.sqrt(1.0 + z)
    # Pe (1 - q) / 2 written without cancellation for large Pe
    exponent = -2.0 * g * tau / (1.0 + q)
    return 4.0 * q * np.exp(exponent) / ((1.0 + q) ** 2 - (1.0 - q) ** 2 * np.exp(-peclet * q))


def hat_weights_btex(
    n_samples: int,
    dt_s: float,
    fp_ml_min_g: np.ndarray | float,
    ps_ml_min_g: np.ndarray | float,
    vp: np.ndarray | float,
    visf: np.ndarray | float,
    *,
    chunk: int = 2048,
) -> np.ndarray:
    """Hat-weighted BTEX residue (s), shape ``[N, 2, n_samples]`` for broadcast params.

    Index 0 full hat, index 1 the half before the centre (see ``hat_weights_fermi``).
    ``W = W_step - W_out`` where the step part is exact (``dt/2`` at n = 0, ``dt`` after; the
    left half gives ``dt/2``) and the outflow part is sampled from its damped Laplace spectrum
    ``H(s)/s * hat(s)`` with the aliases of the sampling summed explicitly (Poisson summation).
    """
    fp, ps, vpa, visfa = (np.atleast_1d(np.asarray(a, dtype=np.float64)) for a in
                          np.broadcast_arrays(fp_ml_min_g, ps_ml_min_g, vp, visf))
    fp, ps, vpa, visfa = fp.ravel(), ps.ravel(), vpa.ravel(), visfa.ravel()
    if np.any(fp <= 0) or np.any(ps < 0) or np.any(vpa <= 0) or np.any(visfa <= 0):
        raise FlowModelError("BTEX needs Fp > 0, PS >= 0, Vp > 0 and Visf > 0")
    n_fft = int(2 ** np.ceil(np.log2(2 * n_samples)))
    period = n_fft * dt_s
    sigma = _DAMPING_PER_PERIOD / period
    omega = 2.0 * np.pi * np.fft.rfftfreq(n_fft, d=dt_s)
    aliases = 2.0 * np.pi * np.arange(-_ALIAS_TERMS, _ALIAS_TERMS + 1) / dt_s
    s = sigma + 1j * (omega[:, None] + aliases[None, :])  # [J, A]
    half = s * dt_s / 2.0
    hat = dt_s * (np.sinh(half) / half) ** 2
    # left half of the hat, support [-dt, 0]: (exp(s dt) - 1) / (s^2 dt) - 1 / s
    left_half = np.expm1(2.0 * half) / (s * s * dt_s) - 1.0 / s
    kernels = np.stack([hat, left_half]) / s / dt_s  # 1/dt from the Poisson summation
    damping_back = np.exp(sigma * dt_s * np.arange(n_samples))
    step = np.full((2, n_samples), dt_s / 2.0)
    step[0, 1:] = dt_s
    out = np.empty((fp.size, 2, n_samples))
    for start in range(0, fp.size, chunk):
        sl = slice(start, start + chunk)
        h = _btex_transfer(
            s[None], fp[sl, None, None] / 60.0, ps[sl, None, None] / 60.0,
            vpa[sl, None, None], visfa[sl, None, None],
        )
        spectrum = np.einsum("nja,kja->nkj", h, kernels)  # [n, 2, J]
        outflow = np.fft.irfft(spectrum, n=n_fft, axis=-1)[..., :n_samples] * damping_back
        out[sl] = step - outflow
    return out


def convolve_hat_weights(aif: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``Q[..., n] = sum_m aif[m] W[..., n - m] - aif[0] W_left[..., n]``, weights ``[..., 2, T]``.

    The correction removes the half of the first hat lying before ``t = 0``: the input is
    zero before the first sample. One matrix product.
    """
    return weights[..., 0, :] @ causal_toeplitz(aif) - aif[0] * weights[..., 1, :]


def causal_toeplitz(aif: np.ndarray) -> np.ndarray:
    """``[T, T]`` matrix with ``M[j, n] = aif[n - j]`` for ``n >= j``, else 0: ``w @ M`` is the causal
    convolution of the weights ``w[..., j]`` (lag ``j``) with ``aif``."""
    n = aif.size
    lag = np.arange(n)[None, :] - np.arange(n)[:, None]
    return np.where(lag >= 0, aif[np.clip(lag, 0, n - 1)], 0.0)


def shift_curves(curves: np.ndarray, delay_s: np.ndarray | float, dt_s: float) -> np.ndarray:
    """Delay curves ``[N, T]`` by ``delay_s`` (>= 0, scalar or [N]) with linear interpolation.

    Values before the start are zero (the curves start from a zero baseline).
    """
    curves = np.asarray(curves, dtype=np.float64)
    delay = np.broadcast_to(np.asarray(delay_s, dtype=np.float64), curves.shape[:-1])
    if np.any(delay < 0) or not np.all(np.isfinite(delay)):
        raise FlowModelError("delays must be finite and >= 0 s")
    if not np.any(delay):
        return curves.copy()
    n = curves.shape[-1]
    if np.all(delay == delay.flat[0]):  # one delay for all: two slices and a blend
        whole, frac = divmod(float(delay.flat[0]) / dt_s, 1.0)
        whole = int(whole)
        padded = np.concatenate([np.zeros((*curves.shape[:-1], whole + 1)), curves], axis=-1)
        current = padded[..., 1 : n + 1]  # sample n - whole
        previous = padded[..., :n]  # sample n - whole - 1
        return (1.0 - frac) * current + frac * previous
    position = np.arange(n)[None, :] - (delay.reshape(-1, 1) / dt_s)  # fractional source index
    flat = curves.reshape(-1, n)
    lower = np.floor(position).astype(np.int64)
    frac = position - lower
    padded = np.concatenate([np.zeros((flat.shape[0], 1)), flat], axis=1)  # index -1 -> 0
    lo = np.clip(lower, -1, n - 1) + 1
    hi = np.clip(lower + 1, -1, n - 1) + 1
    rows = np.arange(flat.shape[0])[:, None]
    out = (1.0 - frac) * padded[rows, lo] + frac * padded[rows, hi]
    return out.reshape(curves.shape)


def fermi_tissue_curves(
    aif_plasma_mmol_l: np.ndarray,
    dt_s: float,
    mbf_ml_min_g: np.ndarray,
    k_per_s: np.ndarray,
    tau_s: np.ndarray,
    delay_s: np.ndarray | float = 0.0,
) -> np.ndarray:
    """Tissue Gd (mmol/L) ``[N, T]`` of the Fermi model for plasma AIF ``[T]`` on grid ``dt_s``.

    ``Q = (MBF/60) * Cp(t - delay) (*) R_fermi(t; k, tau)``, ``R(0) = 1`` (Jerosch-Herold 1998).
    """
    aif = _check_aif(aif_plasma_mmol_l, dt_s)
    mbf, k, tau = (np.atleast_1d(np.asarray(a, dtype=np.float64)) for a in
                   np.broadcast_arrays(mbf_ml_min_g, k_per_s, tau_s))
    weights = hat_weights_fermi(aif.size, dt_s, k.ravel(), tau.ravel())
    curves = (mbf.ravel()[:, None] / 60.0) * convolve_hat_weights(aif, weights)
    return shift_curves(curves, np.broadcast_to(delay_s, mbf.ravel().shape), dt_s)


def btex_tissue_curves(
    aif_plasma_mmol_l: np.ndarray,
    dt_s: float,
    fp_ml_min_g: np.ndarray,
    ps_ml_min_g: np.ndarray,
    vp: np.ndarray,
    visf: np.ndarray,
    delay_s: np.ndarray | float = 0.0,
) -> np.ndarray:
    """Tissue Gd (mmol/L) ``[N, T]`` of the two-region BTEX model (see module docstring).

    ``Fp``, ``PS`` in ml/min/g; ``vp``, ``visf`` fractional volumes (ml/ml); delay in s.
    """
    aif = _check_aif(aif_plasma_mmol_l, dt_s)
    fp, ps, vpa, visfa = (np.atleast_1d(np.asarray(a, dtype=np.float64)).ravel() for a in
                          np.broadcast_arrays(fp_ml_min_g, ps_ml_min_g, vp, visf))
    weights = hat_weights_btex(aif.size, dt_s, fp, ps, vpa, visfa)
    curves = (fp[:, None] / 60.0) * convolve_hat_weights(aif, weights)
    return shift_curves(curves, np.broadcast_to(delay_s, fp.shape), dt_s)


def btex_tissue_curves_finite_volume(
    aif_plasma_mmol_l: np.ndarray,
    dt_s: float,
    fp_ml_min_g: float,
    ps_ml_min_g: float,
    vp: float,
    visf: float,
    *,
    n_cells: int = 200,
    interstitial_diffusion_cm2_s: float = INTERSTITIAL_DIFFUSION_CM2_S,
) -> np.ndarray:
    """Reference BTEX solution ``[T]`` by finite volumes along the capillary (slow, one curve).

    Independent of ``btex_tissue_curves``: ``n_cells`` cells, central advective fluxes (use
    enough cells that the cell Peclet number stays below 2), Danckwerts total-flux inflow,
    zero-gradient outflow, zero-flux interstitium with diffusion ``Disf``; time is stepped
    exactly for the piecewise-linear input (matrix exponential, first-order hold). The
    tissue curve is the content ``Vp mean(Cp) + Visf mean(Cisf)``.
    """
    aif = _check_aif(aif_plasma_mmol_l, dt_s)
    fp = fp_ml_min_g / 60.0
    ps = ps_ml_min_g / 60.0
    h = 1.0 / n_cells  # in units of L
    velocity = fp / vp  # capillary lengths per second
    d_p = PLASMA_DISPERSION_CM2_S / CAPILLARY_LENGTH_CM**2
    d_i = interstitial_diffusion_cm2_s / CAPILLARY_LENGTH_CM**2
    n = n_cells
    m = np.zeros((2 * n + 1, 2 * n + 1))  # state: Cp cells, Cisf cells, then the input
    for i in range(n):
        # plasma: advective + dispersive flux through the faces
        if i > 0:
            m[i, i - 1] += velocity / (2 * h) + d_p / h**2
            m[i, i] += velocity / (2 * h) - d_p / h**2
        else:
            m[i, 2 * n] += velocity / h  # Danckwerts: total inflow flux = v Cin
        if i < n - 1:
            m[i, i] += -velocity / (2 * h) - d_p / h**2
            m[i, i + 1] += -velocity / (2 * h) + d_p / h**2
        else:
            m[i, i] += -velocity / h  # outflow at the cell value, zero gradient
        m[i, i] -= ps / vp
        m[i, n + i] += ps / vp
        j = n + i
        m[j, j] -= ps / visf
        m[j, i] += ps / visf
        for nb in (i - 1, i + 1):
            if 0 <= nb < n:
                m[j, j] -= d_i / h**2
                m[j, n + nb] += d_i / h**2
    size = 2 * n
    aug = np.zeros((size + 2, size + 2))
    aug[:size, :size] = m[:size, :size]
    aug[:size, size] = m[:size, size]
    aug[size, size + 1] = 1.0
    prop = scipy.linalg.expm(aug * dt_s)
    transition = prop[:size, :size]
    gain_value = prop[:size, size]
    gain_slope = prop[:size, size + 1]
    state = np.zeros(size)
    out = np.zeros(aif.size)
    for k in range(1, aif.size):
        slope = (aif[k] - aif[k - 1]) / dt_s
        state = transition @ state + gain_value * aif[k - 1] + gain_slope * slope
        out[k] = vp * state[:n].mean() + visf * state[n:].mean()
    return out
