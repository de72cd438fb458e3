"""Continuous refinement of a pixel-wise table fit on its parameter grid (used by ``btex.py``).

After the global table search (``flow_fit``), each pixel's parameters are refined by a
multi-start Levenberg-Marquardt in grid coordinates on the multilinear interpolation of the
table (value and Jacobian of the cell the point lies in, ``interpolate_grid``), with early
stopping per pixel (``refine_on_grid``). A numba-compiled kernel (optional dependency; pixel
chunks on a shared thread pool, GIL released) does the same as the numpy array version, which is
the fallback without numba or with ``NUMBA_DISABLE_JIT=1``. Reference: QPerf's table search +
local refinement (REFERENCES.md section 4); Levenberg-Marquardt as in Press et al., Numerical
Recipes, section 15.5.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from perfline.toolbox.jit import numba_or_none

logger = logging.getLogger(__name__)


def _strides(grid: np.ndarray) -> np.ndarray:
    """Row-major strides (in elements) of a grid shape."""
    return np.r_[np.cumprod(grid[::-1])[::-1][1:], 1].astype(np.int64)


def interpolate_grid(table: np.ndarray, position: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Multilinear interpolation of ``table`` ``[*grid(D), R]`` at ``position`` ``[P, D]``.

    ``position`` is in grid coordinates (0 .. size - 1 per axis). Returns the values ``[P, R]``
    and their derivatives along each grid coordinate ``[P, R, D]`` (of the cell the point lies
    in), in the dtype of ``table``. The 2^D corner weights are built as products of per-axis
    factors on contiguous ``[P, 2^D]`` slabs (prefix and suffix products give every "all axes
    but one" product for the derivatives), then one batched matrix product with the gathered
    corners gives value and Jacobian together.
    """
    grid = np.array(table.shape[:-1])
    n_dims = grid.size
    n_points = position.shape[0]
    bits = np.array(list(itertools.product((0, 1), repeat=n_dims)), dtype=table.dtype)  # [C, D]
    strides = _strides(grid)
    lower = np.clip(np.floor(position).astype(np.int64), 0, grid - 2)
    frac = np.clip(position - lower, 0.0, 1.0).astype(table.dtype)
    flat_index = (lower @ strides)[:, None] + (bits.astype(np.int64) @ strides)[None, :]  # [P, C]
    cell = np.take(table.reshape(-1, table.shape[-1]), flat_index, axis=0)  # [P, C, R]
    # factor of axis d at each corner: 1 - f on the lower side, f on the upper side
    factors = [(1.0 - frac[:, d, None]) + (2.0 * frac[:, d, None] - 1.0) * bits[None, :, d] for d in range(n_dims)]
    prefix = [np.ones_like(factors[0])]
    for factor in factors[:-1]:
        prefix.append(prefix[-1] * factor)
    suffix = [np.ones_like(factors[0])]
    for factor in factors[:0:-1]:
        suffix.append(suffix[-1] * factor)
    suffix = suffix[::-1]
    weights = np.empty((n_points, n_dims + 1, bits.shape[0]), dtype=table.dtype)
    weights[:, 0] = prefix[-1] * factors[-1]
    for d in range(n_dims):
        weights[:, d + 1] = prefix[d] * suffix[d] * (2.0 * bits[:, d] - 1.0)
    combined = np.matmul(weights, cell)  # [P, 1 + D, R]
    return combined[:, 0], np.moveaxis(combined[:, 1:], 1, 2)


@dataclass(frozen=True)
class GridFit:
    """Result of :func:`refine_on_grid`: grid coordinates ``[P, D]``, the model's coefficients
    there ``[P, R]``, the penalised cost ``[P]`` and the iterations each pixel used ``[P]``."""

    position: np.ndarray
    value: np.ndarray
    cost: np.ndarray
    iterations: np.ndarray


