"""Resampling of image series at displaced positions (the motion correction's warp).

``warp_frames(series, row_px, col_px, order)`` returns every frame ``f`` sampled at
``(r + row_px[f, r, c], c + col_px[f, r, c])``, positions clipped to the frame (edge values
continued), bilinear (``order`` 1) or cubic B-spline (``order`` 3, the frame prefiltered first;
Unser, IEEE Signal Process. Mag. 1999;16(6):22). It gives what ``scipy.ndimage.map_coordinates``
gives with ``mode="nearest"`` frame by frame, in compiled loops (numba, an optional dependency):

- bilinear: the positions are formed and interpolated in float64 per pixel, 5-8x faster than
  one ``map_coordinates`` call on the frames stacked along rows, whose float32 row coordinates
  (frame index x rows + row) lose up to 5e-4 pixel in the last frames of a 63-frame series;
- cubic: the prefilter is scipy's (``spline_filter`` on the frame padded by 12 edge pixels, as
  ``map_coordinates`` does for ``mode="nearest"``), the 4 x 4 evaluation compiled.

Without numba, or with ``NUMBA_DISABLE_JIT=1``, the same results come from ``map_coordinates``
(the reference the tests compare against). Timing: ``benchmarks/bench_preprocessing.py``.
"""

from __future__ import annotations

import logging
import time

import numpy as np
from scipy import ndimage

from perfline.toolbox.box_filter import warm_compiled_box_filter
from perfline.toolbox.jit import numba_or_none

logger = logging.getLogger(__name__)

WARP_ORDERS = (1, 3)
_SPLINE_PAD = 12  # edge pixels added before the cubic prefilter, as map_coordinates pads for mode "nearest"

numba = numba_or_none()


class WarpError(ValueError):
    """Series and displacements that cannot be resampled together."""


def _bilinear(series, row_px, col_px, out):  # pragma: no cover - compiled
    n_frames, n_rows, n_cols = series.shape
    for f in range(n_frames):
        for i in range(n_rows):
            for j in range(n_cols):
                r = min(max(i + np.float64(row_px[f, i, j]), 0.0), n_rows - 1.0)
                c = min(max(j + np.float64(col_px[f, i, j]), 0.0), n_cols - 1.0)
                r0 = min(int(r), n_rows - 2)
                c0 = min(int(c), n_cols - 2)
                wr = r - r0
                wc = c - c0
                top = series[f, r0, c0] + wc * (series[f, r0, c0 + 1] - series[f, r0, c0])
                bottom = series[f, r0 + 1, c0] + wc * (series[f, r0 + 1, c0 + 1] - series[f, r0 + 1, c0])
                out[f, i, j] = top + wr * (bottom - top)
    return out


def _spline_weights(t, weights):  # pragma: no cover - compiled (inlined into _cubic)
    """Cubic B-spline weights [4] of the taps floor(x) - 1 .. floor(x) + 2 at the fraction ``t``."""
    s = 1.0 - t
    weights[0] = s * s * s / 6.0
    weights[1] = (4.0 - 6.0 * t * t + 3.0 * t * t * t) / 6.0
    weights[2] = (1.0 + 3.0 * t + 3.0 * t * t - 3.0 * t * t * t) / 6.0
    weights[3] = t * t * t / 6.0


def _cubic(coefficients, row_px, col_px, pad, out):  # pragma: no cover - compiled
    """Cubic B-spline of ``coefficients`` (each frame padded by ``pad``) at the clipped positions:
    the 4 taps floor(x) - 1 .. floor(x) + 2 per axis, weights of the fraction t."""
    n_frames, n_rows, n_cols = out.shape
    wr = np.empty(4)
    wc = np.empty(4)
    for f in range(n_frames):
        for i in range(n_rows):
            for j in range(n_cols):
                r = min(max(i + np.float64(row_px[f, i, j]), 0.0), n_rows - 1.0) + pad
                c = min(max(j + np.float64(col_px[f, i, j]), 0.0), n_cols - 1.0) + pad
                r0 = int(np.floor(r))
                c0 = int(np.floor(c))
                _spline_weights(r - r0, wr)
                _spline_weights(c - c0, wc)
                total = 0.0
                for a in range(4):
                    line = 0.0
                    for b in range(4):
                        line += wc[b] * coefficients[f, r0 - 1 + a, c0 - 1 + b]
                    total += wr[a] * line
                out[f, i, j] = total
    return out


