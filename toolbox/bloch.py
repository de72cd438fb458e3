"""Saturation-recovery signal physics and the SR/PD -> Gd look-up table.

Reference: REFERENCES.md sections 1-2 (Kellman et al., JCMR 2017;19:43; Xue et al., MRM
2020;83:712). The signal of the k-space centre line is obtained by a Bloch simulation of the
readout: a perfect saturation pulse at t = 0, free T1 recovery for the saturation delay TD,
then the readout pulse train (spoiled FLASH or balanced SSFP, on resonance) up to the centre
line. The proton-density (PD) image uses the same readout with a low flip angle and no
saturation (fully relaxed magnetisation). Gd shortens T1 and T2 linearly:
``1/T1 = 1/T1_0 + r1 * Gd``, ``1/T2 = 1/T2_0 + r2 * Gd``.

Times in ms in :class:`SequenceParameters` (scanner units), seconds in relaxation values,
Gd in mmol/L, relaxivities in L/mmol/s.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

Tissue = Literal["blood", "myocardium", "liver", "fat", "muscle", "lung", "marrow", "spleen"]
TISSUES: tuple[str, ...] = ("blood", "myocardium", "liver", "fat", "muscle", "lung", "marrow", "spleen")
_BLOCK = 65536  # values per block of GdLookupTable.to_gd (index arrays stay in cache)

# (T1 s, T2 s) at 1.5 T and 3 T. Blood and myocardium: REFERENCES.md section 2; the other
# tissues are literature averages (Stanisz et al., MRM 2005; de Bazelaire et al., Radiology
# 2004) and only shape the background of the phantom.
_RELAXATION_S: dict[float, dict[str, tuple[float, float]]] = {
    1.5: {"blood": (1.700, 0.220), "myocardium": (1.100, 0.045), "liver": (0.580, 0.046),
          "fat": (0.290, 0.165), "muscle": (1.010, 0.044), "lung": (1.200, 0.040),
          "marrow": (0.550, 0.050), "spleen": (1.060, 0.079)},
    3.0: {"blood": (2.000, 0.250), "myocardium": (1.300, 0.045), "liver": (0.810, 0.034),
          "fat": (0.370, 0.133), "muscle": (1.420, 0.032), "lung": (1.400, 0.035),
          "marrow": (0.590, 0.049), "spleen": (1.330, 0.061)},
}
# r1 from REFERENCES.md section 2; r2 of gadobutrol-like agents in plasma (Rohrer et al.,
# Invest Radiol 2005), L/mmol/s.
_R1: dict[float, float] = {1.5: 5.565, 3.0: 4.92}
_R2: dict[float, float] = {1.5: 6.3, 3.0: 5.8}


class LookupTableError(ValueError):
    """The SR/PD ratio is not strictly increasing in Gd over the requested range."""


class Relaxation(NamedTuple):
    """Native relaxation of one tissue and the Gd relaxivities at one field strength."""

    t1_s: float
    t2_s: float
    r1_l_mmol_s: float
    r2_l_mmol_s: float


class SequenceParameters(BaseModel):
    """Saturation-recovery readout of one series (times in ms, angles in degrees).

    ``n_phase_encodes`` is the full matrix E1; with interleaved acceleration R only
    ``floor(E1 / R)`` lines are played, the centre one after ``ceil(floor(E1 / R) / 2)`` TRs.
    The PD images use ``pd_readout`` (5 degree FLASH by default, as QPerf: the PD signal is
    then nearly independent of T2) with the same TR, lines and timing, and no saturation.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    field_strength_t: float = Field(gt=0.0)
    flip_angle_deg: float = Field(default=50.0, gt=0.0, lt=180.0)
    tr_ms: float = Field(default=2.5, gt=0.0)
    te_ms: float = Field(default=1.04, ge=0.0)
    saturation_delay_ms: float = Field(default=40.0, ge=0.0)
    n_phase_encodes: int = Field(default=144, ge=1)
    acceleration: int = Field(default=3, ge=1)
    readout: Literal["ssfp", "flash"] = "ssfp"
    pd_flip_angle_deg: float = Field(default=5.0, gt=0.0, lt=180.0)
    pd_readout: Literal["ssfp", "flash"] = "flash"

    @classmethod
    def myocardial(cls, field_strength_t: float, acceleration: int = 3) -> SequenceParameters:
        """The paper's myocardial SSFP readout (REFERENCES.md section 1), 144 lines."""
        return cls(field_strength_t=field_strength_t, acceleration=acceleration)

    @classmethod
    def aif(cls, field_strength_t: float, acceleration: int = 2) -> SequenceParameters:
        """The low-resolution dual-echo FLASH AIF readout (first echo), 48 lines."""
        return cls(field_strength_t=field_strength_t, flip_angle_deg=8.0, tr_ms=2.4, te_ms=0.76,
                   saturation_delay_ms=4.7, n_phase_encodes=48, acceleration=acceleration,
                   readout="flash", pd_flip_angle_deg=5.0)


