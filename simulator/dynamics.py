"""Contrast dynamics and acquisition timing of a simulated first-pass study.

- Timing: one frame per heartbeat; the RR interval varies from beat to beat and a missed
  trigger makes a frame last two RR intervals. Time 0 is the first R wave.
- Blood curves (mmol/L, whole blood): gamma-variate first pass with recirculation and a slow
  plateau (Kellman et al. JCMR 2017 give LV peaks of 3.5 +/- 1.2 stress, 4.4 +/- 1.2 rest);
  the RV bolus arrives one pulmonary transit time earlier, higher and narrower. Every blood
  curve is causal: zero before its own foot (no residual Gd of an earlier dose is modelled,
  rest scans included), so every tissue curve driven by it is zero before it too.
- Myocardium: the shared flow models (:mod:`perfline.toolbox.flow_models`), Fermi or BTEX,
  driven by the plasma AIF ``Cp = Cb / (1 - Hct)`` of the LV blood.
- Other tissues: extended Tofts model (plasma volume + extravascular leakage) with slow
  transfer; fat has no dynamics.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import scipy.special

from perfline.toolbox import flow_models

FlowModel = Literal["btex", "fermi"]
FINE_DT_S = 0.25  # grid of the model curves before sampling at the frame times

# (Ktrans 1/min, ve, vp, which blood curve feeds the plasma volume)
_TOFTS: dict[str, tuple[float, float, float, str]] = {
    "liver": (0.8, 0.25, 0.12, "aorta"),
    "spleen": (1.5, 0.20, 0.20, "aorta"),
    "muscle": (0.08, 0.10, 0.03, "aorta"),
    "marrow": (0.12, 0.10, 0.05, "aorta"),
    "lung": (0.05, 0.05, 0.15, "pulmonary"),
}


@dataclass(frozen=True, eq=False)
class Timing:
    """Heartbeats of the scan: frame f starts at ``trigger_s[f]`` (s from the first R wave).

    Compared and hashed by identity (it holds arrays)."""

    trigger_s: np.ndarray       # float64 [frames]
    rr_s: np.ndarray            # float64 [frames], the interval ending at the next trigger
    missed_trigger: np.ndarray  # bool [frames]


@dataclass(frozen=True)
class BolusParameters:
    """Blood curves of one study (s, mmol/L)."""

    lv_foot_s: float
    lv_peak_mmol_l: float
    injection_duration_s: float  # box-shaped input (contrast + flush) before dispersion
    time_to_peak_s: float        # of the dispersing gamma-variate transport
    gamma_shape: float
    rv_lead_s: float             # RV foot this much earlier than the LV foot
    rv_peak_ratio: float
    rv_width_ratio: float
    recirculation_delay_s: float
    recirculation_ratio: float
    plateau_ratio: float
    aorta_delay_s: float
    hematocrit: float


@dataclass(frozen=True)
class TissueParameters:
    """Flow-model settings of the myocardium of one study."""

    model: FlowModel
    delay_s: float
    fermi_k_per_s: float
    fermi_tau_s: float
    ps_ml_min_g: float
    vp: float
    visf: float


def sample_timing(rng: np.random.Generator, n_frames: int, kind: str) -> Timing:
    """Heartbeat times: mean RR 0.55-0.8 s under stress, 0.75-1.15 s at rest, 3 % beat-to-beat
    jitter plus a slow drift, and in half of the studies missed triggers (1-5 % of beats)."""
    mean_rr = rng.uniform(0.55, 0.8) if kind == "stress" else rng.uniform(0.75, 1.15)
    drift = 1.0 + rng.uniform(-0.08, 0.08) * np.sin(np.linspace(0, rng.uniform(1, 3) * math.pi, n_frames))
    rr = mean_rr * drift * (1.0 + 0.03 * rng.standard_normal(n_frames))
    miss_probability = 0.0 if rng.random() < 0.5 else rng.uniform(0.01, 0.05)
    missed = rng.random(n_frames) < miss_probability
    missed[0] = False
    frame_duration = np.where(missed, 2.0 * rr, rr)
    trigger = np.concatenate([[0.0], np.cumsum(frame_duration)[:-1]])
    return Timing(trigger_s=trigger, rr_s=frame_duration, missed_trigger=missed)


def sample_bolus(rng: np.random.Generator, kind: str, first_sr_time_s: float) -> BolusParameters:
    stress = kind == "stress"
    peak = float(np.clip(rng.normal(3.6 if stress else 4.4, 0.8), 2.8, 6.2))
    return BolusParameters(
        lv_foot_s=first_sr_time_s + rng.uniform(6.0, 12.0),
        lv_peak_mmol_l=peak,
        injection_duration_s=rng.uniform(2.0, 4.0) if stress else rng.uniform(2.5, 4.5),
        time_to_peak_s=rng.uniform(0.8, 2.0) if stress else rng.uniform(1.0, 2.5),
        gamma_shape=rng.uniform(2.0, 4.0),
        rv_lead_s=rng.uniform(2.0, 5.0) if stress else rng.uniform(3.0, 7.0),
        rv_peak_ratio=rng.uniform(1.2, 1.7), rv_width_ratio=rng.uniform(0.6, 0.8),
        recirculation_delay_s=rng.uniform(7.0, 12.0), recirculation_ratio=rng.uniform(0.12, 0.3),
        plateau_ratio=rng.uniform(0.12, 0.22), aorta_delay_s=rng.uniform(0.2, 0.6),
        hematocrit=float(np.clip(rng.normal(0.42, 0.03), 0.33, 0.50)),
    )


def sample_tissue(rng: np.random.Generator, model: FlowModel) -> TissueParameters:
    return TissueParameters(model=model, delay_s=rng.uniform(0.3, 1.2),
                            fermi_k_per_s=rng.uniform(0.3, 0.6), fermi_tau_s=rng.uniform(0.5, 1.5),
                            ps_ml_min_g=rng.uniform(1.0, 1.6), vp=rng.uniform(0.07, 0.10),
                            visf=rng.uniform(0.15, 0.30))


def gamma_variate(time_s: np.ndarray, foot_s: float, time_to_peak_s: float, shape: float) -> np.ndarray:
    """Gamma variate with peak 1 at ``foot + time_to_peak``, zero before the foot."""
    tau = np.clip((np.asarray(time_s) - foot_s) / time_to_peak_s, 0.0, None)
    return np.where(tau > 0, tau ** shape * np.exp(shape * (1.0 - tau)), 0.0)


@functools.lru_cache(maxsize=256)
def _box_response_max(duration_s: float, time_to_peak_s: float, shape: float) -> float:
    grid = np.linspace(0.0, duration_s + 8.0 * time_to_peak_s, 4000)
    return float(_box_response(grid, duration_s, time_to_peak_s, shape).max())


def _box_response(t_from_foot_s: np.ndarray, duration_s: float, time_to_peak_s: float, shape: float) -> np.ndarray:
    tau = np.clip(np.asarray(t_from_foot_s, dtype=np.float64) / time_to_peak_s, 0.0, None)
    lag = np.clip(tau - duration_s / time_to_peak_s, 0.0, None)
    return scipy.special.gammainc(shape + 1, shape * tau) - scipy.special.gammainc(shape + 1, shape * lag)


def dispersed_box(time_s: np.ndarray, foot_s: float, duration_s: float, time_to_peak_s: float,
                  shape: float) -> np.ndarray:
    """A box input of ``duration_s`` convolved with a gamma variate (time to peak, shape), peak 1.

    Closed form with the regularised lower incomplete gamma function P:
    ``P(a + 1, a tau) - P(a + 1, a (tau - D / ttp))``, ``tau = (t - foot) / ttp``.
    """
    response = _box_response(np.asarray(time_s, dtype=np.float64) - foot_s, duration_s, time_to_peak_s, shape)
    return response / _box_response_max(duration_s, time_to_peak_s, shape)


PLATEAU_SHAPE = 2.5         # gamma shape of the plateau's mixing-time distribution
PLATEAU_SCALE_PER_RISE = 0.7  # its scale, in units of the bolus rise (injection + time to peak)


def plateau_fraction(time_from_foot_s: np.ndarray, rise_s: float) -> np.ndarray:
    """Fraction (0-1) of the dose mixed into the whole blood volume, ``time_from_foot_s`` after the foot.

    The cumulative distribution of a gamma-distributed mixing time (shape ``PLATEAU_SHAPE``, scale
    ``PLATEAU_SCALE_PER_RISE * rise_s``): the regularised lower incomplete gamma function
    ``P(2.5, t / (0.7 rise))``. Causal: exactly 0 at and before the foot (no Gd can be in the blood
    before it arrives), rising as ``t**2.5`` from it (value and slope continuous), 0.66 at
    2 rise, 0.87 at 3 rise, 0.985 at 5 rise. Until 2026-11-26 the plateau was the logistic
    ``1 / (1 + exp(-(t - 1.5 rise) / (0.8 rise)))``, 0.13 at the foot and non-zero long before it;
    this form is within 0.02 of it from 1.5 rise on (least-squares shape 2.52 / scale 0.70 rise),
    so the late levels are unchanged.
    """
    x = np.clip(np.asarray(time_from_foot_s, dtype=np.float64), 0.0, None) / (PLATEAU_SCALE_PER_RISE * rise_s)
    return scipy.special.gammainc(PLATEAU_SHAPE, x)


def _blood_curve(time_s: np.ndarray, foot_s: float, peak: float, ttp: float, bolus: BolusParameters) -> np.ndarray:
    """Whole-blood Gd (mmol/L): first pass + recirculation + plateau x slow washout, all zero before ``foot_s``."""
    first = dispersed_box(time_s, foot_s, bolus.injection_duration_s, ttp, bolus.gamma_shape)
    rise = bolus.injection_duration_s + ttp
    recirculation = dispersed_box(time_s, foot_s + bolus.recirculation_delay_s, bolus.injection_duration_s,
                                  2.5 * ttp, bolus.gamma_shape)
    plateau = plateau_fraction(time_s - foot_s, rise)
    washout = np.exp(-np.clip(time_s - foot_s, 0, None) / 400.0)
    return peak * (first + bolus.recirculation_ratio * recirculation + bolus.plateau_ratio * plateau * washout)


def blood_curves(time_s: np.ndarray, bolus: BolusParameters) -> dict[str, np.ndarray]:
    """Whole-blood Gd (mmol/L) of the LV, RV, aorta and pulmonary vessels at ``time_s``."""
    t = np.asarray(time_s, dtype=np.float64)
    ttp = bolus.time_to_peak_s
    lv = _blood_curve(t, bolus.lv_foot_s, bolus.lv_peak_mmol_l, ttp, bolus)
    rv = _blood_curve(t, bolus.lv_foot_s - bolus.rv_lead_s, bolus.lv_peak_mmol_l * bolus.rv_peak_ratio,
                      ttp * bolus.rv_width_ratio, bolus)
    aorta = _blood_curve(t, bolus.lv_foot_s + bolus.aorta_delay_s, bolus.lv_peak_mmol_l, ttp, bolus)
    pulmonary = _blood_curve(t, bolus.lv_foot_s - 0.5 * bolus.rv_lead_s,
                             bolus.lv_peak_mmol_l * 0.5 * (1 + bolus.rv_peak_ratio), ttp * 0.5 * (1 + bolus.rv_width_ratio),
                             bolus)
    return {"lv": lv, "rv": rv, "aorta": aorta, "pulmonary": pulmonary}


def fine_grid(end_time_s: float) -> np.ndarray:
    """Uniform model grid from 0 to past ``end_time_s`` with step FINE_DT_S."""
    return np.arange(int(math.ceil(end_time_s / FINE_DT_S)) + 2) * FINE_DT_S


def tofts_curve(plasma_mmol_l: np.ndarray, blood_mmol_l: np.ndarray, dt_s: float, ktrans_per_min: float,
                ve: float, vp: float) -> np.ndarray:
    """Extended Tofts tissue Gd: ``vp Cb + Ktrans * Cp (*) exp(-kep t)`` on a uniform grid."""
    kep = ktrans_per_min / ve / 60.0
    kernel = (ktrans_per_min / 60.0) * np.exp(-kep * np.arange(plasma_mmol_l.size) * dt_s) * dt_s
    leak = np.convolve(plasma_mmol_l, kernel)[: plasma_mmol_l.size]
    return vp * blood_mmol_l + leak


class MyocardialCurves:
    """Myocardial Gd curves for arbitrary MBF values on the fine grid.

    Fermi: the curve is linear in MBF (k, tau and delay fixed per study), so every pixel is
    exact. BTEX: curves are computed on geometric MBF nodes ``0.05 * 1.06**k`` ml/min/g
    (computed once per node and cached) and linearly interpolated between them; the relative
    interpolation error is below 0.2 % of the curve peak.
    """

    NODE_START = 0.05
    NODE_RATIO = 1.06

    def __init__(self, tissue: TissueParameters, aif_blood_mmol_l: np.ndarray, hematocrit: float,
                 dt_s: float = FINE_DT_S) -> None:
        self.tissue = tissue
        self.dt_s = dt_s
        self.plasma = np.asarray(aif_blood_mmol_l, dtype=np.float64) / (1.0 - hematocrit)
        self._unit: np.ndarray | None = None
        self._nodes: dict[int, np.ndarray] = {}
        if tissue.model == "fermi":
            self._unit = flow_models.fermi_tissue_curves(self.plasma, dt_s, np.array([1.0]),
                                                         np.array([tissue.fermi_k_per_s]),
                                                         np.array([tissue.fermi_tau_s]), tissue.delay_s)[0]

    def _node_value(self, k: np.ndarray | int) -> np.ndarray:
        return self.NODE_START * self.NODE_RATIO ** np.asarray(k, dtype=np.float64)

    def _node_curves(self, ks: np.ndarray) -> np.ndarray:
        missing = [int(k) for k in ks if int(k) not in self._nodes]
        if missing:
            t = self.tissue
            n = len(missing)
            fresh = flow_models.btex_tissue_curves(
                self.plasma, self.dt_s, self._node_value(np.array(missing)), np.full(n, t.ps_ml_min_g),
                np.full(n, t.vp), np.full(n, t.visf), t.delay_s)
            self._nodes.update(zip(missing, fresh))
        return np.stack([self._nodes[int(k)] for k in ks])

    def curves(self, mbf_ml_min_g: np.ndarray) -> np.ndarray:
        """Gd (mmol/L) [N, T_fine] for MBF [N] (ml/min/g, >= 0)."""
        mbf = np.asarray(mbf_ml_min_g, dtype=np.float64).ravel()
        if self._unit is not None:
            return mbf[:, None] * self._unit[None, :]
        if mbf.size == 0:
            return np.zeros((0, self.plasma.size))
        # below the first node the curve is taken as linear in MBF (zero at zero flow)
        position = np.log(np.maximum(mbf, self.NODE_START) / self.NODE_START) / math.log(self.NODE_RATIO)
        lower = np.floor(position).astype(np.int64)
        used = np.unique(np.concatenate([lower, lower + 1]))
        table = self._node_curves(used)
        row = np.searchsorted(used, lower)
        low_value, high_value = self._node_value(lower), self._node_value(lower + 1)
        weight = ((np.maximum(mbf, self.NODE_START) - low_value) / (high_value - low_value))[:, None]
        out = table[row] * (1.0 - weight) + table[row + 1] * weight
        below = mbf < self.NODE_START
        if below.any():
            out[below] = table[row[below]] * (mbf[below] / self.NODE_START)[:, None]
        return out


def sample_curves(fine_time_s: np.ndarray, curves: np.ndarray, time_s: np.ndarray) -> np.ndarray:
    """Linear interpolation of curves [..., T_fine] on the fine grid at ``time_s`` -> [..., T]."""
    position = np.clip(np.asarray(time_s) / (fine_time_s[1] - fine_time_s[0]), 0.0, fine_time_s.size - 1.000001)
    index = position.astype(np.int64)
    weight = position - index
    return curves[..., index] * (1.0 - weight) + curves[..., index + 1] * weight


def tissue_curves_fine(fine_time_s: np.ndarray, bolus: BolusParameters,
                       myocardium: MyocardialCurves, normal_mbf_ml_min_g: float) -> dict[str, np.ndarray]:
    """Gd (mmol/L) on the fine grid of every tissue class of the anatomy except the LV wall."""
    blood = blood_curves(fine_time_s, bolus)
    dt = fine_time_s[1] - fine_time_s[0]
    plasma_aorta = blood["aorta"] / (1.0 - bolus.hematocrit)
    plasma_pulmonary = blood["pulmonary"] / (1.0 - bolus.hematocrit)
    normal_myo = myocardium.curves(np.array([normal_mbf_ml_min_g]))[0]
    out = {"lv_blood": blood["lv"], "rv_blood": blood["rv"], "aorta": blood["aorta"],
           "pulmonary_vessels": blood["pulmonary"], "rv_wall": 0.8 * normal_myo, "papillary": normal_myo,
           "epicardial_fat": np.zeros_like(fine_time_s), "subcutaneous_fat": np.zeros_like(fine_time_s)}
    for name, (ktrans, ve, vp, feed) in _TOFTS.items():
        plasma = plasma_pulmonary if feed == "pulmonary" else plasma_aorta
        out[name] = tofts_curve(plasma, blood["pulmonary" if feed == "pulmonary" else "aorta"], dt, ktrans, ve, vp)
    return out
