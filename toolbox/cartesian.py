"""Cartesian multi-coil reconstruction on plain numpy arrays (no streams).

Axis order: k-space and coil images are ``[coils, rows, cols]`` = ``[coils, ky, kx]``
(rows = phase encode, MRD y; cols = readout, MRD x). Fourier transforms are centred
(DC at index n // 2) and unitary (``norm="ortho"``), so the transform chain
oversampling removal -> 2D inverse FFT equals a 2D inverse FFT of the oversampled k-space
followed by cropping the central columns.

References: noise prewhitening as in Gadgetron's NoiseAdjustGadget (Cholesky whitening of the
noise covariance, scaled by the dwell-time ratio); adaptive coil combination after
Walsh, Gmitro, Marcellin, MRM 43:682 (2000); root-sum-of-squares after Roemer et al.,
MRM 16:192 (1990).
"""

from __future__ import annotations

import numpy as np
import scipy.ndimage

from perfline.toolbox.fft import centered_fft, centered_ifft


class ReconstructionError(ValueError):
    """Input arrays of the wrong shape or content."""


def noise_covariance(noise: np.ndarray) -> np.ndarray:
    """Noise covariance of the coils.

    Args:
        noise: complex [coils, samples] noise-only samples (all noise scans concatenated).

    Returns:
        complex128 [coils, coils], ``Psi = noise @ noise^H / (samples - 1)``.
    """
    noise = np.asarray(noise)
    if noise.ndim != 2 or noise.shape[1] < 2:
        raise ReconstructionError(f"noise must be [coils, samples >= 2], got shape {noise.shape}")
    samples = noise.astype(np.complex128, copy=False)
    return samples @ samples.conj().T / (samples.shape[1] - 1)


def prewhitening_matrix(covariance: np.ndarray, dwell_ratio: float = 1.0) -> np.ndarray:
    """Matrix ``W`` with ``W Psi W^H = I``: ``W = inv(L)``, ``Psi = L L^H`` (Cholesky).

    Args:
        covariance: complex [coils, coils] noise covariance ``Psi``.
        dwell_ratio: noise dwell time / acquisition dwell time; noise variance scales with
            1 / dwell time, so the whitened data is multiplied by ``sqrt(dwell_ratio)``.

    Returns:
        complex64 [coils, coils].
    """
    covariance = np.asarray(covariance)
    if covariance.ndim != 2 or covariance.shape[0] != covariance.shape[1]:
        raise ReconstructionError(f"covariance must be square [coils, coils], got {covariance.shape}")
    try:
        lower = np.linalg.cholesky(covariance.astype(np.complex128))
    except np.linalg.LinAlgError as error:
        raise ReconstructionError("noise covariance is not positive definite "
                                  "(too few noise samples or a dead coil)") from error
    whitening = np.linalg.inv(lower) * np.sqrt(dwell_ratio)
    return whitening.astype(np.complex64)


def apply_prewhitening(data: np.ndarray, whitening: np.ndarray) -> np.ndarray:
    """``W @ data`` over the coil axis (axis 0) of ``data`` [coils, ...]."""
    if data.shape[0] != whitening.shape[1]:
        raise ReconstructionError(f"data has {data.shape[0]} coils, the prewhitening matrix "
                                  f"{whitening.shape[1]}")
    flat = data.reshape(data.shape[0], -1)
    return (whitening @ flat).reshape(data.shape).astype(np.complex64, copy=False)


def centered_crop(array: np.ndarray, size: int, axis: int) -> np.ndarray:
    """Central ``size`` entries of ``axis`` (start ``(n - size) // 2``), zero-padded if larger."""
    n = array.shape[axis]
    if size == n:
        return array
    if size < n:
        start = (n - size) // 2
        return np.take(array, np.arange(start, start + size), axis=axis)
    pad = [(0, 0)] * array.ndim
    before = (size - n) // 2
    pad[axis] = (before, size - n - before)
    return np.pad(array, pad)