def refine_on_grid(
    coefficients: np.ndarray, table: np.ndarray, starts: np.ndarray, iterations: int,
    prior_centre: np.ndarray, prior_precision: np.ndarray, variance: np.ndarray,
    tolerance_cells: float = 0.0, *, keep: np.ndarray | None = None, first_iterations: int = 3,
    compiled: bool | None = None,
) -> GridFit:
    """Levenberg-Marquardt on continuous grid coordinates of a multilinearly interpolated table.

    Minimises ``|y - table(p)|^2 + variance * sum_d precision_d (p_d - centre_d)^2`` per pixel,
    ``y`` = ``coefficients`` ``[P, R]``, ``p`` in grid coordinates ``[P, D]`` bounded by the
    grid; ``prior_centre`` is ``[D]`` or ``[P, D]`` (cells), ``prior_precision`` ``[D]``
    (1 / cells^2), ``variance`` ``[P]``. Coordinates on a bound whose descent direction points
    outwards are held fixed for that step so that the others can still move. Steps are
    limited to 2 cells per axis; the damping starts at 1e-2, is divided by 3 after an
    accepted step and multiplied by 4 after a rejected one.

    ``starts`` is ``[P, D]`` (one start: ``iterations`` iterations) or ``[P, S, D]``: then
    every start (where ``keep`` ``[P, S]`` is true) gets ``first_iterations`` iterations and
    the lowest-cost one goes on for ``iterations - first_iterations`` more (damping reset).

    Early stopping: a run stops once an accepted step moves no coordinate by more than
    ``tolerance_cells`` (or its damping has grown past 1e6: no descent left).
    ``tolerance_cells = 0`` runs every iteration.

    ``compiled``: the numba version (pixel by pixel, chunks on a thread pool) or the
    numpy array version (all pixels advance together, the table's dtype); ``None`` picks numba
    when it is installed. The two agree to rounding.
    """
    starts = np.asarray(starts, dtype=np.float64)
    if starts.ndim == 2:
        starts = starts[:, None]
        first, rest = int(iterations), 0
    else:
        first = min(int(first_iterations), int(iterations))
        rest = int(iterations) - first
    n_points, n_starts, n_dims = starts.shape
    keep = np.ones((n_points, n_starts), dtype=bool) if keep is None else np.asarray(keep, dtype=bool)
    if keep.shape != (n_points, n_starts) or not np.all(np.any(keep, axis=1)):
        raise ValueError(f"keep must be [P, S] = {(n_points, n_starts)} with a kept start for every pixel, "
                         f"got shape {keep.shape}")
    centre = np.ascontiguousarray(np.broadcast_to(prior_centre, (n_points, n_dims)), dtype=np.float64)
    precision = np.asarray(prior_precision, dtype=np.float64)
    variance = np.asarray(variance, dtype=np.float64)
    if compiled is None:
        compiled = numba is not None
    if not compiled:
        return _refine_arrays_starts(coefficients, table, starts, keep, first, rest, centre, precision, variance,
                                     float(tolerance_cells))
    if numba is None:
        raise ImportError("refine_on_grid(compiled=True) needs numba, which is not installed")
    grid = np.array(table.shape[:-1], dtype=np.int64)
    position = np.empty((n_points, n_dims))
    value = np.empty((n_points, table.shape[-1]))
    cost = np.empty(n_points)
    used = np.zeros(n_points, dtype=np.int64)
    arrays = (
        np.ascontiguousarray(coefficients, dtype=np.float64),
        np.ascontiguousarray(table.reshape(-1, table.shape[-1]), dtype=np.float32), grid, _strides(grid),
        np.ascontiguousarray(starts), np.ascontiguousarray(keep), first, rest, centre,
        np.ascontiguousarray(precision), np.ascontiguousarray(variance), float(tolerance_cells),
        position, value, cost, used,
    )
    # chunks of pixels on a small thread pool (the kernel releases the GIL): many small chunks
    # balance the load when other processes take one of the cores
    bounds = list(range(0, n_points, COMPILED_CHUNK)) + [n_points]
    chunks = list(zip(bounds[:-1], bounds[1:]))
    if len(chunks) > 1:
        list(thread_pool().map(lambda chunk: _refine_chunk_c(*arrays, *chunk), chunks))
    elif chunks:
        _refine_chunk_c(*arrays, *chunks[0])
    return GridFit(position, value.astype(table.dtype), cost, used)


