"""Image-domain simulation for training and tests: all physics except k-space.

A slice's series is the noise-free magnitude series of :func:`perfline.simulator.study.slice_phantom`
times the receive-coil shading (root sum of squares of the coil sensitivities), warped by the
respiratory motion, plus complex Gaussian noise (magnitude: Rician), as a coil-combined image of
an optimal (B1-weighted, noise-normalised) reconstruction would be.

For speed the noise of this path is read at random offsets from a fixed bank of 2**23 standard
normal samples (drawn once per process from a fixed seed, :mod:`perfline.simulator.kernels`)
instead of being drawn afresh; the k-space path draws fresh noise.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from perfline.simulator import kernels
from perfline.simulator import study as st
from perfline.simulator.motion import MotionField, warp
from perfline.toolbox.bloch import GdLookupTable, SequenceParameters

_FRAMES_PER_BLOCK = 9  # frames warped, noised and converted together (9 x 144 x 192 float32 = 1 MB, in L2)


@dataclass(frozen=True)
class ImageSlice:
    """One simulated myocardial slice.

    signal: float32 [time, rows, cols] magnitude images, PD frames first, with coil shading,
        noise and respiratory motion.
    gd: float32 [time - n_pd_frames, rows, cols] Gd (mmol/L) of the SR frames only, as the
        preprocessing chain gives it after ideal motion correction: noisy SR / mean of the noisy
        PD frames (same noise realisation as ``signal``, no motion) through the myocardial
        SR/PD LUT (0-10 mmol/L, clipped). Times: ``time_s[n_pd_frames:]``.
    time_s: float64 [time] k-space-centre times (s from the first R wave), irregular.
    labels: uint8 [rows, cols] truth at the reference (end-expiration) position: 0 background,
        1 LV blood pool, 2 myocardium, 3 RV blood pool.
    mbf: float32 [rows, cols] ml/min/g, NaN outside the myocardium.
    pixel_spacing_mm: square pixels of the reconstructed myocardial grid (1.875 mm).
    level: "basal" | "mid" | "apical".
    rv_insertion_deg: anterior RV insertion, docs/conventions.md.
    lv_center_rc: LV blood-pool centroid (row, col), pixels.
    """

    signal: np.ndarray
    gd: np.ndarray
    time_s: np.ndarray
    n_pd_frames: int
    labels: np.ndarray
    mbf: np.ndarray
    pixel_spacing_mm: float
    level: str
    rv_insertion_deg: float
    lv_center_rc: tuple[float, float]


@functools.lru_cache(maxsize=4)
def myocardial_lut(seq: SequenceParameters) -> GdLookupTable:
    return GdLookupTable(seq, "myocardium", gd_max_mmol_l=10.0)


def coil_shading(study: st.StudyParameters) -> np.ndarray:
    """Root sum of squares of the coil sensitivities on the myocardial grid, float32 [rows, cols]."""
    sens = st.coil_maps(study, "myocardium", 0, st.MYO_SHAPE, st.MYO_PIXEL_MM, magnitude_only=True)
    return np.sqrt(np.sum(sens**2, axis=0)).astype(np.float32)


def image_slice(study: st.StudyParameters, index: int, *, noise: bool = True, motion: bool = True,
                shading: np.ndarray | None = None) -> ImageSlice:
    """Simulate slice ``index`` of ``study`` in the image domain.

    With noise, the series is computed in units of the noise SD (coil shading / sigma folded
    into one multiplication) and scaled back once at the end; the Gd conversion uses the
    ratio SR / PD, which does not depend on that scale.
    """
    phantom = st.slice_phantom(study, index, with_gd=False)
    shading = coil_shading(study) if shading is None else shading
    n_pd = study.n_pd_frames
    sigma = np.float32(st.noise_sigma(study)) if noise else np.float32(1.0)
    static = phantom.clean  # fresh array of this call: scaled in place
    static *= (shading * (np.float32(1.0) / sigma))[None]
    field = (st.motion_fields(study, "myocardium", index, st.MYO_SHAPE, st.MYO_PIXEL_MM, phantom.anatomy.lv_center_rc)
             if motion else None)
    noise_draw = (kernels.draw_bank_noise(np.random.default_rng([study.noise_seed, index]), static.size)
                  if noise else None)
    signal_out, gd = _measure(static, field, noise_draw, sigma, n_pd, myocardial_lut(study.myocardial_sequence))
    sl = phantom.anatomy
    return ImageSlice(signal=signal_out.astype(np.float32, copy=False), gd=gd.astype(np.float32, copy=False),
                      time_s=phantom.time_s, n_pd_frames=n_pd, labels=sl.labels, mbf=phantom.mbf,
                      pixel_spacing_mm=st.MYO_PIXEL_MM, level=phantom.level,
                      rv_insertion_deg=float(sl.rv_insertion_deg), lv_center_rc=sl.lv_center_rc)


def _measure(static: np.ndarray, field: MotionField | None, noise: tuple[np.ndarray, np.ndarray, bool] | None,
             sigma: np.float32, n_pd: int, lut: GdLookupTable) -> tuple[np.ndarray, np.ndarray]:
    """Motion, noise and Gd, a few frames at a time (the blocks stay in cache).

    ``static``: noise-free series without motion in units of ``sigma`` (overwritten: it becomes
    the measured series). Every block is warped by ``field`` (None: no motion) before its noise
    is added, both series get the same noise (``kernels.draw_bank_noise`` output; None: no
    noise). Returns (signal float32 [frames, rows, cols] in signal units: the moving noisy series,
    Gd float32 [frames - n_pd, rows, cols]: LUT of SR / max(mean PD, 1e-6) of the measured
    series without motion, as after ideal motion correction).
    """
    frames = static.shape[0]
    per_frame = static[0].size
    signal = np.empty_like(static) if field is not None else static
    gd = np.empty((frames - n_pd, *static.shape[1:]), dtype=np.float32)

    def block(first: int, last: int) -> None:
        moving = warp(static[first:last], field.frames(first, last)) if field is not None else None
        if noise is not None:
            part = slice(first * per_frame, last * per_frame)
            noise_re, noise_im_squared, negate = noise[0][part], noise[1][part], noise[2]
            if moving is not None:
                kernels.rician_in_place(moving, noise_re, negate, noise_im_squared, out=signal[first:last])
                signal[first:last] *= sigma
            kernels.rician_in_place(static[first:last], noise_re, negate, noise_im_squared, out=static[first:last])
        elif moving is not None:
            signal[first:last] = moving

    block(0, n_pd)
    pd_mean = static[:n_pd].mean(axis=0) * sigma
    scale = sigma / np.maximum(pd_mean, np.float32(1e-6))
    for first in range(n_pd, frames, _FRAMES_PER_BLOCK):
        last = min(first + _FRAMES_PER_BLOCK, frames)
        block(first, last)
        lut.to_gd(static[first:last], scale=scale, out=gd[first - n_pd:last - n_pd])
    if field is None and noise is not None:
        signal *= sigma  # the measured series is the signal: back to signal units, after the Gd
    return signal, gd


def simulate_image_study(seed: int, *, kind: str | None = None, field_strength_t: float | None = None,
                         n_slices: int = 3, n_frames: int = 60, noise: bool = True, motion: bool = True,
                         flow_model: str = "fermi") -> list[ImageSlice]:
    """Simulate a study in the image domain (no k-space); deterministic per seed and options.

    Args:
        seed: study seed (same seed and options give identical arrays).
        kind: "stress" | "rest" | None (random).
        field_strength_t: 1.5 | 3.0 | None (random).
        n_slices: slices spread base to apex (3: basal, mid, apical).
        n_frames: saturation-recovery frames; the 3 PD frames come in addition.
        noise, motion: switch the noise and the respiratory motion off for ideal tests.
        flow_model: "fermi" (default here: exact per pixel and fast) or "btex" (slower: the
            BTEX curves cost about 5 ms per MBF node; the k-space CLI defaults to BTEX).

    Returns:
        One :class:`ImageSlice` per slice, base to apex.
    """
    study = st.sample_study(seed, kind=kind, field_strength_t=field_strength_t, n_slices=n_slices,
                            n_frames=n_frames, flow_model=flow_model)
    shading = coil_shading(study)
    return [image_slice(study, k, noise=noise, motion=motion, shading=shading) for k in range(n_slices)]
