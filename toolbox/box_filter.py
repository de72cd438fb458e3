"""Box (moving-average) filter over the last two axes of a stack of images, in compiled loops.

``box_filter_plane(data, width)`` equals ``scipy.ndimage.uniform_filter1d`` along the rows axis and
then along the columns axis with ``mode="nearest"`` (edge values continued) and an odd ``width``:
each pass a running sum in float64, each pass's result rounded to float32 as scipy's is for float32
input. The motion correction's least-squares windows and field smoothing call it on
[5, time, rows, cols] stacks 30-40 times per slice, where scipy's filter was about a quarter of the
registration's time (docs/integration.md, "Session 30"). numba is optional: without it (or with
``NUMBA_DISABLE_JIT=1``) scipy's filter is used.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from perfline.toolbox.jit import numba_or_none

numba = numba_or_none()


def _box_plane(data, half, out):  # pragma: no cover - compiled
    """Both passes on float32 [N, rows, cols] ``data`` into ``out``: along the rows axis, then the columns."""
    n_images, n_rows, n_cols = data.shape
    width = 2 * half + 1
    rows_done = np.empty((n_rows, n_cols), dtype=np.float32)
    sums = np.empty(n_cols, dtype=np.float64)
    for k in range(n_images):
        # along the rows axis: one running sum per column, whole rows at a time (contiguous)
        for c in range(n_cols):
            sums[c] = 0.0
        for j in range(-half, half + 1):
            row = min(max(j, 0), n_rows - 1)
            for c in range(n_cols):
                sums[c] += data[k, row, c]
        for r in range(n_rows):
            entering = min(r + half + 1, n_rows - 1)
            leaving = max(r - half, 0)
            for c in range(n_cols):
                rows_done[r, c] = np.float32(sums[c] / width)
                sums[c] += np.float64(data[k, entering, c]) - np.float64(data[k, leaving, c])
        # along the columns axis
        for r in range(n_rows):
            total = 0.0
            for j in range(-half, half + 1):
                total += rows_done[r, min(max(j, 0), n_cols - 1)]
            for c in range(n_cols):
                out[k, r, c] = np.float32(total / width)
                total += np.float64(rows_done[r, min(c + half + 1, n_cols - 1)]) - \
                    np.float64(rows_done[r, max(c - half, 0)])
    return out


if numba is not None:
    _box_plane_c = numba.njit(cache=True, nogil=True)(_box_plane)


def box_filter_plane(data: np.ndarray, width: int, *, compiled: bool | None = None) -> np.ndarray:
    """Moving average of odd ``width`` over the last two axes of ``data`` [..., rows, cols], float32.

    ``compiled``: True the numba loops, False ``scipy.ndimage.uniform_filter1d`` twice; None picks
    numba when it is installed and enabled. Raises ValueError for an even or non-positive width or
    fewer than 2 axes; ImportError for ``compiled=True`` without numba.
    """
    values = np.asarray(data)
    if values.ndim < 2:
        raise ValueError(f"need [..., rows, cols] data, found shape {values.shape}")
    if width < 1 or width % 2 == 0:
        raise ValueError(f"the box width must be a positive odd number of pixels, got {width}")
    if compiled is None:
        compiled = numba is not None
    if compiled and numba is None:
        raise ImportError("box_filter_plane(compiled=True) needs numba, which is not installed or is disabled")
    if not compiled:
        out = np.asarray(values, dtype=np.float32)
        for axis in (-2, -1):
            out = ndimage.uniform_filter1d(out, width, axis=axis, mode="nearest")
        return out
    stack = np.ascontiguousarray(values, dtype=np.float32).reshape((-1,) + values.shape[-2:])
    out = np.empty_like(stack)
    return _box_plane_c(stack, width // 2, out).reshape(values.shape)


def warm_compiled_box_filter() -> None:
    """Compile (or load from numba's disk cache) the loops on a tiny stack."""
    if numba is not None:
        box_filter_plane(np.zeros((1, 3, 3), dtype=np.float32), 3, compiled=True)