COMPILED_CHUNK = 512  # pixels per task of the compiled refinement
_EXECUTOR: list[ThreadPoolExecutor] = []
_EXECUTOR_GUARD = threading.Lock()


def thread_pool() -> ThreadPoolExecutor:
    """The refinement's thread pool (as many threads as CPUs, at most 8), created on first use."""
    with _EXECUTOR_GUARD:
        if not _EXECUTOR:
            workers = max(1, min(os.cpu_count() or 1, 8))
            _EXECUTOR.append(ThreadPoolExecutor(max_workers=workers, thread_name_prefix="btex-refine"))
        return _EXECUTOR[0]


def _refine_arrays_starts(
    coefficients: np.ndarray, table: np.ndarray, starts: np.ndarray, keep: np.ndarray, first: int, rest: int,
    centre: np.ndarray, precision: np.ndarray, variance: np.ndarray, tolerance_cells: float,
) -> GridFit:
    """Array version of :func:`refine_on_grid` with several starts per pixel."""
    n_points, n_starts, n_dims = starts.shape
    pixel, which = np.nonzero(keep)
    trial = _refine_arrays(coefficients[pixel], table, starts[pixel, which], first, centre[pixel], precision,
                           variance[pixel], tolerance_cells)
    if n_starts == 1 and pixel.size == n_points:
        return trial
    costs = np.full((n_points, n_starts), np.inf)
    costs[pixel, which] = trial.cost
    positions = np.zeros((n_points, n_starts, n_dims))
    positions[pixel, which] = trial.position
    choice = np.argmin(costs, axis=1)
    used = np.zeros(n_points, dtype=np.int64)
    np.add.at(used, pixel, trial.iterations)
    fit = _refine_arrays(coefficients, table, positions[np.arange(n_points), choice], rest, centre, precision,
                         variance, tolerance_cells)
    return GridFit(fit.position, fit.value, fit.cost, used + fit.iterations)


def _refine_arrays(
    coefficients: np.ndarray, table: np.ndarray, start: np.ndarray, iterations: int,
    prior_centre: np.ndarray, prior_precision: np.ndarray, variance: np.ndarray, tolerance_cells: float,
) -> GridFit:
    """Array (numpy) version of :func:`refine_on_grid`: all active pixels advance together."""
    n_points, n_dims = start.shape
    dtype = table.dtype
    upper = np.array(table.shape[:-1], dtype=np.float64) - 1.0
    position = np.clip(start.astype(np.float64), 0.0, upper)
    centre_all = np.broadcast_to(prior_centre, position.shape)
    weights_all = variance[:, None] * prior_precision[None, :]  # [P, D]
    value_all, jacobian = interpolate_grid(table, position)
    value_all = value_all.copy()
    cost_all = _penalised_cost(value_all, coefficients, position, centre_all, weights_all)
    used = np.zeros(n_points, dtype=np.int64)
    active = np.arange(n_points)
    # the active pixels' state, compressed (pixels that stop are written back and dropped)
    pos, val, jac, cost = position.copy(), value_all.copy(), jacobian, cost_all.copy()
    coef, centre, weights = coefficients.astype(dtype), np.array(centre_all), weights_all
    damping = np.full(n_points, 1e-2)
    eye = np.eye(n_dims)
    for _ in range(iterations):
        if not active.size:
            break
        used[active] += 1
        residual = (val - coef).astype(np.float64)
        jac64 = jac.astype(np.float64)
        normal = np.matmul(jac64.transpose(0, 2, 1), jac64) + weights[:, :, None] * eye
        rhs = -np.matmul(residual[:, None, :], jac64)[:, 0] - weights * (pos - centre)
        frozen = ((pos <= 0.0) & (rhs < 0)) | ((pos >= upper) & (rhs > 0))
        free = (~frozen).astype(np.float64)
        normal = normal * free[:, :, None] * free[:, None, :] + eye * frozen[:, :, None]
        rhs = rhs * free
        diag = np.diagonal(normal, axis1=1, axis2=2)
        system = normal + damping[:, None, None] * (eye * (diag[:, :, None] + 1e-12))
        step = np.linalg.solve(system, rhs[..., None])[..., 0]
        trial = np.clip(pos + np.clip(step, -2.0, 2.0), 0.0, upper)
        trial_value, trial_jacobian = interpolate_grid(table, trial)
        trial_cost = _penalised_cost(trial_value, coef, trial, centre, weights)
        better = trial_cost < cost
        moved = np.max(np.abs(trial - pos), axis=1)
        pos[better] = trial[better]
        val[better] = trial_value[better]
        jac[better] = trial_jacobian[better]
        cost[better] = trial_cost[better]
        damping = np.where(better, damping / 3.0, damping * 4.0)
        if tolerance_cells > 0:
            done = (better & (moved <= tolerance_cells)) | (damping > 1e6)
            if np.any(done):
                finished = active[done]
                position[finished], value_all[finished], cost_all[finished] = pos[done], val[done], cost[done]
                keep = ~done
                active = active[keep]
                pos, val, jac, cost = pos[keep], val[keep], jac[keep], cost[keep]
                coef, centre, weights, damping = coef[keep], centre[keep], weights[keep], damping[keep]
    position[active], value_all[active], cost_all[active] = pos, val, cost
    return GridFit(position, value_all, cost_all, used)


