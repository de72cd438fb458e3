"""Compiled inner loops of the SENSE unfolding (``toolbox.interleaved_recon``).

Two per-pixel loops that numpy runs as batches of tiny problems (a 3 x 3 solve per aliased pixel,
a coil sum per frame), where the per-problem overhead and the temporaries cost more than the
arithmetic:

- :func:`unfolding_matrices`: for every aliased pixel (line y, column x) the regularised
  least-squares unfolding ``U = (E^H E + lambda I)^-1 E^H`` of its encoding ``E`` [coils, R]
  (``E[c, j] = s_c(lines[y, j], x) * fold[y, j]``), by a Cholesky factorisation of the R x R
  normal matrix, in complex128 (Pruessmann et al., MRM 1999;42:952 for SENSE; the Tikhonov load
  as ``interleaved_recon.sense_unfolding`` defines it);
- :func:`apply_unfolding`: every frame's image lines ``image[lines[y, j], x] = sum_c
  U[j, c, y, x] aliased[c, y, x]``.

numba is an optional dependency: without it (or with ``NUMBA_DISABLE_JIT=1``) the callers use
their numpy versions, which the tests compare these against.
"""

from __future__ import annotations

import numpy as np

from perfline.toolbox.jit import numba_or_none

numba = numba_or_none()

AVAILABLE = numba is not None


def _unfolding_matrices(sensitivities, lines, fold, load, out):  # pragma: no cover - compiled
    n_coils, _, n_cols = sensitivities.shape
    n_reduced, accel = lines.shape
    encoding = np.empty((n_coils, accel), dtype=np.complex128)
    normal = np.empty((accel, accel), dtype=np.complex128)
    factor = np.empty((accel, accel), dtype=np.complex128)
    column = np.empty(accel, dtype=np.complex128)
    for y in range(n_reduced):
        for x in range(n_cols):
            for c in range(n_coils):
                for j in range(accel):
                    encoding[c, j] = np.complex128(sensitivities[c, lines[y, j], x]) * fold[y, j]
            for i in range(accel):
                for j in range(accel):
                    total = 0j
                    for c in range(n_coils):
                        total += encoding[c, i].conjugate() * encoding[c, j]
                    normal[i, j] = total
                normal[i, i] += load
            # Cholesky N = L L^H (N is Hermitian positive definite: load > 0)
            for i in range(accel):
                for j in range(i + 1):
                    total = normal[i, j]
                    for k in range(j):
                        total -= factor[i, k] * factor[j, k].conjugate()
                    if i == j:
                        factor[i, i] = np.sqrt(total.real)
                    else:
                        factor[i, j] = total / factor[j, j].real
            # each column c of E^H: forward then backward substitution
            for c in range(n_coils):
                for i in range(accel):
                    total = encoding[c, i].conjugate()
                    for k in range(i):
                        total -= factor[i, k] * column[k]
                    column[i] = total / factor[i, i].real
                for i in range(accel - 1, -1, -1):
                    total = column[i]
                    for k in range(i + 1, accel):
                        total -= factor[k, i].conjugate() * column[k]
                    column[i] = total / factor[i, i].real
                for j in range(accel):
                    out[j, c, y, x] = column[j]
    return out


def _apply_unfolding(matrix, aliased, lines, frames, images):  # pragma: no cover - compiled
    n_accel, n_coils, n_reduced, n_cols = matrix.shape
    for index in range(frames.size):
        f = frames[index]
        for y in range(n_reduced):
            for j in range(n_accel):
                line = lines[y, j]
                for x in range(n_cols):
                    images[f, line, x] = 0
                for c in range(n_coils):  # contiguous along x
                    for x in range(n_cols):
                        images[f, line, x] += matrix[j, c, y, x] * aliased[index, c, y, x]
    return images


if numba is not None:
    _unfolding_matrices_c = numba.njit(cache=True, nogil=True)(_unfolding_matrices)
    _apply_unfolding_c = numba.njit(cache=True, nogil=True)(_apply_unfolding)


def unfolding_matrices(sensitivities: np.ndarray, lines: np.ndarray, fold: np.ndarray, load: float) -> np.ndarray:
    """complex64 [R, coils, M, kx] unfolding matrices of one offset (see the module doc).

    Args:
        sensitivities: complex [coils, ky, kx].
        lines: int [M, R] image lines folding onto each aliased line.
        fold: complex [M, R] their weights in the fold.
        load: the Tikhonov load lambda (> 0), in the units of ``E^H E``.
    """
    if numba is None:
        raise ImportError("unfolding_matrices needs numba, which is not installed or is disabled")
    n_coils, _, n_cols = sensitivities.shape
    n_reduced, accel = lines.shape
    out = np.empty((accel, n_coils, n_reduced, n_cols), dtype=np.complex64)
    return _unfolding_matrices_c(np.ascontiguousarray(sensitivities, dtype=np.complex64),
                                 np.ascontiguousarray(lines, dtype=np.int64),
                                 np.ascontiguousarray(fold, dtype=np.complex128), float(load), out)


def apply_unfolding(matrix: np.ndarray, aliased: np.ndarray, lines: np.ndarray, frames: np.ndarray,
                    images: np.ndarray) -> np.ndarray:
    """Write the unfolded lines of ``aliased`` [F, coils, M, kx] into ``images[frames]`` ([time, ky, kx],
    complex64, modified in place and returned) with ``matrix`` [R, coils, M, kx]."""
    if numba is None:
        raise ImportError("apply_unfolding needs numba, which is not installed or is disabled")
    return _apply_unfolding_c(np.ascontiguousarray(matrix, dtype=np.complex64),
                              np.ascontiguousarray(aliased, dtype=np.complex64),
                              np.ascontiguousarray(lines, dtype=np.int64),
                              np.ascontiguousarray(frames, dtype=np.int64), images)


def warm_compiled_unfolding() -> None:
    """Compile (or load from numba's disk cache) both loops on a tiny problem."""
    if numba is None:
        return
    sensitivities = np.ones((2, 4, 2), dtype=np.complex64)
    lines = np.array([[0, 2], [1, 3]])
    matrix = unfolding_matrices(sensitivities, lines, np.ones((2, 2), dtype=np.complex128), 1.0)
    apply_unfolding(matrix, np.ones((1, 2, 2, 2), dtype=np.complex64), lines, np.array([0]),
                    np.zeros((1, 4, 2), dtype=np.complex64))
