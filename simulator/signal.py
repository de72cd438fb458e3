"""MR signal of the phantom: tissue properties, signal tables, image series, coil sensitivities.

The signal of a pixel is the sum over tissue classes of ``fraction * M0 * (1 + a * texture)
* s(Gd(t))``, where ``s`` is the centre-line signal of the saturation-recovery readout (or of
the PD readout for the first frames) from :mod:`perfline.toolbox.bloch` for the class's T1 and
T2. AIF echoes are further weighted by ``exp(-TE * R2*)`` with ``R2* = R2*_0 + r2* Gd``.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from perfline.simulator.anatomy import TISSUE_CLASSES, SliceAnatomy
from perfline.simulator.kernels import matmul_columns
from perfline.toolbox.bloch import SequenceParameters, sr_and_pd_signal

# relaxation tissue used for each class
RELAXATION_TISSUE: dict[str, str] = {
    "lv_blood": "blood", "rv_blood": "blood", "aorta": "blood", "pulmonary_vessels": "blood",
    "myocardium": "myocardium", "rv_wall": "myocardium", "papillary": "myocardium",
    "epicardial_fat": "fat", "subcutaneous_fat": "fat", "liver": "liver", "marrow": "marrow",
    "muscle": "muscle", "lung": "lung", "spleen": "spleen",
}
# relative proton density and texture amplitude (fraction of M0) per class
PROTON_DENSITY: dict[str, float] = {
    "lv_blood": 0.95, "rv_blood": 0.95, "aorta": 0.95, "pulmonary_vessels": 0.95, "myocardium": 0.80,
    "rv_wall": 0.80, "papillary": 0.80, "epicardial_fat": 0.90, "subcutaneous_fat": 0.90, "liver": 0.75,
    "marrow": 0.80, "muscle": 0.75, "lung": 0.12, "spleen": 0.85,
}
TEXTURE_AMPLITUDE: dict[str, float] = {
    "lv_blood": 0.03, "rv_blood": 0.03, "aorta": 0.03, "pulmonary_vessels": 0.1, "myocardium": 0.04,
    "rv_wall": 0.05, "papillary": 0.05, "epicardial_fat": 0.06, "subcutaneous_fat": 0.06, "liver": 0.08,
    "marrow": 0.1, "muscle": 0.08, "lung": 0.35, "spleen": 0.08,
}
GD_TABLE_MAX = 40.0
GD_TABLE_STEP = 0.01
# T2* of blood shortened by Gd: R2* = R2*_0 + r2* Gd, 1/s and 1/s per mmol/L (susceptibility of
# the bolus in the LV cavity; calibrated so the first AIF echo loses about 5-10 % at the peak)
R2STAR_BLOOD_PER_S = {1.5: 16.0, 3.0: 26.0}
R2STAR_NATIVE_PER_S = 25.0


@functools.lru_cache(maxsize=64)
def signal_table(seq: SequenceParameters, tissue: str) -> tuple[np.ndarray, np.ndarray]:
    """SR and PD centre-line signals per unit M0 on the Gd grid 0..GD_TABLE_MAX (float64 [G])."""
    grid = np.arange(0.0, GD_TABLE_MAX + GD_TABLE_STEP / 2, GD_TABLE_STEP)
    sr, pd = sr_and_pd_signal(grid, seq, tissue)
    return sr, pd


def table_lookup(table: np.ndarray, gd_mmol_l: np.ndarray) -> np.ndarray:
    """Linear interpolation in a signal table on the uniform Gd grid (Gd clipped to the grid)."""
    position = np.clip(np.asarray(gd_mmol_l) * (1.0 / GD_TABLE_STEP), 0.0, table.size - 1.001)
    index = position.astype(np.intp)
    position -= index
    out = table[index]
    out += (table[index + 1] - out) * position
    return out


@functools.lru_cache(maxsize=16)
def unsaturated_table(seq: SequenceParameters, tissue: str) -> np.ndarray:
    """Readout signal per unit M0 of spins that missed the saturation pulse (fully relaxed)."""
    relaxed = seq.model_copy(update={"saturation_delay_ms": 1e7})
    return signal_table(relaxed, tissue)[0]


def class_signals(seq: SequenceParameters, gd_by_class: dict[str, np.ndarray], n_pd_frames: int,
                  blood_inflow_fraction: float = 0.0) -> np.ndarray:
    """Signal per unit M0 [T, C] of every class (order of TISSUE_CLASSES); PD frames first.

    ``blood_inflow_fraction`` of the blood in the blood classes flowed in from outside the
    slice after the (slice-selective) saturation pulse: it is read out fully relaxed, which
    raises the pre-contrast blood signal as on real scans.
    """
    columns = []
    for name in TISSUE_CLASSES:
        tissue = RELAXATION_TISSUE[name]
        sr_table, pd_table = signal_table(seq, tissue)
        gd = gd_by_class[name]
        signal = table_lookup(sr_table, gd)
        if blood_inflow_fraction > 0 and tissue == "blood":
            signal = ((1.0 - blood_inflow_fraction) * signal
                      + blood_inflow_fraction * table_lookup(unsaturated_table(seq, tissue), gd))
        signal[:n_pd_frames] = table_lookup(pd_table, gd[:n_pd_frames])
        columns.append(signal)
    return np.stack(columns, axis=1)


def class_weights(anatomy: SliceAnatomy, exclude: tuple[str, ...] = ()) -> np.ndarray:
    """Per-pixel weight [C, rows * cols] = fraction * M0 * max(1 + a * texture, 0.05)."""
    texture = anatomy.texture.ravel()
    rows = []
    for name in TISSUE_CLASSES:
        if name in exclude:
            rows.append(np.zeros_like(texture))
            continue
        rows.append(anatomy.fractions[name].ravel() * PROTON_DENSITY[name]
                    * np.maximum(1.0 + TEXTURE_AMPLITUDE[name] * texture, 0.05))
    return np.stack(rows).astype(np.float32)


def render_series(anatomy: SliceAnatomy, seq: SequenceParameters, gd_by_class: dict[str, np.ndarray],
                  n_pd_frames: int, myocardium_gd: np.ndarray | None = None,
                  echo_time_ms: float | None = None, blood_inflow_fraction: float = 0.0) -> np.ndarray:
    """Noise-free magnitude series float32 [T, rows, cols] at the reference position.

    Args:
        gd_by_class: Gd (mmol/L) [T] per class of TISSUE_CLASSES at the frame times.
        myocardium_gd: Gd [T, N] of the N pixels where the myocardium fraction is > 0 (in
            ``np.flatnonzero`` order); if None, the "myocardium" class curve is used for all.
        echo_time_ms: if given (AIF echoes), weight each class by exp(-TE R2*).
        blood_inflow_fraction: unsaturated inflowing fraction of the blood (see class_signals).
    """
    shape = anatomy.labels.shape
    per_pixel = myocardium_gd is not None
    weights = class_weights(anatomy, exclude=("myocardium",) if per_pixel else ())
    signals = class_signals(seq, gd_by_class, n_pd_frames, blood_inflow_fraction)
    if echo_time_ms is not None:
        signals = signals * _echo_decay(seq, gd_by_class, echo_time_ms)
    images = matmul_columns(signals.astype(np.float32), weights).reshape(-1, *shape)
    if per_pixel:
        sr_table, pd_table = signal_table(seq, "myocardium")
        index = np.flatnonzero(anatomy.fractions["myocardium"])
        pixel_signal = table_lookup(sr_table, myocardium_gd)
        pixel_signal[:n_pd_frames] = table_lookup(pd_table, myocardium_gd[:n_pd_frames])
        w = (anatomy.fractions["myocardium"].ravel()[index] * PROTON_DENSITY["myocardium"]
             * np.maximum(1.0 + TEXTURE_AMPLITUDE["myocardium"] * anatomy.texture.ravel()[index], 0.05))
        flat = images.reshape(images.shape[0], -1)
        flat[:, index] += (pixel_signal * w[None, :]).astype(np.float32)
    return images


def _echo_decay(seq: SequenceParameters, gd_by_class: dict[str, np.ndarray], echo_time_ms: float) -> np.ndarray:
    field = 1.5 if abs(seq.field_strength_t - 1.5) < 1e-6 else 3.0
    columns = []
    for name in TISSUE_CLASSES:
        r2star_per_mmol = R2STAR_BLOOD_PER_S[field] * (1.0 if RELAXATION_TISSUE[name] == "blood" else 0.3)
        columns.append(np.exp(-echo_time_ms / 1000.0 * (R2STAR_NATIVE_PER_S + r2star_per_mmol * gd_by_class[name])))
    return np.stack(columns, axis=1)


def coil_sensitivities(n_coils: int, shape: tuple[int, int], pixel_spacing_mm: float,
                       body_center_xy_mm: tuple[float, float], body_semi_axes_mm: tuple[float, float],
                       rng: np.random.Generator, magnitude_only: bool = False) -> np.ndarray:
    """Smooth complex receive sensitivities complex64 [coils, rows, cols].

    Coils sit on an ellipse 20 mm outside the body, half anterior and half posterior, each at a
    random through-plane offset; magnitude ``1 / (1 + (distance / 90 mm)^2)``, phase linear in
    space plus a constant. Normalised so that the root sum of squares peaks at 1. With
    ``magnitude_only`` the float32 magnitudes are returned (same random draws, no phase).
    """
    rows, cols = shape
    y = -(np.arange(rows)[:, None] - (rows - 1) / 2) * pixel_spacing_mm
    x = (np.arange(cols)[None, :] - (cols - 1) / 2) * pixel_spacing_mm
    sens = np.empty((n_coils, rows, cols), dtype=np.float32 if magnitude_only else np.complex64)
    n_anterior = (n_coils + 1) // 2
    for coil in range(n_coils):
        anterior = coil < n_anterior
        k = coil if anterior else coil - n_anterior
        count = n_anterior if anterior else n_coils - n_anterior
        angle = math.pi * ((k + 0.5) / count) * 0.8 + 0.1 * math.pi
        angle = angle if anterior else -angle
        angle += rng.normal(0, 0.05)
        qx = body_center_xy_mm[0] + (body_semi_axes_mm[0] + 20) * math.cos(angle)
        qy = body_center_xy_mm[1] + (body_semi_axes_mm[1] + 20) * math.sin(angle)
        z = rng.uniform(-60, 60)
        distance2 = (x - qx) ** 2 + (y - qy) ** 2 + z**2
        magnitude = 1.0 / (1.0 + distance2 / 90.0**2)
        phase_offset, slope_x, slope_y = rng.uniform(0, 2 * math.pi), rng.normal(0, 0.01), rng.normal(0, 0.01)
        if magnitude_only:
            sens[coil] = magnitude
        else:
            sens[coil] = magnitude * np.exp(1j * (phase_offset + slope_x * x + slope_y * y))
    rss = np.sqrt(np.sum(np.abs(sens) ** 2, axis=0))
    return (sens / rss.max()).astype(sens.dtype)
