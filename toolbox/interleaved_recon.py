"""TSENSE reconstruction of time-interleaved undersampled dynamic k-space.

The perfusion series is acquired with acceleration R by playing every R-th phase-encode line
and shifting the pattern by one line each frame (frame f acquires lines l with
(l - f) % R == 0), so the time average of R consecutive frames is fully sampled. Coil
sensitivities come from that time average (TSENSE: Kellman et al., MRM 2001;45:846;
REFERENCES.md section 1) and every frame is unfolded by regularised SENSE (Pruessmann et al.,
MRM 1999;42:952). Fully sampled frames are combined with the same sensitivities.

Conventions (docs/simulator.md): k-space ``[..., coils, ky, kx]`` with the centre at index
``n // 2``; image = ``fftshift(ifft2(ifftshift(kspace), norm="ortho"))``; rows = ky (E1),
cols = kx (E0). The combined image is the sensitivity-weighted combination normalised to the
root-sum-of-squares of the sensitivities, i.e. the coil shading of a root-sum-of-squares image
remains (removed downstream by SR / PD).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from perfline.toolbox.fft import centered_fft, centered_ifft

logger = logging.getLogger(__name__)


class ReconError(ValueError):
    """k-space that cannot be reconstructed (missing lines, wrong shape, irregular pattern)."""


def noise_whitening_matrix(noise: np.ndarray) -> np.ndarray:
    """Coil noise pre-whitening matrix W (so that W @ data has identity noise covariance).

    Args:
        noise: complex [coils, samples] noise-only samples.

    Returns:
        complex64 [coils, coils] ``inv(L)`` of the Cholesky factor ``L`` of the noise
        covariance, scaled so that the mean noise variance is unchanged.
    """
    noise = np.asarray(noise)
    if noise.ndim != 2 or noise.shape[1] < noise.shape[0]:
        raise ReconError(f"noise must be [coils, samples] with samples >= coils, found {noise.shape}")
    covariance = noise @ noise.conj().T / noise.shape[1]
    scale = np.real(np.trace(covariance)) / covariance.shape[0]
    if not scale > 0:
        raise ReconError("noise samples have zero variance")
    lower = np.linalg.cholesky(covariance / scale)
    return np.linalg.inv(lower).astype(np.complex64)


def interleave_offsets(sampled: np.ndarray) -> tuple[int, np.ndarray]:
    """Acceleration R and per-frame line offset of an interleaved sampling mask.

    Args:
        sampled: bool [time, ky], True where the line was acquired.

    Returns:
        (R, offsets int [time]) with frame t sampling exactly the lines ``offsets[t] + R * m``.

    Raises:
        ReconError: if a frame is not a regular every-R-th pattern, or the lines sampled over
            all frames do not cover k-space.
    """
    sampled = np.asarray(sampled, dtype=bool)
    if sampled.ndim != 2:
        raise ReconError(f"sampling mask must be [time, ky], found shape {sampled.shape}")
    n_lines = sampled.shape[1]
    counts = sampled.sum(axis=1)
    if np.any(counts == 0):
        raise ReconError(f"frames {np.flatnonzero(counts == 0).tolist()[:10]} have no acquired lines")
    accel = int(round(n_lines / counts.max()))
    if accel < 1 or n_lines % accel:
        raise ReconError(f"{n_lines} phase-encode lines are not a multiple of the acceleration {accel}")
    offsets = np.argmax(sampled, axis=1)
    lines = np.arange(n_lines)
    expected = (lines[None, :] - offsets[:, None]) % accel == 0
    bad = np.flatnonzero(np.any(expected != sampled, axis=1))
    if bad.size:
        frame = int(bad[0])
        raise ReconError(
            f"frame {frame} does not sample every {accel}-th line from line {offsets[frame]}: "
            f"expected {n_lines // accel} lines, found {int(counts[frame])} "
            f"({bad.size} frames irregular)")
    if not sampled.any(axis=0).all():
        missing = np.flatnonzero(~sampled.any(axis=0))
        raise ReconError(
            f"time-averaged k-space is not fully sampled: {missing.size} lines never acquired "
            f"(first: {missing[:5].tolist()}); TSENSE calibration needs every line at least once")
    return accel, offsets


def time_averaged_kspace(kspace: np.ndarray, sampled: np.ndarray) -> np.ndarray:
    """Average of every line over the frames that acquired it.

    Args:
        kspace: complex [time, coils, ky, kx], zeros on lines not acquired.
        sampled: bool [time, ky].

    Returns:
        complex64 [coils, ky, kx] fully sampled calibration k-space.
    """
    counts = np.asarray(sampled, dtype=np.float32).sum(axis=0)
    if np.any(counts == 0):
        raise ReconError(f"{int(np.sum(counts == 0))} phase-encode lines never acquired: cannot calibrate")
    total = np.einsum("tcyx,ty->cyx", kspace, np.asarray(sampled, dtype=np.float32))
    return (total / counts[None, :, None]).astype(np.complex64)


def coil_sensitivities(calibration: np.ndarray, *, low_resolution_fraction: float = 0.25,
                       mask_fraction: float = 0.05) -> np.ndarray:
    """Smooth coil sensitivities from fully sampled calibration k-space.

    The calibration image is low-pass filtered (Gaussian k-space window whose standard
    deviation is ``low_resolution_fraction`` of the matrix), each coil is divided by the
    root-sum-of-squares over coils, and sensitivities are set to zero where the low-resolution
    root-sum-of-squares falls below ``mask_fraction`` of its maximum (background: no signal
    to unfold there, and zero sensitivity lets SENSE put nothing there).

    Args:
        calibration: complex [coils, ky, kx].

    Returns:
        complex64 [coils, ky, kx] with unit root-sum-of-squares inside the mask.
    """
    calibration = np.asarray(calibration)
    if calibration.ndim != 3:
        raise ReconError(f"calibration must be [coils, ky, kx], found shape {calibration.shape}")
    n_ky, n_kx = calibration.shape[1:]
    ky = (np.arange(n_ky) - n_ky // 2) / (low_resolution_fraction * n_ky)
    kx = (np.arange(n_kx) - n_kx // 2) / (low_resolution_fraction * n_kx)
    window = np.exp(-0.5 * (ky[:, None] ** 2 + kx[None, :] ** 2))
    low_res = centered_ifft(centered_ifft(calibration * window, axis=-2), axis=-1)
    rss = np.sqrt(np.sum(np.abs(low_res) ** 2, axis=0))
    mask = rss > mask_fraction * rss.max()
    maps = np.where(mask, low_res / np.maximum(rss, 1e-30), 0)
    return maps.astype(np.complex64)


@dataclass(frozen=True)
class SenseUnfolding:
    """Per-offset unfolding operators of one slice (reused for every frame).

    ``lines`` is int [M, R]: aliased line ``y`` (centred inverse FFT of the M acquired lines)
    superposes the image lines ``lines[y]``. ``matrices[s]`` is complex64 [R, coils, M, kx]:
    image line ``lines[y, j]`` of a frame with offset ``s`` is
    ``sum_c matrices[s][j, c, y] * aliased[c, y]``.
    """

    acceleration: int
    lines: np.ndarray
    matrices: tuple[np.ndarray, ...]


def _fold_pattern(n_lines: int, accel: int, offset: int) -> tuple[np.ndarray, np.ndarray]:
    """Which image lines fold onto each aliased line, and with what complex weight.

    Computed from the centred orthonormal FFT operators themselves, so the fftshift
    bookkeeping cannot go wrong: returns (lines int [M, R], weights complex [M, R]).
    """
    m = n_lines // accel
    full = centered_fft(np.eye(n_lines), axis=0)  # [ky, y]
    reduced = centered_ifft(full[offset::accel], axis=0)  # [M, y]
    lines = np.sort(np.argsort(-np.abs(reduced), axis=1)[:, :accel], axis=1)
    weights = np.take_along_axis(reduced, lines, axis=1)
    leaked = np.abs(reduced).sum(axis=1) - np.abs(weights).sum(axis=1)
    if leaked.max() > 1e-6 * np.abs(weights).sum(axis=1).min():
        raise ReconError(f"{n_lines} lines at R = {accel} do not fold onto {m} lines exactly")
    return lines, weights


def sense_unfolding(sensitivities: np.ndarray, accel: int, *, regularization: float = 1e-3) -> SenseUnfolding:
    """Regularised SENSE unfolding matrices ``(E^H E + lambda I)^-1 E^H`` for every offset.

    Args:
        sensitivities: complex [coils, ky, kx] (unit root-sum-of-squares inside the object).
        accel: acceleration R (ky must be a multiple of R).
        regularization: Tikhonov lambda relative to the mean diagonal of ``E^H E``.
    """
    n_coils, n_lines, n_cols = sensitivities.shape
    if n_lines % accel:
        raise ReconError(f"{n_lines} phase-encode lines are not a multiple of R = {accel}")
    matrices = []
    reference_lines = None
    for offset in range(accel):
        lines, weights = _fold_pattern(n_lines, accel, offset)
        if reference_lines is None:
            reference_lines = lines
        elif not np.array_equal(lines, reference_lines):
            raise ReconError("fold pattern differs between offsets")  # never for centred FFTs
        folded = sensitivities[:, lines, :].transpose(1, 3, 0, 2)  # [M, kx, C, R]
        encoding = folded * weights[:, None, None, :]
        normal = np.matmul(encoding.conj().swapaxes(-1, -2), encoding)  # [M, kx, R, R]
        load = regularization * np.real(np.trace(normal, axis1=-2, axis2=-1)).mean() / accel
        normal = normal + load * np.eye(accel)
        unfold = np.linalg.solve(normal, encoding.conj().transpose(0, 1, 3, 2))  # [M, kx, R, C]
        matrices.append(unfold.transpose(2, 3, 0, 1).astype(np.complex64))  # [R, C, M, kx]
    return SenseUnfolding(accel, reference_lines, tuple(matrices))


def reconstruct_interleaved(kspace: np.ndarray, sampled: np.ndarray, *,
                            sensitivities: np.ndarray | None = None,
                            regularization: float = 1e-3) -> np.ndarray:
    """Reconstruct every frame of an interleaved (or fully sampled) multi-coil series.

    Args:
        kspace: complex [time, coils, ky, kx]; lines not acquired may hold anything (ignored).
        sampled: bool [time, ky], True where a line was acquired.
        sensitivities: complex [coils, ky, kx]; estimated from the time average if None.
        regularization: SENSE Tikhonov lambda (relative).

    Returns:
        float32 [time, ky, kx] magnitude images (sensitivity-weighted coil combination).

    Raises:
        ReconError: on shape mismatch, non-finite data or an irregular sampling pattern.
    """
    kspace = np.asarray(kspace)
    sampled = np.asarray(sampled, dtype=bool)
    if kspace.ndim != 4:
        raise ReconError(f"k-space must be [time, coils, ky, kx], found shape {kspace.shape}")
    n_frames, _, n_lines, _ = kspace.shape
    if sampled.shape != (n_frames, n_lines):
        raise ReconError(f"sampling mask must be [time, ky] = {(n_frames, n_lines)}, found {sampled.shape}")
    accel, offsets = interleave_offsets(sampled)
    compact = np.stack([kspace[t][:, offsets[t]::accel, :] for t in range(n_frames)])
    return reconstruct_compact(compact, offsets, accel, sensitivities=sensitivities,
                               regularization=regularization)


def compact_time_average(compact: np.ndarray, offsets: np.ndarray, accel: int) -> np.ndarray:
    """Fully sampled calibration k-space [coils, ky, kx] from compact interleaved data.

    ``compact[t, :, m]`` is line ``offsets[t] + accel * m`` of frame t; every line is averaged
    over the frames that acquired it.
    """
    n_frames, n_coils, n_reduced, n_cols = compact.shape
    calibration = np.zeros((n_coils, n_reduced * accel, n_cols), dtype=np.complex64)
    for offset in range(accel):
        frames = np.flatnonzero(offsets == offset)
        if frames.size == 0:
            raise ReconError(f"no frame samples the lines {offset} + {accel} m: the time average is not "
                             f"fully sampled (interleaving needs frames of every offset 0..{accel - 1})")
        calibration[:, offset::accel, :] = compact[frames].mean(axis=0)
    return calibration


def reconstruct_compact(compact: np.ndarray, offsets: np.ndarray, accel: int, *,
                        sensitivities: np.ndarray | None = None, whitening: np.ndarray | None = None,
                        regularization: float = 1e-3) -> np.ndarray:
    """TSENSE recon from the acquired lines only (no zero-filled copy of k-space).

    Args:
        compact: complex [time, coils, M, kx]: ``compact[t, :, m]`` is phase-encode line
            ``offsets[t] + accel * m`` of frame t (ky = accel * M lines in all).
        offsets: int [time] in [0, accel).
        accel: acceleration R (1 = fully sampled).
        sensitivities: complex [coils, ky, kx] of the (whitened) coils; from the time
            average if None.
        whitening: optional complex [coils, coils] noise pre-whitening matrix W. It is folded
            into the unfolding matrices (``U W``) instead of being applied to every sample:
            the same result as whitening the data, for the cost of one matrix product per slice.
        regularization: SENSE Tikhonov lambda (relative).

    Returns:
        float32 [time, ky, kx] magnitude images.
    """
    compact = np.asarray(compact)
    offsets = np.asarray(offsets, dtype=int)
    if compact.ndim != 4:
        raise ReconError(f"compact k-space must be [time, coils, M, kx], found shape {compact.shape}")
    n_frames, n_coils, n_reduced, n_cols = compact.shape
    if offsets.shape != (n_frames,) or np.any((offsets < 0) | (offsets >= accel)):
        raise ReconError(f"offsets must be [time] = ({n_frames},) in [0, {accel}), found {offsets}")
    if not np.all(np.isfinite(compact.view(np.float32) if compact.dtype == np.complex64 else compact)):
        raise ReconError("k-space contains non-finite values")
    n_lines = n_reduced * accel
    if whitening is not None and np.shape(whitening) != (n_coils, n_coils):
        raise ReconError(f"whitening matrix must be {(n_coils, n_coils)}, found {np.shape(whitening)}")
    if sensitivities is None:
        calibration = compact_time_average(compact, offsets, accel)
        if whitening is not None:
            calibration = np.einsum("dc,cyx->dyx", whitening, calibration)
        sensitivities = coil_sensitivities(calibration)
    if sensitivities.shape != (n_coils, n_lines, n_cols):
        raise ReconError(f"sensitivities must be {(n_coils, n_lines, n_cols)}, found {sensitivities.shape}")
    out = np.empty((n_frames, n_lines, n_cols), dtype=np.float32)
    if accel == 1:
        weights = sensitivities.conj()
        if whitening is not None:
            weights = np.einsum("dyx,dc->cyx", weights, whitening)
        for start in range(0, n_frames, 8):  # chunks keep the complex coil images small
            images = centered_ifft(centered_ifft(compact[start:start + 8], axis=-2), axis=-1)
            out[start:start + 8] = np.abs(np.einsum("tcyx,cyx->tyx", images, weights))
        return out
    unfolding = sense_unfolding(sensitivities, accel, regularization=regularization)
    if whitening is not None:
        unfolding = SenseUnfolding(accel, unfolding.lines, tuple(
            np.ascontiguousarray(np.moveaxis(np.tensordot(matrix, whitening, axes=([1], [0])), -1, 1),
                                 dtype=np.complex64)
            for matrix in unfolding.matrices))
    for offset in range(accel):
        frames = np.flatnonzero(offsets == offset)
        if frames.size == 0:
            continue
        aliased = centered_ifft(centered_ifft(compact[frames], axis=-1), axis=-2).astype(np.complex64)
        matrix = unfolding.matrices[offset]
        unfolded = np.zeros((frames.size, accel, n_reduced, n_cols), dtype=np.complex64)
        for coil in range(n_coils):  # coil loop of broadcast products: faster than einsum here
            unfolded += matrix[None, :, coil] * aliased[:, None, coil]
        image = np.empty((frames.size, n_lines, n_cols), dtype=np.float32)
        image[:, unfolding.lines.T, :] = np.abs(unfolded)
        out[frames] = image
    logger.debug("TSENSE R=%d: %d frames, %d coils, %dx%d", accel, n_frames, n_coils, n_lines, n_cols)
    return out