def _penalised_cost(value: np.ndarray, coefficients: np.ndarray, position: np.ndarray, centre: np.ndarray,
                    weights: np.ndarray) -> np.ndarray:
    misfit = np.sum(np.square(value - coefficients, dtype=np.float64), axis=1)
    return misfit + np.sum(weights * (position - centre) ** 2, axis=1)


# --- compiled refinement (numba, optional) -------------------------------------------------
# The same Levenberg-Marquardt as ``refine_on_grid``'s array version, one pixel at a time in
# compiled code: the 2^D corners, value and Jacobian stay in registers/cache instead of
# [P, 2^D, R] temporaries, the Jacobian is computed only where a step is accepted, and a
# pixel that has converged costs nothing more. Sums in float32 like the array version, in a
# different order: the two agree to rounding, not bit for bit (tests/test_mapping.py).
numba = numba_or_none()


def _grid_eval(flat_table, grid, strides, pos, value, jacobian, with_jacobian, scratch):  # pragma: no cover
    """Value ``[R]`` (and, if ``with_jacobian``, Jacobian ``[D, R]``) of the multilinear table
    at ``pos`` (compiled; float32 table and sums, like the array version).

    The 2^D corners of the cell are gathered once per cell (kept in ``scratch`` while the
    pixel stays in it), then contracted one axis at a time (last axis first): each level
    halves the corners by linear interpolation, and the differences of each level, carried
    through the later levels, are the derivatives along that axis.
    """
    frac, cell, work, grads, cached = scratch
    n_dims = pos.size
    n_values = value.size
    base = 0
    for d in range(n_dims):
        lower = min(max(int(np.floor(pos[d])), 0), grid[d] - 2)
        frac[d] = np.float32(min(max(pos[d] - lower, 0.0), 1.0))
        base += lower * strides[d]
    n_corners = 1 << n_dims
    if cached[0] != base:
        for corner in range(n_corners):
            offset = base
            for d in range(n_dims):
                offset += ((corner >> (n_dims - 1 - d)) & 1) * strides[d]
            for r in range(n_values):
                cell[corner, r] = flat_table[offset, r]
        cached[0] = base
    for corner in range(n_corners):
        for r in range(n_values):
            work[corner, r] = cell[corner, r]
    size = n_corners
    for level in range(n_dims):
        d = n_dims - 1 - level  # pairs (2k, 2k + 1) differ along axis d
        f = frac[d]
        half = size // 2
        for k in range(half):
            if with_jacobian:
                for g in range(level):
                    for r in range(n_values):
                        low = grads[g, 2 * k, r]
                        grads[g, k, r] = low + f * (grads[g, 2 * k + 1, r] - low)
                for r in range(n_values):
                    grads[level, k, r] = work[2 * k + 1, r] - work[2 * k, r]
            for r in range(n_values):
                low = work[2 * k, r]
                work[k, r] = low + f * (work[2 * k + 1, r] - low)
        size = half
    for r in range(n_values):
        value[r] = work[0, r]
    if with_jacobian:
        for level in range(n_dims):
            for r in range(n_values):
                jacobian[n_dims - 1 - level, r] = grads[level, 0, r]


