"""Temporal resampling of perfusion series onto a uniform time grid.

Frames of a first-pass perfusion scan are acquired once per heartbeat, so their time stamps
follow the heart rate: they drift when it changes and jump when a trigger is missed. The
flow models need a fixed sampling interval, so every pixel is linearly interpolated onto a
uniform grid (0.5 s, i.e. 120 bpm, by default) after motion correction (Xue et al., MRM 2020;
REFERENCES.md section 2). Linear interpolation is exact for curves that are linear between
the acquisition time stamps, and bridges a missed trigger with a straight line.
"""

from __future__ import annotations

import logging

import numpy as np

logger = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 0.5


class TimeStampError(ValueError):
    """Time stamps that cannot be resampled (not increasing, not finite, wrong length)."""


def check_time_stamps(time_s: np.ndarray, n_frames: int | None = None) -> np.ndarray:
    """Validate acquisition time stamps and return them as float64 [time].

    Raises:
        TimeStampError: if they are not a 1-D finite, strictly increasing array (of
            ``n_frames`` values when given).
    """
    time_s = np.asarray(time_s, dtype=np.float64)
    if time_s.ndim != 1:
        raise TimeStampError(f"time stamps must be 1-D [time], found shape {time_s.shape}")
    if n_frames is not None and time_s.size != n_frames:
        raise TimeStampError(f"expected {n_frames} time stamps (one per frame), found {time_s.size}")
    if time_s.size < 2:
        raise TimeStampError(f"need at least 2 time stamps to resample, found {time_s.size}")
    if not np.all(np.isfinite(time_s)):
        raise TimeStampError(f"time stamps must be finite, found {int(np.sum(~np.isfinite(time_s)))} non-finite")
    steps = np.diff(time_s)
    if np.any(steps <= 0):
        bad = int(np.argmax(steps <= 0))
        raise TimeStampError(
            f"time stamps must increase strictly; frame {bad + 1} at {time_s[bad + 1]:.4f} s "
            f"follows frame {bad} at {time_s[bad]:.4f} s"
        )
    return time_s


def uniform_grid(time_s: np.ndarray, interval_s: float = DEFAULT_INTERVAL_S, *,
                 start_s: float | None = None) -> np.ndarray:
    """Uniform grid from ``start_s`` (default: first time stamp) up to the last time stamp.

    Args:
        time_s: float [time] acquisition time stamps in seconds (strictly increasing).
        interval_s: grid spacing in seconds.
        start_s: first grid point in seconds; must lie within the acquired interval.

    Returns:
        float64 [n] grid points ``start_s + k * interval_s`` that do not exceed the last stamp
        (a rounding tolerance of 1e-9 s keeps an end point that falls on the last stamp).
    """
    time_s = check_time_stamps(time_s)
    if not interval_s > 0:
        raise ValueError(f"interval_s must be > 0, found {interval_s}")
    start = float(time_s[0]) if start_s is None else float(start_s)
    if start < time_s[0] - 1e-9 or start > time_s[-1]:
        raise ValueError(f"start_s {start} s is outside the acquired interval [{time_s[0]}, {time_s[-1]}] s")
    count = int(np.floor((time_s[-1] - start) / interval_s + 1e-9)) + 1
    return start + interval_s * np.arange(count, dtype=np.float64)


