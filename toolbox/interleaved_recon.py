"""TSENSE reconstruction of time-interleaved undersampled dynamic k-space.

The perfusion series is acquired with acceleration R by playing every R-th phase-encode line
and shifting the pattern by one line each frame (frame f acquires lines l with
(l - f) % R == 0), so the time average of R consecutive frames is fully sampled. Coil
sensitivities come from that time average (TSENSE: Kellman et al., MRM 2001;45:846;
REFERENCES.md section 1) and every frame is unfolded by regularised SENSE (Pruessmann et al.,
MRM 1999;42:952). Fully sampled frames are combined with the same sensitivities. Before
unfolding, the samples may be pre-whitened and PCA-compressed to fewer virtual coils
(:func:`calibrate`); after it, :func:`local_low_rank_filter` removes the g-factor-amplified
noise with a threshold set by the known noise level of every pixel.

Conventions (docs/simulator.md): k-space ``[..., coils, ky, kx]`` with the centre at index
``n // 2``; image = ``fftshift(ifft2(ifftshift(kspace), norm="ortho"))``; rows = ky (E1),
cols = kx (E0). The combined image is the sensitivity-weighted combination normalised to the
root-sum-of-squares of the (unwhitened, physical) coils, i.e. the coil shading of a
root-sum-of-squares image remains (removed downstream by SR / PD).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from perfline.toolbox import sense_kernels
from perfline.toolbox.fft import centered_fft, centered_ifft, centered_ifft2

logger = logging.getLogger(__name__)


_blas_lock = threading.Lock()
_blas_users = 0
_blas_limiter = None
_blas_controller = None  # threadpoolctl's view of the loaded BLAS libraries


@contextmanager
def single_threaded_blas() -> Iterator[None]:
    """Run the enclosed numpy work with one BLAS thread (process-wide, reference-counted).

    The recon and motion-correction kernels are many small matrix products and eigen
    decompositions (63 x 63 per patch). With OpenBLAS's default of one thread per core, on
    this 2-core machine shared by other jobs, its worker threads spin while waiting for a core:
    measured at load 8-10, the low-rank filter's batched ``eigh`` took 4.5 s of CPU instead of
    0.14 s single-threaded, and the whole preprocessing 21 s of CPU instead of about 4.
    Gadgets run in their own threads, so the limit is shared and restored only when the last
    user leaves. Without ``threadpoolctl`` installed this is a no-op.
    """
    global _blas_users, _blas_limiter, _blas_controller
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # optional: only speed depends on it
        yield
        return
    with _blas_lock:
        if _blas_users == 0:
            if _blas_controller is None:  # finding the loaded libraries costs 5-15 ms: once per process
                _blas_controller = ThreadpoolController()
            _blas_limiter = _blas_controller.limit(limits=1, user_api="blas")
        _blas_users += 1
    try:
        yield
    finally:
        with _blas_lock:
            _blas_users -= 1
            if _blas_users == 0 and _blas_limiter is not None:
                _blas_limiter.restore_original_limits()
                _blas_limiter = None


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
                       mask_fraction: float = 0.05, fit_order: tuple[int, int] | None = None,
                       also_fit: tuple[np.ndarray, ...] = ()) -> np.ndarray:
    """Smooth coil sensitivities from fully sampled calibration k-space.

    The calibration image is low-pass filtered (Gaussian k-space window whose standard
    deviation is ``low_resolution_fraction`` of the matrix), each coil is divided by the
    root-sum-of-squares over coils, and sensitivities are set to zero where the low-resolution
    root-sum-of-squares falls below ``mask_fraction`` of its maximum (background: no signal
    to unfold there, and zero sensitivity lets SENSE put nothing there).

    The mask is only right where the masked pixels hold no signal in any frame. Its threshold is
    relative to the brightest pixel of the calibration (the time average), so tissue that is dark
    in that average but not empty (lungs, tissue far from the coils: on one simulated slice 24 % of
    the field of view under 5 % of the maximum, at 9 % of the myocardium's SR signal) is
    taken for background, and SENSE folds its signal onto the pixels that share an aliased line:
    noise-free and motionless, the myocardium's SR frames then alternated +10 / 0 / -7 % with the
    interleave offset at baseline and -24 / +38 % at the first pass; with ``mask_fraction = 0`` about
    +-1.5 % (docs/preprocessing.md, "TSENSE sensitivity mask"). Without a mask the air's maps
    (whatever the window spreads there, or noise, normalised) are unknowns of the unfolding too: more noise.

    With ``fit_order`` the maps inside the mask are instead :func:`fitted_sensitivities`: band-limited
    maps fitted to the full-resolution calibration (the ratio maps only combine the coils for the fit),
    jointly with the calibrations ``also_fit`` (e.g. the PD frames'); the mask stays ``calibration``'s.

    Args:
        calibration: complex [coils, ky, kx].
        low_resolution_fraction: k-space window SD, fraction of the matrix.
        mask_fraction: background threshold, fraction of the largest low-resolution
            root-sum-of-squares (0: no mask).
        fit_order: (rows, cols) highest spatial frequency of the fitted maps, in cycles per field of
            view (None: the ratio maps).
        also_fit: more calibration k-spaces [coils, ky, kx] of the same coils fitted jointly (with
            ``fit_order`` only).

    Returns:
        complex64 [coils, ky, kx] with unit root-sum-of-squares inside the mask.
    """
    calibration = np.asarray(calibration)
    if calibration.ndim != 3:
        raise ReconError(f"calibration must be [coils, ky, kx], found shape {calibration.shape}")
    low_res = _low_resolution_images(calibration, low_resolution_fraction)
    rss = np.sqrt(np.sum(np.abs(low_res) ** 2, axis=0))
    mask = rss > mask_fraction * rss.max()
    maps = low_res / np.maximum(rss, 1e-30)
    if fit_order is not None:
        others = [np.asarray(extra) for extra in also_fit]
        initial = [maps] + [coil_sensitivities(extra, low_resolution_fraction=low_resolution_fraction,
                                               mask_fraction=0.0) for extra in others]
        maps = fitted_sensitivities([calibration] + others, fit_order, initial=initial)
    elif also_fit:
        raise ReconError("more calibrations to fit need a fit order (band-limited maps)")
    return np.where(mask, maps, 0).astype(np.complex64)


def fitted_sensitivities(calibrations: np.ndarray | list[np.ndarray], order: tuple[int, int], *,
                         initial: np.ndarray | list[np.ndarray], robust_iterations: int = 4,
                         robust_scale: float = 1.0, ridge: float = 1e-6) -> np.ndarray:
    """Band-limited coil maps fitted to full-resolution calibration images, robust to their inconsistency.

    Each coil's calibration image ``d_c`` is modelled as ``s_c * m``: ``m`` the coil-combined
    calibration image (``sum_c conj(initial_c) d_c``), ``s_c`` a 2D Fourier series with frequencies
    up to ``order`` cycles per field of view; the coefficients minimise the weighted squares
    ``sum_x w(x) |d_c - s_c m|^2`` (image-domain least squares, as the polynomial maps of JSENSE:
    Ying and Sheng, MRM 2007;57:1196), summed over the calibrations given (each scaled to unit RMS
    combined image, so that each counts alike). Under breathing the interleaved time average is not
    one image: each offset's lines hold a different mean position of the moving body edges and a
    different sample of the bolus, and that inconsistency aliases by FOV/R into the calibration
    image as sharp structure that the ratio of low-pass images carries into the maps. A band-limited
    map cannot follow it, and iteratively reweighted least squares (Cauchy weights
    ``1 / (1 + (r / (robust_scale * sigma))^2)`` on each pixel's residual norm ``r`` over the coils,
    ``sigma`` 1.4826 x its median over the object, per calibration) then takes the pixels it cannot
    explain out of the fit. Where two calibrations are inconsistent in different places (the time
    average where the bolus and the breathing differ between offsets, the PD frames only where the
    body moved during those few seconds) the joint fit keeps what each explains. Simulator,
    noise-free breathing stress slices (docs/preprocessing.md "Fitted coil maps (session 20)"):
    heart 90th-percentile map error 1.2-3.2 % with the ratio maps, 0.3-0.7 % fitted to the time
    average; SD of the myocardium's mean over the SR frames 0.4-1.8 % -> 0.2-0.9 % fitted jointly to
    the time average and the PD frames (2 % mask; the TRUE maps 0.1-0.4 %), but with the study's noise
    the three PD frames' calibration makes the joint maps noisier than the time average's alone.

    The normal equations need only the weighted object power at integer frequencies (its DFT at
    frequency differences up to twice the order): a [modes, modes] Toeplitz-block system.

    Args:
        calibrations: complex [coils, ky, kx] fully sampled calibration k-space, or a list of them
            (same coils and matrix).
        order: (rows, cols) highest frequency, cycles per field of view, each >= 1.
        initial: complex [coils, ky, kx] maps that combine the coils of each calibration into its
            ``m`` (a list when ``calibrations`` is).
        robust_iterations: reweighted refits after the first (0: plain least squares).
        robust_scale: Cauchy scale in robust residual SDs.
        ridge: Tikhonov load relative to the mean diagonal of the normal matrix.

    Returns:
        complex128 [coils, ky, kx], unit root-sum-of-squares.
    """
    if isinstance(calibrations, np.ndarray) and calibrations.ndim == 3:
        calibrations, initial = [calibrations], [np.asarray(initial)]
    if len(calibrations) != len(initial) or not calibrations:
        raise ReconError(f"{len(calibrations)} calibrations and {len(initial)} initial maps: need one each")
    order_rows, order_cols = (int(v) for v in order)
    if order_rows < 1 or order_cols < 1:
        raise ReconError(f"coil map fit order must be >= 1 cycle per field of view, found {order}")
    n_coils, n_rows, n_cols = np.shape(calibrations[0])
    if any(np.shape(c) != (n_coils, n_rows, n_cols) for c in list(calibrations) + list(initial)):
        raise ReconError(f"calibrations and initial maps must all be {(n_coils, n_rows, n_cols)}, found "
                         f"{[np.shape(c) for c in calibrations]} and {[np.shape(m) for m in initial]}")
    if 2 * order_rows >= n_rows or 2 * order_cols >= n_cols:
        raise ReconError(f"coil map fit order {order} too high for a {n_rows} x {n_cols} matrix")
    coil_images, combined = [], []
    for calibration, maps in zip(calibrations, initial):
        images = centered_ifft2(np.asarray(calibration, dtype=np.complex128))
        image = np.sum(np.conj(maps) * images, axis=0)
        norm = np.sqrt(np.mean(np.abs(image) ** 2))
        if not norm > 0:
            raise ReconError("a calibration image without signal cannot be fitted")
        coil_images.append(images / norm)
        combined.append(image / norm)
    on_object = [np.abs(image) > 0.05 * np.abs(image).max() for image in combined]
    rows = (np.arange(n_rows) - n_rows // 2) / n_rows
    cols = (np.arange(n_cols) - n_cols // 2) / n_cols

    def exponentials(limit: int, where: np.ndarray) -> np.ndarray:
        return np.exp(2j * np.pi * np.arange(-limit, limit + 1)[:, None] * where[None])

    mode_rows, mode_cols = np.meshgrid(np.arange(-order_rows, order_rows + 1), np.arange(-order_cols, order_cols + 1),
                                       indexing="ij")
    mode_rows, mode_cols = mode_rows.ravel(), mode_cols.ravel()
    analysis_rows, analysis_cols = exponentials(order_rows, rows).conj(), exponentials(order_cols, cols).conj()
    power_rows, power_cols = exponentials(2 * order_rows, rows), exponentials(2 * order_cols, cols)
    weights = [np.ones((n_rows, n_cols)) for _ in combined]
    for iteration in range(int(robust_iterations) + 1):
        normal = np.zeros((mode_rows.size, mode_rows.size), dtype=np.complex128)
        rhs = np.zeros((mode_rows.size, n_coils), dtype=np.complex128)
        for images, image, weight in zip(coil_images, combined, weights):
            # weighted object power at every frequency difference: P(q) = sum_x w |m|^2 exp(2 pi i q . x)
            power = power_rows @ (weight * np.abs(image) ** 2) @ power_cols.T
            normal += power[mode_rows[None, :] - mode_rows[:, None] + 2 * order_rows,
                            mode_cols[None, :] - mode_cols[:, None] + 2 * order_cols]
            weighted = (weight * np.conj(image))[None] * images
            rhs += np.stack([(analysis_rows @ weighted[c] @ analysis_cols.T).ravel() for c in range(n_coils)],
                            axis=1)
        normal += ridge * np.real(np.trace(normal)) / normal.shape[0] * np.eye(normal.shape[0])
        coefficients = np.linalg.solve(normal, rhs).T.reshape(n_coils, 2 * order_rows + 1, 2 * order_cols + 1)
        maps = np.stack([analysis_rows.conj().T @ coefficients[c] @ analysis_cols.conj() for c in range(n_coils)])
        maps /= np.maximum(np.sqrt(np.sum(np.abs(maps) ** 2, axis=0)), 1e-30)
        if iteration == robust_iterations:
            break
        for index, (images, image, inside) in enumerate(zip(coil_images, combined, on_object)):
            residual = np.sqrt(np.sum(np.abs(images - maps * image[None]) ** 2, axis=0))
            sigma = 1.4826 * np.median(residual[inside])
            weights[index] = 1.0 / (1.0 + (residual / (robust_scale * max(sigma, 1e-12))) ** 2)
    return maps


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


def sense_unfolding(sensitivities: np.ndarray, accel: int, *, regularization: float = 1e-3,
                    compiled: bool | None = None) -> SenseUnfolding:
    """Regularised SENSE unfolding matrices ``(E^H E + lambda I)^-1 E^H`` for every offset.

    Args:
        sensitivities: complex [coils, ky, kx] (unit root-sum-of-squares inside the object).
        accel: acceleration R (ky must be a multiple of R).
        regularization: Tikhonov lambda relative to the mean diagonal of ``E^H E``.
        compiled: True the per-pixel loop of ``toolbox.sense_kernels`` (complex128 Cholesky), False
            numpy's batched solve (complex64); None picks the compiled loop when numba is there.
    """
    n_coils, n_lines, n_cols = sensitivities.shape
    if n_lines % accel:
        raise ReconError(f"{n_lines} phase-encode lines are not a multiple of R = {accel}")
    compiled = sense_kernels.AVAILABLE if compiled is None else compiled
    power = np.sum(np.abs(sensitivities) ** 2, axis=0)  # [ky, kx]
    matrices = []
    reference_lines = None
    for offset in range(accel):
        lines, weights = _fold_pattern(n_lines, accel, offset)
        if reference_lines is None:
            reference_lines = lines
        elif not np.array_equal(lines, reference_lines):
            raise ReconError("fold pattern differs between offsets")  # never for centred FFTs
        if compiled:
            # trace of E^H E at every aliased pixel: sum over the folded lines of |weight|^2 sum_c |s_c|^2
            trace = np.einsum("yj,yjx->yx", np.abs(weights) ** 2, power[lines, :])
            load = regularization * float(trace.mean()) / accel
            matrices.append(sense_kernels.unfolding_matrices(sensitivities, lines, weights, load))
            continue
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


def _low_resolution_images(calibration: np.ndarray, fraction: float) -> np.ndarray:
    """Coil images of calibration k-space [coils, ky, kx] under a Gaussian k-space window
    whose standard deviation is ``fraction`` of the matrix (complex, same shape)."""
    n_ky, n_kx = calibration.shape[1:]
    ky = (np.arange(n_ky) - n_ky // 2) / (fraction * n_ky)
    kx = (np.arange(n_kx) - n_kx // 2) / (fraction * n_kx)
    window = np.exp(-0.5 * (ky[:, None] ** 2 + kx[None, :] ** 2))
    return centered_ifft2(calibration * window)


def coil_compression_matrix(calibration: np.ndarray, n_virtual: int) -> np.ndarray:
    """Principal-component coil compression (Buehrer et al., MRM 2007;57:1131; Huang et al.,
    MRI 2008;26:133): the ``n_virtual`` leading left singular vectors of the calibration
    k-space arranged as [coils, samples].

    Args:
        calibration: complex [coils, ky, kx] (already whitened if the data will be).
        n_virtual: number of virtual coils (1 <= n_virtual <= coils).

    Returns:
        complex64 [n_virtual, coils] with orthonormal rows, so white noise stays white with
        the same variance; ``virtual = A @ physical`` per k-space sample.
    """
    n_coils = calibration.shape[0]
    if not 1 <= n_virtual <= n_coils:
        raise ReconError(f"virtual coils must be in 1..{n_coils}, found {n_virtual}")
    samples = calibration.reshape(n_coils, -1).astype(np.complex128)
    covariance = samples @ samples.conj().T
    _, vectors = np.linalg.eigh(covariance)  # ascending eigenvalues
    return vectors[:, ::-1][:, :n_virtual].conj().T.astype(np.complex64)


@dataclass(frozen=True)
class TsenseCalibration:
    """What TSENSE needs besides the frames (shared by every frame, and by both AIF echoes).

    Attributes:
        coil_transform: complex64 [virtual, coils] applied to every k-space sample first
            (noise whitening then coil compression), or None for the physical coils as they are.
        sensitivities: complex64 [virtual, ky, kx], unit root-sum-of-squares inside the object.
        scale: float32 [ky, kx] that brings the combined image back to the root-sum-of-squares
            shading of the unwhitened physical coils (1 when there is no transform); without it
            whitening or compression would change the image scale by a smooth factor (about 6 %
            on the simulator with an estimated whitening matrix).
    """

    coil_transform: np.ndarray | None
    sensitivities: np.ndarray
    scale: np.ndarray


def calibration_kspace(compact: np.ndarray, offsets: np.ndarray, accel: int, *, n_pd_frames: int = 0,
                       pd_frames_only: bool = False) -> np.ndarray:
    """Fully sampled calibration k-space [coils, ky, kx]: the time average of the frames.

    The plain time average (``n_pd_frames = 0``, :func:`compact_time_average`) mixes the
    proton-density (PD) frames of a perfusion series, some 20-40 times brighter than the
    saturation-recovery (SR) frames, into the lines of each offset in unequal numbers whenever
    the PD count is not a multiple of R (3 PD frames at R = 2: two on the even lines, one on the
    odd). The lines then do not belong to one image: the calibration image holds a residual alias
    of the PD image, the sensitivities carry it, and the unfolded frames alternate with their
    offset (simulator, noise-free and motionless: PD frames of the AIF pool 0.044 / 0.055 / 0.044,
    the AIF's SR/PD first-pass area 0.5 to 3.7 % high).

    With ``n_pd_frames > 0`` the surplus PD frames are left out, so that every offset averages
    the same number of PD frames: on each offset its first ``k`` PD frames are kept, ``k`` the
    fewest PD frames any offset has (none if an offset has none). Where every offset has as many
    PD frames already (a PD count that is a multiple of R, cycled) nothing changes. Measured
    (simulator, AIF at R = 2, 3 PD frames): noise-free SR/PD area within 0.8 % of the phantom
    (what remains: the bolus sampled unequally by the two offsets); the chain's AIF area over
    24 noisy dev scans 1.029 -> 0.996 of the truth, mean abs error 5.7 -> 4.4 % (docs/
    preprocessing.md, "TSENSE calibration with an unequal PD count"). Calibrating from the PD
    frames alone is exact noise-free but read the noisy AIF area 4 % low.

    With ``pd_frames_only`` the calibration is the PD frames' time average alone (the first ``k`` PD
    frames of every offset): no contrast changes between the offsets' lines, and a few seconds of
    breathing at most instead of the whole scan's; fitted jointly with the time average by
    :func:`fitted_sensitivities` (:func:`calibrate` ``fit_pd_frames``; docs/preprocessing.md "Fitted coil
    maps (session 20)").

    Args:
        compact: complex [time, coils, M, kx]; offsets int [time]; accel R.
        n_pd_frames: number of leading PD frames (0: the time average of every frame).
        pd_frames_only: calibrate from the PD frames alone (needs PD frames on every offset).

    Raises:
        ReconError: with ``pd_frames_only``, when some offset has no PD frame.
    """
    n_pd = int(n_pd_frames)
    if pd_frames_only and n_pd <= 0:
        raise ReconError("a calibration from the PD frames needs PD frames (n_pd_frames = 0)")
    if n_pd <= 0:
        return compact_time_average(compact, offsets, accel)
    if n_pd >= compact.shape[0]:
        raise ReconError(f"{n_pd} PD frames of {compact.shape[0]}: no saturation-recovery frame left")
    pd_offsets = np.asarray(offsets[:n_pd])
    per_offset = [np.flatnonzero(pd_offsets == offset) for offset in range(accel)]
    kept = min(frames.size for frames in per_offset)
    pd_kept = np.concatenate([frames[:kept] for frames in per_offset])  # the first k PD frames of every offset
    if pd_frames_only:
        if kept == 0:
            missing = [offset for offset, frames in enumerate(per_offset) if frames.size == 0]
            raise ReconError(f"the {n_pd} PD frames sample the offsets {sorted(set(pd_offsets.tolist()))} of R = "
                             f"{accel}, none samples {missing}: they are not a fully sampled calibration")
        keep = np.sort(pd_kept)
        return compact_time_average(compact[keep], offsets[keep], accel)
    if all(frames.size == kept for frames in per_offset):
        return compact_time_average(compact, offsets, accel)
    keep = np.sort(np.concatenate([pd_kept, np.arange(n_pd, compact.shape[0])]))
    logger.debug("calibration: %d of %d PD frames kept (R = %d) with the %d SR frames", kept * accel, n_pd, accel,
                 compact.shape[0] - n_pd)
    return compact_time_average(compact[keep], offsets[keep], accel)


def calibrate(compact: np.ndarray, offsets: np.ndarray, accel: int, *, whitening: np.ndarray | None = None,
              virtual_coils: int | None = None, n_pd_frames: int = 0,
              mask_fraction: float = 0.05, map_fit_order: tuple[int, int] | None = None,
              fit_pd_frames: bool = False) -> TsenseCalibration:
    """Calibration of compact interleaved data (see :func:`reconstruct_compact`) from
    :func:`calibration_kspace`.

    Args:
        compact: complex [time, coils, M, kx], offsets int [time], accel R.
        whitening: optional [coils, coils] pre-whitening matrix (:func:`noise_whitening_matrix`).
        virtual_coils: compress to this many virtual coils (None or >= coils: no compression).
        n_pd_frames: leading PD frames, balanced over the offsets (0: time average of every frame).
        mask_fraction: :func:`coil_sensitivities`' background threshold (0: no mask).
        map_fit_order: :func:`coil_sensitivities`' ``fit_order`` (None: the ratio maps).
        fit_pd_frames: fit the maps jointly to the time average and to the ``n_pd_frames`` PD frames'
            calibration (:func:`calibration_kspace` ``pd_frames_only``; needs ``map_fit_order``).
    """
    if fit_pd_frames and map_fit_order is None:
        raise ReconError("a joint fit to the PD frames needs band-limited maps (a map fit order)")
    calibration = calibration_kspace(compact, offsets, accel, n_pd_frames=n_pd_frames)
    pd_calibration = (calibration_kspace(compact, offsets, accel, n_pd_frames=n_pd_frames, pd_frames_only=True)
                      if fit_pd_frames else None)
    n_coils = calibration.shape[0]
    transform = None if whitening is None else np.asarray(whitening, dtype=np.complex64)
    if virtual_coils is not None and virtual_coils < n_coils:
        whitened = calibration if transform is None else np.einsum("dc,cyx->dyx", transform, calibration)
        compression = coil_compression_matrix(whitened, virtual_coils)
        transform = compression if transform is None else compression @ transform
    if transform is None:
        also = () if pd_calibration is None else (pd_calibration,)
        return TsenseCalibration(None, coil_sensitivities(calibration, mask_fraction=mask_fraction,
                                                          fit_order=map_fit_order, also_fit=also),
                                 np.ones(calibration.shape[1:], dtype=np.float32))
    virtual = np.einsum("dc,cyx->dyx", transform, calibration)
    physical_rss = np.sqrt(np.sum(np.abs(_low_resolution_images(calibration, 0.25)) ** 2, axis=0))
    virtual_rss = np.sqrt(np.sum(np.abs(_low_resolution_images(virtual, 0.25)) ** 2, axis=0))
    scale = np.where(virtual_rss > 0, physical_rss / np.maximum(virtual_rss, 1e-30), 1.0).astype(np.float32)
    also = () if pd_calibration is None else (np.einsum("dc,cyx->dyx", transform, pd_calibration),)
    return TsenseCalibration(transform, coil_sensitivities(virtual, mask_fraction=mask_fraction,
                                                           fit_order=map_fit_order, also_fit=also), scale)


def local_low_rank_filter(images: np.ndarray, noise_sd: np.ndarray, *, patch_px: int = 16,
                          threshold: float = 1.0, shifts: int = 2) -> np.ndarray:
    """Noise-level-aware local low-rank (patch-wise temporal PCA) filter of a complex series.

    Every pixel is divided by its noise standard deviation (known from the noise scan and the
    unfolding matrices: the g-factor map), so the noise is white with unit variance. In
    overlapping ``patch_px`` square patches the
    [time, pixels] Casorati matrix of the deviation from the pixel's temporal mean is projected
    on its singular vectors whose singular value exceeds ``threshold`` times the largest one
    that pure noise reaches, ``sqrt(time) + sqrt(pixels)`` (Marchenko-Pastur edge; hard
    threshold as in MP-PCA, Veraart et al., NeuroImage 2016;142:394, with the noise level
    given instead of estimated; local low rank: Trzasko & Manduca, ISMRM 2011). The temporal
    mean is always kept. ``shifts`` tilings (1-4: unshifted, shifted by half a patch
    diagonally, then horizontally and vertically) are averaged; measured on the simulator, 2
    instead of 4 costs 0.1 % NRMSE for 40 % less time. Components of the bolus passage and of the respiratory motion inside
    a patch stand far above the edge; the g-factor-amplified noise of TSENSE does not.

    Args:
        images: complex [time, rows, cols].
        noise_sd: float [time, rows, cols] (or broadcastable) noise standard deviation of
            every pixel, ``E|n|^2 = noise_sd^2``; pixels with 0 are left as they are.
        patch_px: patch width in pixels (>= 2).
        threshold: multiple of the noise edge (<= 0: no filtering).

    Returns:
        complex64 [time, rows, cols].
    """
    images = np.asarray(images)
    if images.ndim != 3:
        raise ReconError(f"images must be [time, rows, cols], found shape {images.shape}")
    noise_sd = np.broadcast_to(np.asarray(noise_sd, dtype=np.float32), images.shape)
    if threshold <= 0 or images.shape[0] < 3:
        return images.astype(np.complex64)
    n_frames, n_rows, n_cols = images.shape
    patch = max(2, min(int(patch_px), n_rows, n_cols))
    half = patch // 2
    known = noise_sd > 0
    white = np.zeros(images.shape, dtype=np.complex64)
    np.divide(images, noise_sd, out=white, where=known)
    mean = white.mean(axis=0, keepdims=True)
    deviation = (white - mean) * known
    padded_rows = -(-n_rows // patch) * patch + half
    padded_cols = -(-n_cols // patch) * patch + half
    padded = np.zeros((n_frames, padded_rows, padded_cols), dtype=np.complex64)
    padded[:, :n_rows, :n_cols] = deviation
    valid = np.zeros((padded_rows, padded_cols), dtype=np.float32)
    valid[:n_rows, :n_cols] = known.any(axis=0)
    filtered = np.zeros_like(padded)
    count = np.zeros((padded_rows, padded_cols), dtype=np.float32)
    for top, left in ((0, 0), (half, half), (0, half), (half, 0))[:shifts]:
        n_tile_rows, n_tile_cols = (padded_rows - top) // patch, (padded_cols - left) // patch
        window = (slice(None), slice(top, top + n_tile_rows * patch), slice(left, left + n_tile_cols * patch))
        tiles = padded[window].reshape(n_frames, n_tile_rows, patch, n_tile_cols, patch)
        tiles = tiles.transpose(1, 3, 0, 2, 4).reshape(n_tile_rows * n_tile_cols, n_frames, patch * patch)
        pixels = valid[window[1:]].reshape(n_tile_rows, patch, n_tile_cols, patch).sum(axis=(1, 3)).ravel()
        active = np.flatnonzero(pixels > 0)
        out = np.zeros_like(tiles)
        if active.size:
            casorati = tiles[active]
            with single_threaded_blas():  # many 63 x 63 problems: threads only spin
                gram = casorati @ casorati.conj().transpose(0, 2, 1)  # [n, time, time]
                eigenvalues, vectors = np.linalg.eigh(gram)
            edge = threshold * (np.sqrt(n_frames) + np.sqrt(pixels[active]))
            kept = eigenvalues > (edge**2)[:, None]
            # eigh sorts ascending: a tile's kept components are its last ones, so only the last
            # (most kept in any tile) columns enter the projection (all 63 cost 5-10 times as much)
            n_kept = int(kept.sum(axis=1).max())
            if n_kept:
                vectors = vectors[:, :, n_frames - n_kept:] * kept[:, None, n_frames - n_kept:]
                with single_threaded_blas():
                    out[active] = vectors @ (vectors.conj().transpose(0, 2, 1) @ casorati)
        out = out.reshape(n_tile_rows, n_tile_cols, n_frames, patch, patch).transpose(2, 0, 3, 1, 4)
        filtered[window] += out.reshape(n_frames, n_tile_rows * patch, n_tile_cols * patch)
        count[window[1:]] += 1
    filtered = filtered[:, :n_rows, :n_cols] / count[:n_rows, :n_cols] + mean
    return np.where(known, filtered * noise_sd, images).astype(np.complex64)


def reconstruct_compact(compact: np.ndarray, offsets: np.ndarray, accel: int, *,
                        sensitivities: np.ndarray | None = None, whitening: np.ndarray | None = None,
                        regularization: float = 1e-3, calibration: TsenseCalibration | None = None,
                        virtual_coils: int | None = None, noise_sd: float | None = None,
                        denoise_threshold: float = 0.0, denoise_patch_px: int = 16,
                        n_pd_frames: int = 0, mask_fraction: float = 0.05,
                        map_fit_order: tuple[int, int] | None = None, fit_pd_frames: bool = False) -> np.ndarray:
    """TSENSE recon from the acquired lines only (no zero-filled copy of k-space).

    Steps: coil transform (whitening, then optional PCA coil compression) applied to the
    acquired samples; per-offset regularised SENSE unfolding; optional local low-rank filter
    of the complex unfolded series with the noise level of every pixel
    (:func:`local_low_rank_filter`); magnitude, brought to the unwhitened physical coils'
    root-sum-of-squares shading.

    Args:
        compact: complex [time, coils, M, kx]: ``compact[t, :, m]`` is phase-encode line
            ``offsets[t] + accel * m`` of frame t (ky = accel * M lines in all).
        offsets: int [time] in [0, accel).
        accel: acceleration R (1 = fully sampled).
        sensitivities: complex [coils, ky, kx] of the (whitened) physical coils, used as they
            are; if None, ``calibration`` or :func:`calibrate` on the time average.
        whitening: optional complex [coils, coils] noise pre-whitening matrix W.
        regularization: SENSE Tikhonov lambda (relative).
        calibration: a :class:`TsenseCalibration` to reuse (e.g. echo 1's for echo 2).
        virtual_coils: coil compression when calibrating here (None: all coils).
        noise_sd: standard deviation of the k-space noise per sample and (whitened) coil,
            ``E|n|^2 = noise_sd^2`` (from the noise scan); needed by the filter.
        denoise_threshold: local low-rank filter threshold in noise edges (0: no filter).
        denoise_patch_px: filter patch width, pixels.
        n_pd_frames: leading proton-density frames, balanced over the offsets in the time
            average when calibrating here (:func:`calibration_kspace`; 0: every frame).
        mask_fraction: the sensitivities' background threshold when calibrating here
            (:func:`coil_sensitivities`; 0: no mask).
        map_fit_order: band-limited maps of this order when calibrating here
            (:func:`fitted_sensitivities`; None: the ratio maps).
        fit_pd_frames: when calibrating here, fit the maps jointly to the PD frames' calibration
            (:func:`calibrate`).

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
    if denoise_threshold > 0 and not (noise_sd is not None and noise_sd > 0):
        raise ReconError(f"the low-rank filter needs the k-space noise level (noise_sd > 0), found {noise_sd}")
    if sensitivities is not None:
        transform = None if whitening is None else np.asarray(whitening, dtype=np.complex64)
        calibration = TsenseCalibration(transform, np.asarray(sensitivities, dtype=np.complex64),
                                        np.ones((n_lines, n_cols), dtype=np.float32))
    elif calibration is None:
        calibration = calibrate(compact, offsets, accel, whitening=whitening, virtual_coils=virtual_coils,
                                n_pd_frames=n_pd_frames, mask_fraction=mask_fraction, map_fit_order=map_fit_order,
                                fit_pd_frames=fit_pd_frames)
    transform = calibration.coil_transform
    n_virtual = n_coils if transform is None else transform.shape[0]
    if transform is not None and transform.shape != (n_virtual, n_coils):
        raise ReconError(f"coil transform must be [virtual, {n_coils}], found {transform.shape}")
    if calibration.sensitivities.shape != (n_virtual, n_lines, n_cols):
        raise ReconError(f"sensitivities must be {(n_virtual, n_lines, n_cols)}, "
                         f"found {calibration.sensitivities.shape}")
    if transform is not None:
        compact = np.matmul(transform, compact.reshape(n_frames, n_coils, -1)).reshape(
            n_frames, n_virtual, n_reduced, n_cols)
    images, noise_gain = _unfold(compact.astype(np.complex64, copy=False), offsets, accel,
                                 calibration.sensitivities, regularization)
    if denoise_threshold > 0:
        images = local_low_rank_filter(images, noise_gain * np.float32(noise_sd), patch_px=denoise_patch_px,
                                       threshold=denoise_threshold)
    out = np.abs(images)
    if transform is not None:
        out *= calibration.scale
    logger.debug("TSENSE R=%d: %d frames, %d -> %d coils, %dx%d, filter %.2f", accel, n_frames, n_coils,
                 n_virtual, n_lines, n_cols, denoise_threshold)
    return out


def _unfold(compact: np.ndarray, offsets: np.ndarray, accel: int, sensitivities: np.ndarray,
            regularization: float, compiled: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Complex images [time, ky, kx] and the noise gain [time, ky, kx] of every pixel (the norm
    of its row of the unfolding matrix: image noise SD per unit k-space noise SD). ``compiled``:
    the unfolding's loops of ``toolbox.sense_kernels`` (None: when numba is there) or numpy's."""
    compiled = sense_kernels.AVAILABLE if compiled is None else compiled
    n_frames, n_coils, n_reduced, n_cols = compact.shape
    n_lines = n_reduced * accel
    images = np.empty((n_frames, n_lines, n_cols), dtype=np.complex64)
    gain = np.empty((n_frames, n_lines, n_cols), dtype=np.float32)
    if accel == 1:
        weights = sensitivities.conj()
        row_norm = np.sqrt(np.sum(np.abs(weights) ** 2, axis=0))
        for start in range(0, n_frames, 8):  # chunks keep the complex coil images small
            coil_images = centered_ifft2(compact[start:start + 8])
            images[start:start + 8] = np.einsum("tcyx,cyx->tyx", coil_images, weights)
        gain[:] = row_norm
        return images, gain
    unfolding = sense_unfolding(sensitivities, accel, regularization=regularization, compiled=compiled)
    for offset in range(accel):
        frames = np.flatnonzero(offsets == offset)
        if frames.size == 0:
            continue
        aliased = centered_ifft2(compact[frames]).astype(np.complex64, copy=False)
        matrix = unfolding.matrices[offset]
        if compiled:
            sense_kernels.apply_unfolding(matrix, aliased, unfolding.lines, frames, images)
        else:
            unfolded = np.zeros((frames.size, accel, n_reduced, n_cols), dtype=np.complex64)
            for coil in range(n_coils):  # coil loop of broadcast products: faster than einsum here
                unfolded += matrix[None, :, coil] * aliased[:, None, coil]
            image = np.empty((frames.size, n_lines, n_cols), dtype=np.complex64)
            image[:, unfolding.lines.T, :] = unfolded
            images[frames] = image
        row_norm = np.sqrt(np.sum(np.abs(matrix) ** 2, axis=1))  # [R, M, kx]
        frame_gain = np.empty((n_lines, n_cols), dtype=np.float32)
        frame_gain[unfolding.lines.T, :] = row_norm
        gain[frames] = frame_gain
    return images, gain