def _lm_run(target, flat_table, grid, strides, pos, value, jacobian, centre, weights, iterations, tolerance,
            scratch, trial, trial_value, trial_jacobian, rhs, step, matrix, frozen, cost):  # pragma: no cover
    """Levenberg-Marquardt of one pixel from ``pos`` (value/Jacobian already evaluated there),
    in place; returns (cost, iterations used). Same steps and stopping rule as the array version."""
    n_dims = pos.size
    n_values = value.size
    damping = 1e-2
    used = 0
    for _ in range(iterations):
        used += 1
        for d in range(n_dims):
            total = 0.0
            row = jacobian[d]
            for r in range(n_values):
                total += row[r] * (value[r] - target[r])
            rhs[d] = -total - weights[d] * (pos[d] - centre[d])
            frozen[d] = (pos[d] <= 0.0 and rhs[d] < 0.0) or (pos[d] >= grid[d] - 1.0 and rhs[d] > 0.0)
        for d in range(n_dims):
            for e in range(d, n_dims):
                total = 0.0
                for r in range(n_values):
                    total += jacobian[d, r] * jacobian[e, r]
                if d == e:
                    total += weights[d]
                matrix[d, e] = total
                matrix[e, d] = total
        for d in range(n_dims):
            if frozen[d]:
                for e in range(n_dims):
                    matrix[d, e] = 0.0
                    matrix[e, d] = 0.0
                matrix[d, d] = 1.0
                rhs[d] = 0.0
        for d in range(n_dims):
            matrix[d, d] += damping * (matrix[d, d] + 1e-12)
            step[d] = rhs[d]
        # Gaussian elimination with partial pivoting (the system is D x D)
        for k in range(n_dims):
            pivot = k
            for i in range(k + 1, n_dims):
                if abs(matrix[i, k]) > abs(matrix[pivot, k]):
                    pivot = i
            if pivot != k:
                for j in range(n_dims):
                    matrix[k, j], matrix[pivot, j] = matrix[pivot, j], matrix[k, j]
                step[k], step[pivot] = step[pivot], step[k]
            for i in range(k + 1, n_dims):
                ratio = matrix[i, k] / matrix[k, k]
                for j in range(k, n_dims):
                    matrix[i, j] -= ratio * matrix[k, j]
                step[i] -= ratio * step[k]
        for k in range(n_dims - 1, -1, -1):
            total = step[k]
            for j in range(k + 1, n_dims):
                total -= matrix[k, j] * step[j]
            step[k] = total / matrix[k, k]
        moved = 0.0
        for d in range(n_dims):
            trial[d] = min(max(pos[d] + min(max(step[d], -2.0), 2.0), 0.0), grid[d] - 1.0)
            moved = max(moved, abs(trial[d] - pos[d]))
        _grid_eval_c(flat_table, grid, strides, trial, trial_value, trial_jacobian, False, scratch)
        trial_cost = 0.0
        for r in range(n_values):
            trial_cost += (trial_value[r] - target[r]) ** 2
        for d in range(n_dims):
            trial_cost += weights[d] * (trial[d] - centre[d]) ** 2
        if trial_cost < cost:
            pos[:] = trial
            value[:] = trial_value
            _grid_eval_c(flat_table, grid, strides, pos, trial_value, jacobian, True, scratch)
            cost = trial_cost
            damping /= 3.0
            if tolerance > 0.0 and moved <= tolerance:
                break
        else:
            damping *= 4.0
            if tolerance > 0.0 and damping > 1e6:
                break
    return cost, used


