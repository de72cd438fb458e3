"""Band-limited coil maps fitted to the TSENSE calibration (toolbox/interleaved_recon.py fitted_sensitivities)."""

from __future__ import annotations

import numpy as np
import pytest

from perfline.toolbox.fft import centered_fft
from perfline.toolbox.interleaved_recon import ReconError, calibration_kspace, coil_sensitivities, fitted_sensitivities

from test_interleaved_recon import coil_profiles

SHAPE = (72, 96)


def body_and_heart(shift_rows: float = 0.0, texture: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """Image [rows, cols]: a (textured) body ellipse, a bright heart, moved by ``shift_rows`` px; heart mask."""
    rows, cols = np.mgrid[: SHAPE[0], : SHAPE[1]].astype(float)
    r, c = (rows - shift_rows - SHAPE[0] / 2) / SHAPE[0], (cols - SHAPE[1] / 2) / SHAPE[1]
    body = np.clip(20 * (1 - (r / 0.40) ** 2 - (c / 0.44) ** 2), 0, 1)  # soft-edged body, 1-2 px ramp
    pattern = 1 + texture * np.sin(2 * np.pi * 9 * c) * np.cos(2 * np.pi * 7 * r)
    heart = (r / 0.12) ** 2 + ((c + 0.05) / 0.1) ** 2 < 1
    return 0.6 * body * pattern + 1.5 * heart, heart


def calibration_of(objects: list[np.ndarray], profiles: np.ndarray) -> np.ndarray:
    """Calibration k-space [coils, ky, kx] whose lines of offset o come from ``objects[o]`` (R = len(objects))."""
    accel = len(objects)
    calibration = np.zeros(profiles.shape, dtype=np.complex128)
    for offset, image in enumerate(objects):
        kspace = centered_fft(centered_fft(image[None] * profiles, axis=-2), axis=-1)
        calibration[:, offset::accel] = kspace[:, offset::accel]
    return calibration


def map_error(estimate: np.ndarray, truth: np.ndarray, where: np.ndarray) -> float:
    """90th percentile over ``where`` of the per-pixel error of unit-RSS maps (common phase removed)."""
    phase = np.exp(-1j * np.angle(np.sum(estimate * truth.conj(), axis=0)))
    error = np.sqrt(np.sum(np.abs(estimate * phase - truth) ** 2, axis=0))
    return float(np.percentile(error[where], 90))


def test_fitted_maps_reproduce_smooth_coils_from_a_consistent_calibration() -> None:
    profiles = coil_profiles(8, SHAPE)
    truth = profiles / np.sqrt(np.sum(np.abs(profiles) ** 2, axis=0))
    image, heart = body_and_heart()
    calibration = calibration_of([image] * 3, profiles)
    inside = image > 0.3
    fitted = coil_sensitivities(calibration, mask_fraction=0.0, fit_order=(8, 10))
    ratio = coil_sensitivities(calibration, mask_fraction=0.0)
    # measured: fitted 0.0008, ratio maps 0.0026 (the low-pass window spreads the body's edge into the maps)
    assert map_error(fitted, truth, inside) < 0.002
    assert map_error(fitted, truth, inside) < 0.5 * map_error(ratio, truth, inside)


def test_fitted_maps_leave_out_a_body_that_moved_between_the_offsets() -> None:
    # breathing sampled differently by the three offsets: each offset's mean body sits at another position
    # (here 0, 1 and 2 pixels), so the calibration is not one image and its inconsistency aliases by FOV/3
    profiles = coil_profiles(8, SHAPE)
    truth = profiles / np.sqrt(np.sum(np.abs(profiles) ** 2, axis=0))
    objects = [body_and_heart(shift, texture=0.0)[0] for shift in (0.0, 1.0, 2.0)]
    _, heart = body_and_heart(1.0)
    body = objects[1] > 0.3
    calibration = calibration_of(objects, profiles)
    ratio = coil_sensitivities(calibration, mask_fraction=0.0)
    plain = fitted_sensitivities(calibration, (8, 10), initial=ratio, robust_iterations=0)
    robust = coil_sensitivities(calibration, mask_fraction=0.0, fit_order=(8, 10))
    # measured, 90th percentile over the heart / the body: ratio maps 0.054 / 0.146, plain fit 0.041 / 0.146,
    # reweighted 0.005 / 0.010 (the pixels the inconsistency lands on are left out of the fit)
    assert map_error(ratio, truth, heart) > 0.03
    assert map_error(plain, truth, heart) < map_error(ratio, truth, heart)
    assert map_error(robust, truth, heart) < 0.2 * map_error(ratio, truth, heart)
    assert map_error(robust, truth, body) < 0.2 * map_error(ratio, truth, body)


def test_mask_and_shape_of_fitted_maps() -> None:
    profiles = coil_profiles(8, SHAPE)
    image, _ = body_and_heart()
    calibration = calibration_of([image] * 3, profiles)
    masked = coil_sensitivities(calibration, mask_fraction=0.05, fit_order=(6, 8))
    ratio = coil_sensitivities(calibration, mask_fraction=0.05)
    assert masked.shape == calibration.shape and masked.dtype == np.complex64
    assert np.array_equal(masked[0] == 0, ratio[0] == 0)  # the same background mask as the ratio maps
    rss = np.sqrt(np.sum(np.abs(masked) ** 2, axis=0))
    assert np.allclose(rss[masked[0] != 0], 1.0, atol=1e-5)


@pytest.mark.parametrize("order", [(0, 4), (4, -1), (36, 10), (8, 48)])
def test_fit_order_outside_the_matrix_is_refused(order: tuple[int, int]) -> None:
    profiles = coil_profiles(4, SHAPE)
    image, _ = body_and_heart()
    calibration = calibration_of([image] * 3, profiles)
    with pytest.raises(ReconError, match="fit order"):
        fitted_sensitivities(calibration, order, initial=profiles)


def test_calibration_from_the_pd_frames_alone() -> None:
    rng = np.random.default_rng(3)
    accel, n_pd = 3, 3
    offsets = np.arange(12) % accel
    compact = (rng.standard_normal((12, 4, 8, 16)) + 1j * rng.standard_normal((12, 4, 8, 16))).astype(np.complex64)
    pd = calibration_kspace(compact, offsets, accel, n_pd_frames=n_pd, pd_frames_only=True)
    for offset in range(accel):
        np.testing.assert_array_equal(pd[:, offset::accel], compact[offset])  # one PD frame per offset
    everything = calibration_kspace(compact, offsets, accel, n_pd_frames=n_pd)
    assert not np.allclose(pd, everything)
    # surplus PD frames on some offsets are left out (4 PD frames at R = 3: the first of each offset)
    four = calibration_kspace(compact, offsets, accel, n_pd_frames=4, pd_frames_only=True)
    np.testing.assert_array_equal(four, pd)
    with pytest.raises(ReconError, match="none samples \\[2\\]"):
        calibration_kspace(compact, offsets, accel, n_pd_frames=2, pd_frames_only=True)
    with pytest.raises(ReconError, match="needs PD frames"):
        calibration_kspace(compact, offsets, accel, n_pd_frames=0, pd_frames_only=True)


def test_joint_fit_to_a_second_calibration_that_is_consistent() -> None:
    # the time average of a breathing body with texture (inconsistent over most of the body) fitted jointly
    # with a PD-like calibration of another contrast taken while the body held still
    profiles = coil_profiles(8, SHAPE)
    truth = profiles / np.sqrt(np.sum(np.abs(profiles) ** 2, axis=0))
    breathing = calibration_of([body_and_heart(shift)[0] for shift in (0.0, 1.0, 2.0)], profiles)
    image, heart = body_and_heart(1.0)
    still = calibration_of([3 * body_and_heart(0.5)[0] + 0.5 * heart] * 3, profiles)
    body = image > 0.3
    alone = coil_sensitivities(breathing, mask_fraction=0.0, fit_order=(8, 10))
    joint = coil_sensitivities(breathing, mask_fraction=0.0, fit_order=(8, 10), also_fit=(still,))
    # measured, heart / body 90th percentile: alone 0.045 / 0.069, jointly 0.023 / 0.037 (ratio maps 0.056 / 0.150)
    assert map_error(joint, truth, heart) < 0.6 * map_error(alone, truth, heart)
    assert map_error(joint, truth, body) < 0.6 * map_error(alone, truth, body)
    with pytest.raises(ReconError, match="need a fit order"):
        coil_sensitivities(breathing, also_fit=(still,))
    with pytest.raises(ReconError, match="must all be"):
        fitted_sensitivities([breathing, still[:4]], (8, 10), initial=[alone, alone[:4]])