def remove_readout_oversampling(kspace: np.ndarray, output_samples: int) -> np.ndarray:
    """Crop the readout field of view: inverse FFT along x, keep the central
    ``output_samples`` columns, FFT back (unitary transforms).

    Args:
        kspace: complex [..., x] with x >= output_samples.

    Returns:
        complex64 [..., output_samples].
    """
    samples = kspace.shape[-1]
    if output_samples > samples:
        raise ReconstructionError(f"cannot remove oversampling from {samples} to {output_samples} samples")
    if output_samples == samples:
        return kspace.astype(np.complex64, copy=False)
    profile = centered_crop(centered_ifft(kspace, axis=-1), output_samples, axis=-1)
    out = centered_fft(profile, axis=-1)
    return out.astype(np.complex64, copy=False)


def kspace_to_image(kspace: np.ndarray) -> np.ndarray:
    """Centred unitary 2D inverse FFT over the last two axes: [..., ky, kx] -> [..., y, x]."""
    if kspace.ndim < 2:
        raise ReconstructionError(f"k-space needs at least 2 axes, got shape {kspace.shape}")
    image = centered_ifft(centered_ifft(kspace, axis=-2), axis=-1)
    return image.astype(np.complex64, copy=False)


def coil_combine_rss(images: np.ndarray) -> np.ndarray:
    """Root-sum-of-squares over coils: [coils, ...] -> float32 [...]."""
    return np.sqrt(np.sum(np.abs(images.astype(np.complex64, copy=False)) ** 2, axis=0)).astype(np.float32)


def walsh_sensitivities(images: np.ndarray, kernel_size: int = 7) -> np.ndarray:
    """Coil sensitivities by the adaptive method of Walsh et al. (2000).

    For every pixel, the principal eigenvector of the coil correlation matrix
    ``R[c, d] = sum over a kernel_size x kernel_size window of x_c conj(x_d)``; its phase is
    referenced to the coil with the most signal so the combined image has smooth phase.

    Args:
        images: complex [coils, rows, cols] coil images.
        kernel_size: odd window width in pixels.

    Returns:
        complex64 [coils, rows, cols] unit-norm sensitivities.
    """
    if images.ndim != 3:
        raise ReconstructionError(f"coil images must be [coils, rows, cols], got {images.shape}")
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ReconstructionError(f"kernel_size must be a positive odd integer, got {kernel_size}")
    coils = images.shape[0]
    data = images.astype(np.complex128, copy=False)
    correlation = np.empty(images.shape[1:] + (coils, coils), dtype=np.complex128)
    for c in range(coils):
        for d in range(c, coils):
            product = data[c] * np.conj(data[d])
            smoothed = (scipy.ndimage.uniform_filter(product.real, kernel_size, mode="nearest")
                        + 1j * scipy.ndimage.uniform_filter(product.imag, kernel_size, mode="nearest"))
            correlation[..., c, d] = smoothed
            correlation[..., d, c] = np.conj(smoothed)
    _, vectors = np.linalg.eigh(correlation)
    principal = np.moveaxis(vectors[..., :, -1], -1, 0)  # [coils, rows, cols]
    reference = int(np.argmax(np.sum(np.abs(data) ** 2, axis=(1, 2))))
    phase = np.exp(-1j * np.angle(principal[reference]))
    return (principal * phase[np.newaxis]).astype(np.complex64)


def coil_combine_walsh(images: np.ndarray, kernel_size: int = 7) -> np.ndarray:
    """Adaptive (Walsh) combination: ``sum_c conj(s_c) x_c`` with unit-norm ``s``.

    Args:
        images: complex [coils, rows, cols].

    Returns:
        complex64 [rows, cols] combined image.
    """
    sensitivities = walsh_sensitivities(images, kernel_size)
    return np.sum(np.conj(sensitivities) * images, axis=0).astype(np.complex64)