def _refine_chunk(coefficients, flat_table, grid, strides, starts, keep, first, iterations, centre, precision,
                  variance, tolerance, out_position, out_value, out_cost, out_used, begin, end):  # pragma: no cover
    """Pixels ``begin:end``: every kept start for ``first`` iterations, the best one goes on."""
    n_starts, n_dims = starts.shape[1], starts.shape[2]
    n_values = coefficients.shape[1]
    n_corners = 1 << n_dims
    scratch = (np.empty(n_dims, dtype=np.float32), np.empty((n_corners, n_values), dtype=np.float32),
               np.empty((n_corners, n_values), dtype=np.float32),
               np.empty((n_dims, n_corners // 2, n_values), dtype=np.float32), np.full(1, -1, dtype=np.int64))
    pos = np.empty(n_dims)
    value = np.empty(n_values, dtype=flat_table.dtype)
    jacobian = np.empty((n_dims, n_values), dtype=flat_table.dtype)
    best_pos = np.empty(n_dims)
    best_value = np.empty(n_values, dtype=flat_table.dtype)
    best_jacobian = np.empty((n_dims, n_values), dtype=flat_table.dtype)
    trial = np.empty(n_dims)
    trial_value = np.empty(n_values, dtype=flat_table.dtype)
    trial_jacobian = np.empty((n_dims, n_values), dtype=flat_table.dtype)
    weights = np.empty(n_dims)
    rhs = np.empty(n_dims)
    step = np.empty(n_dims)
    matrix = np.empty((n_dims, n_dims))
    frozen = np.empty(n_dims, dtype=np.bool_)
    for p in range(begin, end):
        target = coefficients[p]
        for d in range(n_dims):
            weights[d] = variance[p] * precision[d]
        best_cost = np.inf
        used = 0
        for s in range(n_starts):
            if not keep[p, s]:
                continue
            for d in range(n_dims):
                pos[d] = min(max(starts[p, s, d], 0.0), grid[d] - 1.0)
            _grid_eval_c(flat_table, grid, strides, pos, value, jacobian, True, scratch)
            cost = 0.0
            for r in range(n_values):
                cost += (value[r] - target[r]) ** 2
            for d in range(n_dims):
                cost += weights[d] * (pos[d] - centre[p, d]) ** 2
            cost, spent = _lm_run_c(target, flat_table, grid, strides, pos, value, jacobian, centre[p], weights,
                                  first, tolerance, scratch, trial, trial_value, trial_jacobian, rhs, step,
                                  matrix, frozen, cost)
            used += spent
            if cost < best_cost:
                best_cost = cost
                best_pos[:] = pos
                best_value[:] = value
                best_jacobian[:, :] = jacobian
        best_cost, spent = _lm_run_c(target, flat_table, grid, strides, best_pos, best_value, best_jacobian,
                                   centre[p], weights, iterations, tolerance, scratch, trial, trial_value,
                                   trial_jacobian, rhs, step, matrix, frozen, best_cost)
        out_position[p] = best_pos
        for r in range(n_values):
            out_value[p, r] = best_value[r]
        out_cost[p] = best_cost
        out_used[p] = used + spent


if numba is not None:
    _grid_eval_c = numba.njit(cache=True, nogil=True, fastmath=True)(_grid_eval)
    _lm_run_c = numba.njit(cache=True, nogil=True, fastmath=True)(_lm_run)
    _refine_chunk_c = numba.njit(cache=True, nogil=True)(_refine_chunk)
else:  # pragma: no cover
    _grid_eval_c = _lm_run_c = _refine_chunk_c = None


def warm_compiled_refinement() -> float:
    """Compile (or load from numba's on-disk cache) the compiled refinement; returns seconds.

    The first call of the numba kernels in a process compiles them (tens of seconds on a
    loaded 2-core machine) or loads them from the cache next to this module; a server calls
    this at start-up so that the first scan does not pay for it. No-op without numba.
    """
    if numba is None:
        return 0.0
    started = time.perf_counter()
    table = np.arange(2 * 2 * 2 * 2 * 2 * 3, dtype=np.float32).reshape(2, 2, 2, 2, 2, 3)
    starts = np.full((1, 2, 5), 0.5)
    refine_on_grid(np.ones((1, 3)), table, starts, 2, np.zeros(5), np.zeros(5), np.ones(1), compiled=True)
    return time.perf_counter() - started