def resample_series(data: np.ndarray, time_s: np.ndarray, grid_s: np.ndarray) -> np.ndarray:
    """Linear interpolation of every pixel of a series from ``time_s`` onto ``grid_s``.

    Args:
        data: float [time, ...] (e.g. [time, rows, cols]); axis 0 matches ``time_s``.
        time_s: float [time] acquisition time stamps in seconds, strictly increasing, any
            spacing (heart-rate changes and missed triggers give irregular steps).
        grid_s: float [n] target times in seconds, all within [time_s[0], time_s[-1]].

    Returns:
        float32 [n, ...] resampled series (float64 if ``data`` is float64).

    Raises:
        TimeStampError: on invalid time stamps.
        ValueError: if a grid point lies outside the acquired interval (no extrapolation) or
            ``data`` contains non-finite values.
    """
    data = np.asarray(data)
    time_s = check_time_stamps(time_s, data.shape[0])
    grid_s = np.asarray(grid_s, dtype=np.float64)
    if grid_s.ndim != 1 or grid_s.size == 0:
        raise ValueError(f"grid_s must be a non-empty 1-D array, found shape {grid_s.shape}")
    tolerance = 1e-9
    if grid_s.min() < time_s[0] - tolerance or grid_s.max() > time_s[-1] + tolerance:
        raise ValueError(
            f"grid [{grid_s.min():.4f}, {grid_s.max():.4f}] s exceeds the acquired interval "
            f"[{time_s[0]:.4f}, {time_s[-1]:.4f}] s: no extrapolation"
        )
    if not np.all(np.isfinite(data)):
        raise ValueError(f"data contains {int(np.sum(~np.isfinite(data)))} non-finite values")
    grid = np.clip(grid_s, time_s[0], time_s[-1])
    left = np.clip(np.searchsorted(time_s, grid, side="right") - 1, 0, time_s.size - 2)
    weight = (grid - time_s[left]) / (time_s[left + 1] - time_s[left])
    out_dtype = np.float64 if data.dtype == np.float64 else np.float32
    weight = weight.reshape((-1,) + (1,) * (data.ndim - 1)).astype(out_dtype)
    resampled = (1 - weight) * data[left] + weight * data[left + 1]
    gaps = np.diff(time_s)
    if gaps.max() > 1.5 * np.median(gaps):
        logger.info("time stamps have gaps up to %.3f s (median step %.3f s): missed triggers bridged "
                    "linearly", gaps.max(), np.median(gaps))
    return resampled.astype(out_dtype, copy=False)


def resample_to_uniform(data: np.ndarray, time_s: np.ndarray, interval_s: float = DEFAULT_INTERVAL_S,
                        *, start_s: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Resample ``data`` [time, ...] onto ``uniform_grid(time_s, interval_s, start_s=...)``.

    Returns:
        (grid_s float64 [n], resampled [n, ...]).
    """
    grid_s = uniform_grid(time_s, interval_s, start_s=start_s)
    return grid_s, resample_series(data, time_s, grid_s)


def interpolation_matrix(source_s: np.ndarray, target_s: np.ndarray, *, left: float | None = None) -> np.ndarray:
    """Linear interpolation as a matrix: ``M @ values == np.interp(target_s, source_s, values)``.

    Args:
        source_s: float [S] strictly increasing sample times (s).
        target_s: float [N] times (s) to interpolate at; beyond the last source time the last
            value is held (as ``np.interp``); before the first, the first value, or zero when
            ``left == 0`` (curves that start from a zero baseline).

    Returns:
        float64 [N, S], at most two non-zero weights per row (summing to 1 inside the range).

    Used to model a sampling chain exactly, e.g. a curve on a fine grid taken at a slice's
    acquisition times and then interpolated onto the uniform grid as :func:`resample_series`
    does (``toolbox.btex.sampled_aif_table``).
    """
    source_s = check_time_stamps(source_s)
    target_s = np.asarray(target_s, dtype=np.float64)
    if left not in (None, 0, 0.0):
        raise ValueError(f"left must be None (hold the first value) or 0, got {left}")
    clipped = np.clip(target_s, source_s[0], source_s[-1])
    lower = np.clip(np.searchsorted(source_s, clipped, side="right") - 1, 0, source_s.size - 2)
    weight = (clipped - source_s[lower]) / (source_s[lower + 1] - source_s[lower])
    matrix = np.zeros((target_s.size, source_s.size))
    rows = np.arange(target_s.size)
    matrix[rows, lower] = 1.0 - weight
    matrix[rows, lower + 1] += weight
    if left is not None:
        matrix[target_s < source_s[0]] = 0.0
    return matrix
