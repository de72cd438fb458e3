"""Compiled SENSE unfolding loops against numpy's batched version; the 2-D centred FFT."""

from __future__ import annotations

import numpy as np
import pytest

from perfline.toolbox import interleaved_recon, sense_kernels
from perfline.toolbox.fft import centered_fft, centered_ifft, centered_ifft2

needs_numba = pytest.mark.skipif(not sense_kernels.AVAILABLE, reason="numba not installed or disabled")


def _problem(accel: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    n_coils, n_lines, n_cols, n_frames = 6, 12 * accel, 10, 4 * accel + 1
    sensitivities = (rng.standard_normal((n_coils, n_lines, n_cols)) +
                     1j * rng.standard_normal((n_coils, n_lines, n_cols))).astype(np.complex64)
    compact = (rng.standard_normal((n_frames, n_coils, n_lines // accel, n_cols)) +
               1j * rng.standard_normal((n_frames, n_coils, n_lines // accel, n_cols))).astype(np.complex64)
    return sensitivities, compact, np.arange(n_frames) % accel


@needs_numba
@pytest.mark.parametrize("accel", [2, 3, 4])
def test_compiled_unfolding_equals_numpy(accel: int) -> None:
    sensitivities, compact, offsets = _problem(accel)
    compiled = interleaved_recon.sense_unfolding(sensitivities, accel, compiled=True)
    reference = interleaved_recon.sense_unfolding(sensitivities, accel, compiled=False)
    np.testing.assert_array_equal(compiled.lines, reference.lines)
    for ours, theirs in zip(compiled.matrices, reference.matrices):
        assert ours.dtype == np.complex64 and ours.shape == theirs.shape
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=2e-5 * np.abs(theirs).max())
    images, gain = interleaved_recon._unfold(compact, offsets, accel, sensitivities, 1e-3, compiled=True)
    images_np, gain_np = interleaved_recon._unfold(compact, offsets, accel, sensitivities, 1e-3, compiled=False)
    np.testing.assert_allclose(images, images_np, rtol=0, atol=2e-5 * np.abs(images_np).max())
    np.testing.assert_allclose(gain, gain_np, rtol=2e-5)


@needs_numba
def test_unfolding_inverts_a_noise_free_fold() -> None:
    """Fold known coil images at R = 3 and unfold them: the image comes back (tiny Tikhonov load)."""
    rng = np.random.default_rng(3)
    accel, n_coils, n_lines, n_cols = 3, 8, 24, 8
    image = rng.standard_normal((n_lines, n_cols)) + 1j * rng.standard_normal((n_lines, n_cols))
    sensitivities = (rng.standard_normal((n_coils, n_lines, n_cols)) +
                     1j * rng.standard_normal((n_coils, n_lines, n_cols))).astype(np.complex64)
    kspace = centered_fft(centered_fft(sensitivities * image, axis=-2), axis=-1)
    offsets = np.arange(accel)
    compact = np.stack([kspace[:, offset::accel] for offset in offsets]).astype(np.complex64)
    images, _ = interleaved_recon._unfold(compact, offsets, accel, sensitivities, 1e-7, compiled=True)
    np.testing.assert_allclose(images, np.broadcast_to(image, images.shape), atol=1e-3 * np.abs(image).max())


@pytest.mark.parametrize("shape", [(3, 4, 6), (2, 10, 14), (2, 7, 6), (1, 8, 9)])
def test_centered_ifft2_is_the_two_one_dimensional_transforms(shape: tuple[int, int, int]) -> None:
    rng = np.random.default_rng(1)
    data = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)
    reference = centered_ifft(centered_ifft(data, axis=-2), axis=-1)
    result = centered_ifft2(data)
    assert result.dtype == np.complex64
    np.testing.assert_allclose(result, reference, rtol=0, atol=1e-6 * np.abs(reference).max())


@needs_numba
def test_warm_up_compiles_both_loops() -> None:
    sense_kernels.warm_compiled_unfolding()
    assert sense_kernels._unfolding_matrices_c.signatures and sense_kernels._apply_unfolding_c.signatures