if numba is not None:
    _bilinear_c = numba.njit(cache=True, nogil=True)(_bilinear)
    _spline_weights = numba.njit(cache=True, nogil=True, inline="always")(_spline_weights)  # what _cubic calls
    _cubic_c = numba.njit(cache=True, nogil=True)(_cubic)


def warp_frames(series: np.ndarray, row_px: np.ndarray, col_px: np.ndarray, order: int = 1, *,
                compiled: bool | None = None) -> np.ndarray:
    """Every frame of ``series`` resampled at its displaced positions (see the module doc).

    Args:
        series: float [time, rows, cols] (rows, cols >= 2).
        row_px, col_px: float [time, rows, cols] backward displacement along rows and columns, pixels.
        order: 1 bilinear, 3 cubic B-spline.
        compiled: True the numba loops, False ``scipy.ndimage.map_coordinates``; None picks numba
            when it is installed and enabled.

    Returns:
        float32 [time, rows, cols].

    Raises:
        WarpError: other shapes or orders; ImportError: ``compiled=True`` without numba.
    """
    if order not in WARP_ORDERS:
        raise WarpError(f"warp interpolation order must be one of {WARP_ORDERS}, got {order}")
    frames = np.ascontiguousarray(series, dtype=np.float32)
    if frames.ndim != 3 or frames.shape[1] < 2 or frames.shape[2] < 2:
        raise WarpError(f"series must be [time, rows >= 2, cols >= 2], found shape {frames.shape}")
    if np.shape(row_px) != frames.shape or np.shape(col_px) != frames.shape:
        raise WarpError(f"displacements must have the series' shape {frames.shape}, "
                        f"found {np.shape(row_px)} and {np.shape(col_px)}")
    if compiled is None:
        compiled = numba is not None
    if compiled and numba is None:
        raise ImportError("warp_frames(compiled=True) needs numba, which is not installed or is disabled")
    if not compiled:
        return _warp_scipy(frames, np.asarray(row_px, np.float32), np.asarray(col_px, np.float32), order)
    row_px = np.ascontiguousarray(row_px, dtype=np.float32)
    col_px = np.ascontiguousarray(col_px, dtype=np.float32)
    out = np.empty_like(frames)
    if order == 1:
        return _bilinear_c(frames, row_px, col_px, out)
    return _cubic_c(_prefiltered(frames), row_px, col_px, _SPLINE_PAD, out)


def _prefiltered(frames: np.ndarray) -> np.ndarray:
    """Cubic B-spline coefficients float64 [time, rows + 24, cols + 24] of each frame, padded by edge values."""
    padded = np.pad(frames.astype(np.float64), ((0, 0), (_SPLINE_PAD, _SPLINE_PAD), (_SPLINE_PAD, _SPLINE_PAD)),
                    mode="edge")
    for f in range(padded.shape[0]):  # frame by frame: the prefilter must not couple neighbouring frames
        padded[f] = ndimage.spline_filter(padded[f], order=3, mode="mirror")
    return padded


def _warp_scipy(frames: np.ndarray, row_px: np.ndarray, col_px: np.ndarray, order: int) -> np.ndarray:
    """The reference: ``map_coordinates`` frame by frame, positions in float64."""
    n_rows, n_cols = frames.shape[1:]
    rows, cols = np.mgrid[0:n_rows, 0:n_cols].astype(np.float64)
    return np.stack([ndimage.map_coordinates(frames[f], [np.clip(rows + row_px[f], 0, n_rows - 1),
                                                         np.clip(cols + col_px[f], 0, n_cols - 1)],
                                             order=order, mode="nearest", prefilter=order > 1)
                     for f in range(frames.shape[0])]).astype(np.float32)


def warm_compiled_warp() -> float:
    """Compile (or load from numba's cache) the warp loops and the registration's box filter
    (``toolbox.box_filter``) on tiny inputs; seconds spent (0 without numba)."""
    if numba is None:
        return 0.0
    started = time.perf_counter()
    warm_compiled_box_filter()
    frames = np.zeros((1, 4, 4), dtype=np.float32)
    shift = np.full(frames.shape, 0.25, dtype=np.float32)
    for order in WARP_ORDERS:
        warp_frames(frames, shift, shift, order, compiled=True)
    spent = time.perf_counter() - started
    logger.debug("warp loops compiled or loaded in %.2f s", spent)
    return spent