def tissue_relaxation(field_strength_t: float, tissue: str) -> Relaxation:
    """T1, T2 (s) of ``tissue`` and the Gd relaxivities r1, r2 (L/mmol/s) at 1.5 or 3 T."""
    field = _field_key(field_strength_t)
    if tissue not in _RELAXATION_S[field]:
        raise ValueError(f"tissue must be one of {TISSUES}, got {tissue!r}")
    t1, t2 = _RELAXATION_S[field][tissue]
    return Relaxation(t1, t2, _R1[field], _R2[field])


def centre_line_pulse_index(seq: SequenceParameters) -> int:
    """Number of readout pulses played before the k-space centre line."""
    return math.ceil((seq.n_phase_encodes // seq.acceleration) / 2)


def saturation_time_ms(seq: SequenceParameters) -> float:
    """TS = TD + TR * ceil(floor(E1 / R) / 2), ms (REFERENCES.md section 1)."""
    return seq.saturation_delay_ms + seq.tr_ms * centre_line_pulse_index(seq)


def _field_key(field_strength_t: float) -> float:
    for field in _RELAXATION_S:
        if abs(field_strength_t - field) < 1e-6:
            return field
    raise ValueError(f"field_strength_t must be 1.5 or 3.0, got {field_strength_t}")


def _readout_signal(mz0: np.ndarray, r1_per_ms: np.ndarray, r2_per_ms: np.ndarray, flip_deg: float,
                    seq: SequenceParameters, readout: str) -> np.ndarray:
    """|Mxy| at TE of the centre-line pulse for longitudinal magnetisation ``mz0`` at readout start.

    Spoiled FLASH: ideal spoiling (transverse magnetisation zero before every pulse); the
    signal is taken at TE = 0 because the T2* decay of the AIF echoes is modelled and corrected
    separately (dual-echo T2* correction, REFERENCES.md section 2).
    Balanced SSFP: on-resonance isochromat, pulses alternating in sign about x, preceded by
    an alpha/2 catalysation pulse TR/2 before the first pulse (its delay is not counted in TD).
    All arrays [G] (one entry per Gd value).
    """
    n_before = centre_line_pulse_index(seq)
    alpha = math.radians(flip_deg)
    e1 = np.exp(-seq.tr_ms * r1_per_ms)
    if readout == "flash":
        mz = mz0.astype(np.float64)
        for _ in range(n_before):
            mz = 1.0 - (1.0 - mz * math.cos(alpha)) * e1
        return mz * math.sin(alpha)
    e2 = np.exp(-seq.tr_ms * r2_per_ms)
    half_e1 = np.exp(-0.5 * seq.tr_ms * r1_per_ms)
    half_e2 = np.exp(-0.5 * seq.tr_ms * r2_per_ms)
    # catalysation: alpha/2 about -x, then TR/2 of relaxation
    my = mz0 * math.sin(alpha / 2)
    mz = mz0 * math.cos(alpha / 2)
    my, mz = my * half_e2, 1.0 - (1.0 - mz) * half_e1
    sign = 1.0
    for pulse in range(n_before + 1):
        # rotation about x by sign * alpha (alternating phase)
        angle = sign * alpha
        my, mz = my * math.cos(angle) + mz * math.sin(angle), -my * math.sin(angle) + mz * math.cos(angle)
        if pulse == n_before:
            break
        my, mz = my * e2, 1.0 - (1.0 - mz) * e1
        sign = -sign
    return np.abs(my) * np.exp(-seq.te_ms * r2_per_ms)


def sr_and_pd_signal(gd_mmol_l: np.ndarray | float, seq: SequenceParameters,
                     tissue: str = "myocardium") -> tuple[np.ndarray, np.ndarray]:
    """Centre-line signal of the SR image and of the PD image, both per unit M0.

    Returns two float64 arrays shaped like ``gd_mmol_l``.
    """
    gd = np.atleast_1d(np.asarray(gd_mmol_l, dtype=np.float64))
    if np.any(gd < 0) or not np.all(np.isfinite(gd)):
        raise ValueError("gd_mmol_l must be finite and >= 0 mmol/L")
    relax = tissue_relaxation(seq.field_strength_t, tissue)
    r1_per_ms = (1.0 / relax.t1_s + relax.r1_l_mmol_s * gd.ravel()) / 1000.0
    r2_per_ms = (1.0 / relax.t2_s + relax.r2_l_mmol_s * gd.ravel()) / 1000.0
    mz_at_readout = 1.0 - np.exp(-seq.saturation_delay_ms * r1_per_ms)
    sr = _readout_signal(mz_at_readout, r1_per_ms, r2_per_ms, seq.flip_angle_deg, seq, seq.readout)
    pd = _readout_signal(np.ones_like(gd.ravel()), r1_per_ms, r2_per_ms, seq.pd_flip_angle_deg, seq,
                         seq.pd_readout)
    shape = np.shape(gd_mmol_l)
    return sr.reshape(shape), pd.reshape(shape)


def sr_over_pd(gd_mmol_l: np.ndarray | float, seq: SequenceParameters,
               tissue: str = "myocardium") -> np.ndarray:
    """SR / PD signal ratio of the k-space centre line for Gd concentrations (mmol/L).

    The PD signal is evaluated at the same Gd (PD frames are acquired before the bolus, so
    callers building a LUT use its Gd = 0 value; see :class:`GdLookupTable`).
    """
    sr, pd = sr_and_pd_signal(gd_mmol_l, seq, tissue)
    return sr / pd


class GdLookupTable:
    """LUT(Gd) = SR(Gd) / PD(Gd = 0) for one sequence and tissue, with its inverse.

    The PD reference is the pre-contrast PD image, as in the chain (PD frames come first).
    Grid: ``n_points`` Gd values uniformly from 0 to ``gd_max_mmol_l`` (10 mmol/L for the
    myocardium, 40 for the AIF; REFERENCES.md section 2). Construction raises
    :class:`LookupTableError` if the ratio is not strictly increasing over the grid.
    """

    def __init__(self, seq: SequenceParameters, tissue: str = "myocardium", *,
                 gd_max_mmol_l: float = 10.0, n_points: int = 2001) -> None:
        if gd_max_mmol_l <= 0 or n_points < 2:
            raise ValueError(f"need gd_max_mmol_l > 0 and n_points >= 2, got {gd_max_mmol_l}, {n_points}")
        self.seq = seq
        self.tissue = tissue
        self.gd_grid_mmol_l = np.linspace(0.0, gd_max_mmol_l, n_points)
        sr, _ = sr_and_pd_signal(self.gd_grid_mmol_l, seq, tissue)
        _, pd0 = sr_and_pd_signal(0.0, seq, tissue)
        self.ratio_grid = sr / float(pd0)
        steps = np.diff(self.ratio_grid)
        if not np.all(steps > 0):
            bad = int(np.argmax(steps <= 0))
            raise LookupTableError(
                f"SR/PD must increase strictly with Gd for a usable LUT; it stops increasing at "
                f"{self.gd_grid_mmol_l[bad]:.3f} mmol/L ({tissue}, {seq.readout}, TS "
                f"{saturation_time_ms(seq):.1f} ms); lower gd_max_mmol_l")
        # inverse tabulated on a uniform ratio grid so that to_gd is index arithmetic
        self._inverse_ratio = np.linspace(self.ratio_grid[0], self.ratio_grid[-1], 8 * n_points)
        self._inverse_gd = np.interp(self._inverse_ratio, self.ratio_grid, self.gd_grid_mmol_l)
        self._inverse_step = self._inverse_ratio[1] - self._inverse_ratio[0]
        self._inverse_slope = np.append(np.diff(self._inverse_gd), 0.0)
        # gd(p) = gd[i] + slope[i] (p - i) = (gd[i] - slope[i] i) + slope[i] p for the table
        # position p in [i, i + 1): (intercept, slope) pairs side by side, so one gather fetches
        # both (float32 pairs read as one float64, float64 pairs as one complex128)
        intercept = self._inverse_gd - self._inverse_slope * np.arange(self._inverse_gd.size)
        pairs = np.stack([intercept, self._inverse_slope], axis=1)
        self._pairs = {np.float32: pairs.astype(np.float32).view(np.float64).ravel(),
                       np.float64: pairs.view(np.complex128).ravel()}

    @property
    def gd_max_mmol_l(self) -> float:
        return float(self.gd_grid_mmol_l[-1])

    def to_ratio(self, gd_mmol_l: np.ndarray | float) -> np.ndarray:
        """SR/PD ratio for Gd (mmol/L), by interpolation in the table (clipped to its range)."""
        return np.interp(gd_mmol_l, self.gd_grid_mmol_l, self.ratio_grid)

    def to_gd(self, ratio: np.ndarray | float, *, scale: np.ndarray | None = None,
              out: np.ndarray | None = None) -> np.ndarray:
        """Gd (mmol/L) for SR/PD ratios; ratios outside the table clip to 0 / ``gd_max_mmol_l``.

        Works on arrays of any shape; float32 in gives float32 out (computed in float32),
        NaN stays NaN. With ``scale`` (an array shaped like the trailing axes of ``ratio``, e.g.
        one [rows, cols] image for a [time, rows, cols] series), returns the Gd of
        ``ratio * scale`` without forming that product (e.g. SR images times 1 / PD). ``out``:
        optional C-contiguous array shaped like ``ratio`` of the result dtype to write into.
        Linear interpolation in the inverse table, computed in blocks of about 64 k values so
        that the index arrays stay in cache.
        """
        ratio = np.asarray(ratio)
        dtype = np.float32 if ratio.dtype == np.float32 else np.float64
        factor = dtype(1.0 / self._inverse_step)
        offset = dtype(self._inverse_ratio[0] / self._inverse_step)
        if scale is None:
            rows = ratio.reshape(1, -1)
            row_factor: np.ndarray | np.floating = factor
        else:
            scale = np.asarray(scale)
            if scale.ndim > ratio.ndim or ratio.shape[ratio.ndim - scale.ndim:] != scale.shape:
                raise ValueError(f"scale must have the shape of the trailing axes of ratio {ratio.shape}, "
                                 f"got {scale.shape}")
            rows = ratio.reshape(-1, max(scale.size, 1))
            row_factor = scale.astype(dtype).ravel() * factor
        if out is None:
            gd = np.empty(rows.shape, dtype=dtype)
        elif out.shape != ratio.shape or out.dtype != dtype or not out.flags.c_contiguous:
            raise ValueError(f"out must be a C-contiguous {np.dtype(dtype)} array of shape {ratio.shape}, "
                             f"got {out.dtype} {out.shape}")
        else:
            gd = out.reshape(rows.shape)
        step_cols = _BLOCK
        step_rows = max(1, _BLOCK // max(min(rows.shape[1], _BLOCK), 1))
        for r in range(0, rows.shape[0], step_rows):
            for c in range(0, rows.shape[1], step_cols):
                f = row_factor if np.ndim(row_factor) == 0 else row_factor[c:c + step_cols]
                self._invert_block(rows[r:r + step_rows, c:c + step_cols], f, offset,
                                   gd[r:r + step_rows, c:c + step_cols], dtype)
        return gd.reshape(ratio.shape)

    def _invert_block(self, ratio: np.ndarray, factor: np.ndarray | np.floating, offset: np.floating,
                      out: np.ndarray, dtype: type) -> None:
        position = np.multiply(ratio, factor, dtype=dtype)
        position -= offset
        nan_mask = np.isnan(position) if np.isnan(np.min(position)) else None
        if nan_mask is not None:
            position[nan_mask] = 0.0
        np.clip(position, 0.0, len(self._inverse_gd) - 1, out=position)
        index = position.astype(np.intp)  # truncation is the floor of these non-negative values
        pairs = self._pairs[dtype].take(index).view(dtype).reshape(*position.shape, 2)
        np.multiply(pairs[..., 1], position, out=out)
        out += pairs[..., 0]
        if nan_mask is not None:
            out[nan_mask] = np.nan
