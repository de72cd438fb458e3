"""Free-breathing respiratory motion: displacement fields per frame and the image warp.

Convention (also in docs/simulator.md): the displacement ``d_t(p)`` (pixels, (row, col)) pulls
back, ``I_t(p) = I_ref(p + d_t(p))``, where ``I_ref`` is the end-expiration reference at which
the truth labels are drawn. The field is a translation weighted by a smooth map (the heart and
the upper abdomen move most, the chest wall and spine least) plus a small expansion about the
heart, both scaled by the respiratory trace ``r(t)`` in [0, 1] (0 = end expiration).
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BreathingParameters:
    period_s: float
    phase_rad: float
    amplitude_mm: float
    direction_deg: float            # image angle of the inspiratory displacement of the anatomy
    expansion: float                # relative scale change about the heart at full inspiration
    breath_hold_s: float            # shallow breathing (10 % amplitude) until this time
    jitter_mm: float                # frame-to-frame irregularity


def sample_breathing(rng: np.random.Generator, kind: str) -> BreathingParameters:
    return BreathingParameters(
        period_s=rng.uniform(2.5, 4.5) if kind == "stress" else rng.uniform(3.5, 6.0),
        phase_rad=rng.uniform(0, 2 * math.pi), amplitude_mm=rng.uniform(3.0, 14.0),
        direction_deg=rng.uniform(-120, -60) if rng.random() < 0.8 else rng.uniform(0, 360),
        expansion=rng.uniform(0.0, 0.04),
        breath_hold_s=rng.uniform(8.0, 30.0) if rng.random() < 0.5 else 0.0,
        jitter_mm=rng.uniform(0.2, 0.8))


def respiratory_trace(breathing: BreathingParameters, time_s: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """r(t) in [0, 1] at ``time_s`` (0 = end expiration), with a breath hold at the start."""
    t = np.asarray(time_s, dtype=np.float64)
    trace = (0.5 - 0.5 * np.cos(2 * math.pi * t / breathing.period_s + breathing.phase_rad)) ** 1.5
    depth = np.where(t < breathing.breath_hold_s, 0.1, 1.0)
    return trace * depth


@dataclass(frozen=True, eq=False)
class MotionField:
    """Displacement of every frame: ``d_t = trace[t] * base + jitter[t]`` (pixels, pull-back).

    base: float32 [2 (row, col), rows, cols]; trace: float32 [frames]; jitter: float32 [frames, 2].
    """

    base: np.ndarray
    trace: np.ndarray
    jitter: np.ndarray

    def frames(self, first: int, last: int) -> MotionField:
        """The field of frames ``first`` to ``last - 1`` (shares ``base``)."""
        return MotionField(base=self.base, trace=self.trace[first:last], jitter=self.jitter[first:last])

    def displacement(self) -> np.ndarray:
        """Full field float32 [frames, 2, rows, cols]."""
        return self.trace[:, None, None, None] * self.base[None] + self.jitter[:, :, None, None]


def displacement_fields(breathing: BreathingParameters, trace: np.ndarray, shape: tuple[int, int],
                        pixel_spacing_mm: float, heart_rc: tuple[float, float],
                        rng: np.random.Generator) -> MotionField:
    """Pull-back displacement model (pixels) of a series; see :class:`MotionField`."""
    rows, cols = np.indices(shape, dtype=np.float32)
    distance_mm = np.hypot(rows - heart_rc[0], cols - heart_rc[1]) * pixel_spacing_mm
    weight = 0.3 + 0.7 * np.exp(-0.5 * (distance_mm / 70.0) ** 2)
    direction = math.radians(breathing.direction_deg)
    # anatomy moves by +m (drawn at p), so the pull-back displacement is -m
    move_row = -math.sin(direction) * breathing.amplitude_mm / pixel_spacing_mm
    move_col = math.cos(direction) * breathing.amplitude_mm / pixel_spacing_mm
    base = np.stack([-(move_row * weight + breathing.expansion * (rows - heart_rc[0]) * weight),
                     -(move_col * weight + breathing.expansion * (cols - heart_rc[1]) * weight)])
    jitter = rng.normal(0.0, breathing.jitter_mm / pixel_spacing_mm, size=(trace.size, 2))
    return MotionField(base=base.astype(np.float32), trace=np.asarray(trace, dtype=np.float32),
                       jitter=jitter.astype(np.float32))


def warp(images: np.ndarray, field: MotionField) -> np.ndarray:
    """Bilinear pull-back warp of images [frames, rows, cols] by a motion field.

    Samples outside the image take the nearest edge value. Returns float32, same shape. Uses
    torch's ``grid_sample`` when torch is installed (about 5x faster on CPU; run on one torch
    thread, see ``_single_torch_thread``), else numpy; both compute the same bilinear
    interpolation.
    """
    images = np.ascontiguousarray(images, dtype=np.float32)
    frames, rows, cols = images.shape
    torch = _torch()
    if torch is not None:
        # sampling grid in grid_sample's normalised (x, y) coordinates, built as contiguous x and y
        # planes [frames, 2, rows, cols] and handed over as a strided [frames, rows, cols, 2] view
        # (grid_sample reads strided grids; interleaving x and y in numpy is slower)
        sx, sy = np.float32(2.0 / (cols - 1)), np.float32(2.0 / (rows - 1))
        trace = field.trace[:, None, None]
        grid = np.empty((frames, 2, rows, cols), dtype=np.float32)
        gx, gy = grid[:, 0], grid[:, 1]
        np.multiply(trace, (field.base[1] * sx)[None], out=gx)
        gx += (np.arange(cols, dtype=np.float32) * sx - 1.0)[None, None, :] + (field.jitter[:, 1] * sx)[:, None, None]
        np.multiply(trace, (field.base[0] * sy)[None], out=gy)
        gy += (np.arange(rows, dtype=np.float32) * sy - 1.0)[None, :, None] + (field.jitter[:, 0] * sy)[:, None, None]
        with torch.no_grad(), _single_torch_thread(torch):
            out = torch.nn.functional.grid_sample(torch.from_numpy(images)[:, None],
                                                  torch.from_numpy(grid).permute(0, 2, 3, 1), mode="bilinear",
                                                  padding_mode="border", align_corners=True)
        return out[:, 0].numpy()
    displacement = field.displacement()
    r = displacement[:, 0] + np.arange(rows, dtype=np.float32)[None, :, None]
    c = displacement[:, 1] + np.arange(cols, dtype=np.float32)[None, None, :]
    np.clip(r, 0, rows - 1.001, out=r)
    np.clip(c, 0, cols - 1.001, out=c)
    r0 = r.astype(np.intp)
    c0 = c.astype(np.intp)
    r -= r0
    c -= c0
    index = r0 * cols + c0 + (np.arange(frames, dtype=np.intp) * (rows * cols))[:, None, None]
    flat = images.ravel()
    top = flat[index]
    top += (flat[index + 1] - top) * c
    index += cols
    bottom = flat[index]
    bottom += (flat[index + 1] - bottom) * c
    top += (bottom - top) * r
    return top


_TORCH_THREADS_LOCK = threading.Lock()


@contextlib.contextmanager
def _single_torch_thread(torch) -> Iterator[None]:  # noqa: ANN001 - optional dependency
    """Run torch on the calling thread only, then restore its thread count.

    torch's OpenMP workers keep spinning after each parallel region and slow the numpy work
    that follows: with 2 torch threads on the shared 2-core machine the image path ran at 12
    slices per CPU-second with the warp parallel, 25 with it on one thread (the warp is called
    once per block of frames). No-op where torch already has one thread (DataLoader workers).
    """
    with _TORCH_THREADS_LOCK:
        threads = torch.get_num_threads()
        if threads > 1:
            torch.set_num_threads(1)
        try:
            yield
        finally:
            if threads > 1:
                torch.set_num_threads(threads)


@functools.lru_cache(maxsize=1)
def _torch():  # noqa: ANN202 - optional dependency
    try:
        import torch
    except ImportError:
        return None
    return torch
