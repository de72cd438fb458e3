"""SR/PD -> gadolinium concentration through Bloch-simulated look-up tables.

The sequence of each series is read from the MRD header (field strength, flip angles, TR, TE,
saturation delay, matrix E1, acceleration, readout types; docs/simulator.md "Header user
parameters") and the tables come from :mod:`perfline.toolbox.bloch` (``GdLookupTable``: LUT(Gd)
= SR(Gd) / PD(Gd = 0), inverted per pixel by interpolation; REFERENCES.md section 2). One table
per tissue: the myocardium (0-10 mmol/L) for the myocardial series, LV blood (0-40 mmol/L) for
the AIF series.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any

import numpy as np

from perfline.toolbox.bloch import GdLookupTable, SequenceParameters, saturation_time_ms

logger = logging.getLogger(__name__)

MYOCARDIUM_GD_MAX_MMOL_L = 10.0
AIF_GD_MAX_MMOL_L = 40.0
MYOCARDIAL_ENCODING = 0
AIF_ENCODING = 1


class HeaderError(ValueError):
    """The MRD header lacks (or has inconsistent) sequence parameters needed for Gd conversion."""


def user_parameters(header: Any) -> dict[str, float | int | str]:
    """All ``userParameters`` (long, double, string) of an ``ismrmrd.xsd.ismrmrdHeader`` by name."""
    found: dict[str, float | int | str] = {}
    user = getattr(header, "userParameters", None)
    if user is None:
        return found
    for item in getattr(user, "userParameterLong", None) or []:
        found[item.name] = int(item.value)
    for item in getattr(user, "userParameterDouble", None) or []:
        found[item.name] = float(item.value)
    for item in getattr(user, "userParameterString", None) or []:
        found[item.name] = str(item.value)
    return found


def _required(parameters: dict[str, float | int | str], name: str, series: str) -> float | int | str:
    if name not in parameters:
        raise HeaderError(f"MRD header has no user parameter {name!r} (needed for the {series} Gd look-up table)")
    return parameters[name]


def field_strength_t(header: Any) -> float:
    """``acquisitionSystemInformation.systemFieldStrength_T`` (raises :class:`HeaderError`)."""
    system = getattr(header, "acquisitionSystemInformation", None)
    value = getattr(system, "systemFieldStrength_T", None) if system is not None else None
    if value is None or not math.isfinite(float(value)) or float(value) <= 0:
        raise HeaderError("MRD header has no acquisitionSystemInformation.systemFieldStrength_T")
    return float(value)


def sequence_from_header(header: Any, encoding_space: int) -> SequenceParameters:
    """Sequence parameters of encoding space 0 (myocardium) or 1 (AIF) from an MRD header.

    Args:
        header: ``ismrmrd.xsd.ismrmrdHeader``.
        encoding_space: 0 = myocardial series, 1 = AIF series (docs/simulator.md).

    Returns:
        :class:`perfline.toolbox.bloch.SequenceParameters` of that series (for the AIF the
        first echo time).

    Raises:
        HeaderError: naming the missing or inconsistent field.
    """
    if encoding_space not in (MYOCARDIAL_ENCODING, AIF_ENCODING):
        raise HeaderError(f"encoding_space must be 0 (myocardium) or 1 (AIF), got {encoding_space}")
    encodings = list(getattr(header, "encoding", None) or [])
    if len(encodings) <= encoding_space:
        series = "myocardial" if encoding_space == 0 else "AIF"
        raise HeaderError(f"MRD header has {len(encodings)} encoding space(s); the {series} series needs "
                          f"encoding space {encoding_space}")
    encoding = encodings[encoding_space]
    n_lines = int(encoding.encodedSpace.matrixSize.y)
    parallel = getattr(encoding, "parallelImaging", None)
    factor = getattr(getattr(parallel, "accelerationFactor", None), "kspace_encoding_step_1", None)
    acceleration = int(factor) if factor else 1
    params = user_parameters(header)
    if encoding_space == MYOCARDIAL_ENCODING:
        series = "myocardial"
        names = ("FlipAngle_deg", "RepetitionTime_ms", "SaturationDelay_ms", "ReadoutType", "SaturationTime_ms")
        te_values = list(getattr(getattr(header, "sequenceParameters", None), "TE", None) or [])
        if not te_values:
            raise HeaderError("MRD header has no sequenceParameters.TE (myocardial echo time)")
        te_ms = float(te_values[0])
    else:
        series = "AIF"
        names = ("AIFFlipAngle_deg", "AIFRepetitionTime_ms", "AIFSaturationDelay_ms", "AIFReadoutType",
                 "AIFSaturationTime_ms")
        te_ms = float(_required(params, "AIFEchoTime1_ms", series))
        acceleration = int(params.get("AIFAccelerationFactor", acceleration))
    flip, tr, delay, readout, saturation_time = (_required(params, name, series) for name in names)
    pd_flip = float(_required(params, "PDFlipAngle_deg", series))
    pd_readout = str(params.get("PDReadoutType", "flash")) if encoding_space == MYOCARDIAL_ENCODING else "flash"
    for name, value in (("readout", readout), ("PD readout", pd_readout)):
        if str(value).lower() not in ("ssfp", "flash"):
            raise HeaderError(f"{series} {name} type must be 'ssfp' or 'flash', found {value!r}")
    sequence = SequenceParameters(
        field_strength_t=field_strength_t(header), flip_angle_deg=float(flip), tr_ms=float(tr), te_ms=te_ms,
        saturation_delay_ms=float(delay), n_phase_encodes=n_lines, acceleration=acceleration,
        readout=str(readout).lower(), pd_flip_angle_deg=pd_flip, pd_readout=pd_readout.lower())
    computed = saturation_time_ms(sequence)
    if abs(computed - float(saturation_time)) > 0.5:
        raise HeaderError(
            f"{series} saturation time in the header ({float(saturation_time):.2f} ms) differs from "
            f"TD + TR * ceil(floor(E1 / R) / 2) = {computed:.2f} ms (E1 {n_lines}, R {acceleration})")
    return sequence


@functools.lru_cache(maxsize=16)
def lookup_table(sequence: SequenceParameters, tissue: str, gd_max_mmol_l: float) -> GdLookupTable:
    """Cached :class:`GdLookupTable` (building one costs a Bloch simulation of the grid)."""
    return GdLookupTable(sequence, tissue, gd_max_mmol_l=gd_max_mmol_l)


def ratio_to_gd(ratio: np.ndarray, sequence: SequenceParameters, *, tissue: str = "myocardium",
                gd_max_mmol_l: float = MYOCARDIUM_GD_MAX_MMOL_L, continue_below_zero: bool = False) -> np.ndarray:
    """Gd (mmol/L) of every SR/PD ratio (any shape, float32 out), clipped to [0, gd_max].

    With ``continue_below_zero`` ratios under the native (Gd = 0) ratio map linearly below 0 mmol/L
    (:func:`ratio_to_gd_continued_below_zero`) instead of clipping to 0, so the noise of pre-bolus
    frames stays zero-mean (the clipped table rectifies it: a positive pre-bolus Gd that a baseline
    subtraction then takes off the whole curve, a per-study scale below 1 at low SNR;
    docs/preprocessing.md "Per-study Gd scale of the tissue curves"); a ratio of exactly 0 (air, set
    by ``surface-coil-correction``) stays 0 mmol/L.

    Raises:
        ValueError: if ``ratio`` contains non-finite values.
    """
    ratio = np.asarray(ratio, dtype=np.float32)
    if not np.all(np.isfinite(ratio)):
        raise ValueError(f"SR/PD ratio contains {int(np.sum(~np.isfinite(ratio)))} non-finite values")
    table = lookup_table(sequence, tissue, float(gd_max_mmol_l))
    above = float(np.mean(ratio > table.ratio_grid[-1]))
    if above > 0.01:
        logger.warning("%.1f %% of SR/PD ratios exceed the %s table (clipped at %.0f mmol/L)",
                       100 * above, tissue, gd_max_mmol_l)
    if continue_below_zero:
        return np.where(ratio == 0, 0.0, ratio_to_gd_continued_below_zero(ratio, table)).astype(np.float32)
    return table.to_gd(ratio).astype(np.float32)


def ratio_to_gd_continued_below_zero(ratio: np.ndarray | float, table: GdLookupTable) -> np.ndarray:
    """Gd (mmol/L, float64) of SR/PD ratios through ``table``, continued linearly below Gd = 0.

    ``table.to_gd`` clips ratios under the native (Gd = 0) ratio ``r0`` to 0 mmol/L. On a noisy
    curve that rectifies the noise of every frame near Gd = 0: before the bolus the clipped mean is
    positive although the true Gd is 0, and a baseline subtraction then lowers the whole curve by
    that offset (the AIF's late tail read 0.89-0.93 of the truth on simulated studies, the pool's
    pre-bolus Gd +0.05-0.07 mmol/L; docs/mapping.md "The AIF baseline"). Here a ratio ``r < r0``
    maps to ``(r - r0) / s0`` with ``s0`` the table's slope d(SR/PD)/dGd at 0 (first grid step), so
    noise stays zero-mean before the bolus; ratios at or above ``r0`` are ``table.to_gd`` exactly
    (clipped at the table's top).

    Args:
        ratio: SR/PD ratios, any shape (e.g. a pool-mean curve [time]).
        table: the series' look-up table (``lookup_table``).

    Returns:
        float64 array of ``ratio``'s shape; negative where ``ratio < r0``.
    """
    values = np.asarray(ratio, dtype=np.float64)
    native = float(table.ratio_grid[0])
    slope = float(table.ratio_grid[1] - native) / float(table.gd_grid_mmol_l[1])
    return np.where(values < native, (values - native) / slope, table.to_gd(values))


def myocardial_gd(ratio: np.ndarray, sequence: SequenceParameters, *, continue_below_zero: bool = False) -> np.ndarray:
    """Myocardial series SR/PD -> Gd with the myocardium table (0-10 mmol/L; ``continue_below_zero``:
    see :func:`ratio_to_gd`)."""
    return ratio_to_gd(ratio, sequence, tissue="myocardium", gd_max_mmol_l=MYOCARDIUM_GD_MAX_MMOL_L,
                       continue_below_zero=continue_below_zero)


def aif_gd(ratio: np.ndarray, sequence: SequenceParameters) -> np.ndarray:
    """AIF series SR/PD (T2*-corrected echo 1) -> Gd with the blood table (0-40 mmol/L)."""
    return ratio_to_gd(ratio, sequence, tissue="blood", gd_max_mmol_l=AIF_GD_MAX_MMOL_L)
