"""TSENSE recon of time-interleaved undersampled k-space on a synthetic multi-coil phantom."""

from __future__ import annotations

import numpy as np
import pytest

from perfline.toolbox.fft import centered_fft, centered_ifft
from perfline.toolbox.interleaved_recon import (
    ReconError,
    coil_sensitivities,
    interleave_offsets,
    noise_whitening_matrix,
    reconstruct_interleaved,
    time_averaged_kspace,
)


def coil_profiles(n_coils: int, shape: tuple[int, int]) -> np.ndarray:
    """Smooth complex receive profiles of coils placed on a ring around the field of view."""
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    centre = np.array(shape) / 2
    profiles = []
    for k in range(n_coils):
        angle = 2 * np.pi * k / n_coils
        r0, c0 = centre + 0.8 * centre * np.array([np.sin(angle), np.cos(angle)])
        distance2 = ((rows - r0) ** 2 + (cols - c0) ** 2) / (0.3 * shape[1]) ** 2
        phase = np.exp(1j * (angle + 0.02 * (rows - r0) + 0.01 * (cols - c0)))
        profiles.append(np.exp(-distance2) * phase)
    return np.array(profiles)


def dynamic_phantom(n_frames: int, shape: tuple[int, int]) -> np.ndarray:
    """[time, rows, cols] body ellipse with a heart whose blood pool and wall enhance."""
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    r, c = (rows - shape[0] / 2) / shape[0], (cols - shape[1] / 2) / shape[1]
    body = (r / 0.42) ** 2 + (c / 0.45) ** 2 < 1
    heart = (r / 0.15) ** 2 + ((c + 0.05) / 0.12) ** 2
    pool = heart < 0.45
    wall = (heart >= 0.45) & (heart < 1)
    time = np.arange(n_frames)
    bolus = 4 * np.exp(-0.5 * ((time - 15) / 3) ** 2)
    tissue = 0.8 * (1 - np.exp(-np.clip(time - 17, 0, None) / 6))
    frames = 0.5 * body[None] + bolus[:, None, None] * pool + tissue[:, None, None] * wall
    return frames.astype(np.float64)


def acquire(images: np.ndarray, profiles: np.ndarray, accel: int, noise_sd: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    coil_images = images[:, None] * profiles[None]
    kspace = centered_fft(centered_fft(coil_images, axis=-2), axis=-1)
    kspace = kspace + noise_sd * (rng.standard_normal(kspace.shape) + 1j * rng.standard_normal(kspace.shape))
    lines = np.arange(images.shape[1])
    sampled = (lines[None, :] - np.arange(images.shape[0])[:, None]) % accel == 0
    return (kspace * sampled[:, None, :, None]).astype(np.complex64), sampled


def nrmse(estimate: np.ndarray, truth: np.ndarray) -> float:
    return float(np.linalg.norm(estimate - truth) / np.linalg.norm(truth))


@pytest.mark.parametrize(("accel", "shape"), [(3, (48, 40)), (2, (24, 32))], ids=["myocardium-R3", "aif-R2"])
def test_noise_free_unfolding_is_exact_with_true_sensitivities(accel: int, shape: tuple[int, int]) -> None:
    images = dynamic_phantom(9, shape)
    profiles = coil_profiles(8, shape)
    kspace, sampled = acquire(images, profiles, accel, noise_sd=0.0)
    rss = np.sqrt(np.sum(np.abs(profiles) ** 2, axis=0))
    recon = reconstruct_interleaved(kspace, sampled, sensitivities=(profiles / rss).astype(np.complex64),
                                    regularization=1e-7)
    assert nrmse(recon, images * rss) < 1e-3


def test_r3_recon_with_calibrated_sensitivities_under_5_percent() -> None:
    shape = (72, 64)
    images = dynamic_phantom(30, shape)
    profiles = coil_profiles(16, shape)
    noise_sd = 0.002 * np.abs(centered_fft(centered_fft(images[0] * profiles[0], 0), 1)).max()
    undersampled, sampled = acquire(images, profiles, 3, noise_sd)
    full, full_mask = acquire(images, profiles, 1, 0.0)
    sensitivities = coil_sensitivities(time_averaged_kspace(undersampled, sampled))
    recon = reconstruct_interleaved(undersampled, sampled, sensitivities=sensitivities)
    reference = reconstruct_interleaved(full, full_mask, sensitivities=sensitivities)
    error = nrmse(recon, reference)
    zero_filled = np.sqrt(np.sum(np.abs(centered_ifft(centered_ifft(undersampled, -2), -1)) ** 2, axis=1))
    assert error < 0.05
    assert nrmse(zero_filled * 3, reference) > 5 * error  # the aliasing was really there
    # the dynamic contrast is kept frame by frame (blood pool peak at frame 15)
    pool = (slice(None), shape[0] // 2, shape[1] // 2 - 3)
    assert int(np.argmax(recon[pool])) == 15


def test_interleave_detection() -> None:
    lines = np.arange(12)
    sampled = (lines[None, :] - np.arange(7)[:, None]) % 3 == 0
    accel, offsets = interleave_offsets(sampled)
    assert accel == 3 and offsets.tolist() == [0, 1, 2, 0, 1, 2, 0]


def test_irregular_pattern_and_missing_lines_rejected() -> None:
    lines = np.arange(12)
    sampled = (lines[None, :] - np.arange(6)[:, None]) % 3 == 0
    broken = sampled.copy()
    broken[2, 5] = False
    with pytest.raises(ReconError, match="frame 2 does not sample every 3-th line"):
        interleave_offsets(broken)
    never = (lines[None, :] - np.zeros(6, int)[:, None]) % 3 == 0  # no shift: lines 1, 2 never seen
    with pytest.raises(ReconError, match="not fully sampled"):
        interleave_offsets(never)


def test_shape_errors() -> None:
    with pytest.raises(ReconError, match=r"\[time, coils, ky, kx\]"):
        reconstruct_interleaved(np.zeros((2, 3, 4), np.complex64), np.ones((2, 3), bool))
    with pytest.raises(ReconError, match="sampling mask"):
        reconstruct_interleaved(np.zeros((2, 3, 6, 4), np.complex64), np.ones((2, 5), bool))


def test_noise_whitening_decorrelates() -> None:
    rng = np.random.default_rng(3)
    mixing = np.array([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.2, 0.3, 0.9]])
    white = rng.standard_normal((3, 20000)) + 1j * rng.standard_normal((3, 20000))
    noise = mixing @ white
    whitened = noise_whitening_matrix(noise) @ noise
    covariance = whitened @ whitened.conj().T / whitened.shape[1]
    off_diagonal = covariance - np.diag(np.diag(covariance))
    assert np.abs(off_diagonal).max() < 0.05 * np.abs(np.diag(covariance)).min()
