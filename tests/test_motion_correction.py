"""Motion correction: engine properties and residual motion on the simulator's known fields."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from perfline.simulator import study as st
from perfline.simulator.image_study import image_slice
from perfline.toolbox.motion_correction import (
    MotionCorrectionError,
    contrast_invariant_translation,
    heart_motion_rms_px,
    kl_synthetic_frames,
    locate_heart,
    motion_correct_series,
    register_multiresolution,
    warp_series,
)

N_FRAMES = 30


def residual_motion_px(estimated: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> float:
    """RMS over frames and heart pixels of the motion left after correction, in pixels.

    Both fields are pull-back maps [2, time, rows, cols]: the corrected frame shows, at x, the
    reference anatomy at ``x + u(x) + d(x + u(x))``. The temporal mean of that residual (a
    common offset of the whole corrected series) is not motion and is removed.
    """
    rows, cols = np.indices(mask.shape, dtype=np.float64)
    residual = np.empty_like(estimated, dtype=np.float64)
    for frame in range(estimated.shape[1]):
        where = [rows + estimated[0, frame], cols + estimated[1, frame]]
        for component in range(2):
            residual[component, frame] = estimated[component, frame] + ndimage.map_coordinates(
                truth[component, frame], where, order=1, mode="nearest")
    residual -= residual.mean(axis=1, keepdims=True)
    return float(np.sqrt(np.mean((residual[0] ** 2 + residual[1] ** 2)[:, mask])))


@pytest.fixture(scope="module")
def simulated_slice():
    study = st.sample_study(5, n_slices=1, n_frames=N_FRAMES, flow_model="fermi")
    moving = image_slice(study, 0)
    still = image_slice(study, 0, motion=False)
    clean = image_slice(study, 0, motion=False, noise=False)
    phantom = st.slice_phantom(study, 0)
    fields = st.motion_fields(study, "myocardium", 0, st.MYO_SHAPE, st.MYO_PIXEL_MM, phantom.anatomy.lv_center_rc)
    truth = fields.displacement().transpose(1, 0, 2, 3)
    return moving, still, clean, truth


def test_recovers_known_translation() -> None:
    rng = np.random.default_rng(0)
    image = ndimage.gaussian_filter(rng.standard_normal((64, 80)), 3).astype(np.float32)
    shifts = np.array([[1.7, -0.6], [-2.3, 1.2], [0.4, 3.1]], dtype=np.float32)
    field = np.broadcast_to(shifts.T[:, :, None, None], (2, 3, 64, 80)).astype(np.float32)
    moved = warp_series(np.repeat(image[None], 3, axis=0), field)
    estimate = register_multiresolution(np.repeat(image[None], 3, axis=0), moved, levels=3, iterations=6,
                                        finest_iterations=3, window_px=4, smoothing_px=2)
    centre = estimate[:, :, 16:48, 20:60].mean(axis=(2, 3))
    # the registration undoes the shift: its pull-back field is the inverse translation
    np.testing.assert_allclose(centre.T, -shifts, atol=0.1)


def test_contrast_invariant_translation_through_a_contrast_change() -> None:
    # piecewise-constant "tissues" whose intensities are remapped (reversed order, one pair
    # swapped): no intensity-based match, same edges
    rng = np.random.default_rng(2)
    labels = np.floor(ndimage.gaussian_filter(rng.standard_normal((96, 96)), 6) * 40).astype(int)
    labels -= labels.min()
    reference = ndimage.gaussian_filter(labels.astype(np.float32), 1.0)
    lookup = rng.permutation(labels.max() + 1).astype(np.float32)
    remapped = ndimage.gaussian_filter(lookup[labels], 1.0)
    shifts = np.array([[1.3, -0.7], [-2.4, 0.4], [0.0, 2.6]], dtype=np.float32)
    field = np.broadcast_to(-shifts.T[:, :, None, None], (2, 3, 96, 96)).astype(np.float32)
    moved = warp_series(np.repeat(remapped[None], 3, axis=0), field)  # moved[k](x) = remapped(x - s_k)
    rows, cols = np.indices((96, 96))
    window = np.exp(-0.5 * ((rows - 48) ** 2 + (cols - 48) ** 2) / 16.0**2)
    estimate = contrast_invariant_translation(moved, reference, window)
    # moved[k](x + t) ~ reference(x) for t = s_k
    np.testing.assert_allclose(estimate, shifts, atol=0.15)


def test_locate_heart_prefers_the_central_enhancing_blob() -> None:
    rng = np.random.default_rng(3)
    n_frames, shape = 40, (120, 160)
    rows, cols = np.indices(shape)
    heart = np.exp(-0.5 * ((rows - 50) ** 2 + (cols - 95) ** 2) / 8.0**2)  # 18 px off centre
    spleen = np.exp(-0.5 * ((rows - 100) ** 2 + (cols - 150) ** 2) / 8.0**2)  # as strong, near the edge
    enhancement = np.exp(-0.5 * ((np.arange(n_frames) - 15) / 4.0) ** 2)
    late = np.exp(-0.5 * ((np.arange(n_frames) - 25) / 4.0) ** 2)
    series = 0.2 + heart[None] * enhancement[:, None, None] + spleen[None] * late[:, None, None]
    # a thin edge moving by 2 px from frame to frame, near the border
    edge = (cols[None] > 20 + 2 * (np.arange(n_frames) % 2)[:, None, None]) * 0.5
    series = series + edge + 0.01 * rng.standard_normal((n_frames,) + shape)
    row, col = locate_heart(series.astype(np.float32), 30.0)
    assert np.hypot(row - 50, col - 95) < 3


@pytest.mark.parametrize(
    ("frames", "reference", "window", "match"),
    [
        (np.zeros((8, 8)), np.zeros((8, 8)), np.ones((8, 8)), r"\[time, rows, cols\]"),
        (np.zeros((2, 16, 16)), np.zeros((16, 8)), np.ones((16, 16)), "expected"),
        (np.zeros((2, 6, 6)), np.zeros((6, 6)), np.ones((6, 6)), "too small"),
    ],
    ids=["2d-frames", "reference-shape", "too-small"],
)
def test_contrast_invariant_translation_bad_input(frames, reference, window, match) -> None:
    with pytest.raises(MotionCorrectionError, match=match):
        contrast_invariant_translation(frames, reference, window)


def test_kl_full_rank_is_identity_and_low_rank_is_smooth() -> None:
    rng = np.random.default_rng(1)
    series = rng.random((6, 8, 9)).astype(np.float32)
    np.testing.assert_allclose(kl_synthetic_frames(series, 5), series, atol=1e-5)
    mean_only = kl_synthetic_frames(series, 0)
    np.testing.assert_allclose(mean_only, np.broadcast_to(series.mean(axis=0), series.shape), atol=1e-5)


def _heart_error(series: np.ndarray, clean: np.ndarray, mask: np.ndarray) -> float:
    """RMS distance of a series from its noise-free truth over the heart pixels."""
    return float(np.sqrt(np.mean((series - clean)[:, mask] ** 2)))


def _corrected_residual(moving, truth: np.ndarray, **options):  # noqa: ANN001, ANN202
    """(result, residual before, residual after) of the SR frames of a moving simulated slice."""
    pd = moving.n_pd_frames
    mask = moving.labels > 0
    result = motion_correct_series(moving.signal, n_pd_frames=pd, **options)
    before = residual_motion_px(np.zeros_like(truth[:, pd:]), truth[:, pd:], mask)
    after = residual_motion_px(result.displacement_px[:, pd:], truth[:, pd:], mask)
    return result, before, after


def test_residual_motion_on_simulated_free_breathing(simulated_slice) -> None:
    moving, _, _, truth = simulated_slice
    result, before, after = _corrected_residual(moving, truth)
    assert before > 0.8  # the case really moves
    assert after <= 0.5
    assert result.corrected.shape == moving.signal.shape


def test_motion_free_series_not_made_worse(simulated_slice) -> None:
    _, still, clean, truth = simulated_slice
    pd = still.n_pd_frames
    mask = still.labels > 0
    result = motion_correct_series(still.signal, n_pd_frames=pd)
    jitter = residual_motion_px(result.displacement_px, np.zeros_like(truth), mask)
    assert jitter < 0.25
    # in the heart the corrected frames are no further from the noise-free truth than the input
    error_in = _heart_error(still.signal, clean.signal, mask)
    error_out = _heart_error(result.corrected, clean.signal, mask)
    assert error_out <= 1.02 * error_in


@pytest.fixture(scope="module")
def deep_breathing_slice():
    """Mid slice of the benchmark's deep-breathing study (seed 7: 12.3 mm, a 22 s breath hold
    over the 8 pre-contrast frames, then 5-6 px breaths), moving and motion-free."""
    study = st.sample_study(7, n_slices=3, n_frames=60, flow_model="fermi")
    moving = image_slice(study, 1)
    still = image_slice(study, 1, motion=False)
    clean = image_slice(study, 1, motion=False, noise=False)
    phantom = st.slice_phantom(study, 1)
    fields = st.motion_fields(study, "myocardium", 1, st.MYO_SHAPE, st.MYO_PIXEL_MM, phantom.anatomy.lv_center_rc)
    return moving, still, clean, fields.displacement().transpose(1, 0, 2, 3)


def test_residual_motion_deep_breathing(deep_breathing_slice) -> None:
    moving, _, _, truth = deep_breathing_slice
    _, before, after = _corrected_residual(moving, truth)
    # without the heart translation (the intensity passes alone) this case left 0.60 px
    _, _, intensity_only = _corrected_residual(moving, truth, heart_window_px=0.0)
    assert before > 2.0
    assert after <= 0.5
    assert after < intensity_only


def test_deep_breathing_study_motion_free_not_made_worse(deep_breathing_slice) -> None:
    _, still, clean, _ = deep_breathing_slice
    mask = still.labels > 0
    result = motion_correct_series(still.signal, n_pd_frames=still.n_pd_frames)
    error_in = _heart_error(still.signal, clean.signal, mask)
    error_out = _heart_error(result.corrected, clean.signal, mask)
    assert error_out <= 1.02 * error_in


@pytest.mark.parametrize("seed", [141, 154], ids=["seed141", "seed154"])
def test_motion_free_twin_of_a_deep_breathing_study_not_made_worse(seed: int) -> None:
    # benchmark studies whose motion-free series the per-frame guard alone let through (heart
    # error x 1.109: two bolus-arrival frames moved 0.7 px by the heart translation; x 1.604:
    # 12 frames with 0.44-0.58 px fields from the intensity passes)
    study = st.sample_study(seed, n_slices=3, n_frames=60, flow_model="fermi")
    still = image_slice(study, 1, motion=False)
    clean = image_slice(study, 1, motion=False, noise=False)
    mask = still.labels > 0
    result = motion_correct_series(still.signal, n_pd_frames=still.n_pd_frames)
    error_in = _heart_error(still.signal, clean.signal, mask)
    error_out = _heart_error(result.corrected, clean.signal, mask)
    assert error_out <= error_in * (1 + 1e-6)
    assert result.heart_motion_px < 0.35


def _translated_texture(shifts: np.ndarray) -> np.ndarray:
    """float32 [frames, 96, 96] smooth random texture, frame k moved by ``shifts[k]`` (row, col) px."""
    rng = np.random.default_rng(4)
    image = 1.0 + ndimage.gaussian_filter(rng.standard_normal((96, 96)), 3).astype(np.float32) * 20
    field = np.broadcast_to(-shifts.T[:, :, None, None], (2, len(shifts), 96, 96)).astype(np.float32)
    noise = 0.01 * rng.standard_normal((len(shifts), 96, 96)).astype(np.float32)
    return warp_series(np.repeat(image[None], len(shifts), axis=0), field) + noise


@pytest.mark.parametrize(("amplitude_px", "still"), [(0.1, True), (0.6, False)], ids=["0.1px", "0.6px"])
def test_still_series_decision_follows_the_estimated_motion(amplitude_px: float, still: bool) -> None:
    rng = np.random.default_rng(5)
    shifts = amplitude_px * rng.standard_normal((24, 2))  # true RMS motion 0.12 / 0.75 px
    series = _translated_texture(shifts)
    result = motion_correct_series(series)
    true_rms = float(np.sqrt(np.mean(np.sum((shifts - shifts.mean(axis=0)) ** 2, axis=1))))
    assert result.heart_motion_px == pytest.approx(true_rms, abs=0.15)
    assert result.still_series is still
    if still:
        np.testing.assert_array_equal(result.corrected, series)
        assert not result.displacement_px.any()
    else:
        assert np.abs(result.displacement_px).max() > 1.0
    off = motion_correct_series(series, still_series_px=0.0)
    assert off.still_series is False


def test_heart_motion_rms_px_of_known_translations() -> None:
    shifts = np.array([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [0.0, 3.0]])
    field = np.broadcast_to(shifts.T[:, :, None, None], (2, 4, 5, 6)).astype(np.float32) + 7.0  # common offset
    weight = np.zeros((5, 6))
    weight[2, 3] = 2.0
    expected = np.sqrt(np.mean(np.sum((shifts - shifts.mean(axis=0)) ** 2, axis=1)))
    assert heart_motion_rms_px(field, weight) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(MotionCorrectionError, match=r"\[2, time, rows, cols\]"):
        heart_motion_rms_px(field[0], weight)
    with pytest.raises(MotionCorrectionError, match="sums to zero"):
        heart_motion_rms_px(field, np.zeros((5, 6)))


@pytest.mark.parametrize(
    ("series", "pd", "match"),
    [
        (np.zeros((4, 8)), 0, r"\[time, rows, cols\]"),
        (np.ones((3, 8, 8)), 2, "at least 2 saturation-recovery frames"),
        (np.full((4, 8, 8), np.nan), 0, "non-finite"),
        (np.zeros((4, 8, 8)), 0, "no signal"),
    ],
    ids=["2d", "too-few-frames", "nan", "empty"],
)
def test_bad_input(series: np.ndarray, pd: int, match: str) -> None:
    with pytest.raises(MotionCorrectionError, match=match):
        motion_correct_series(series, n_pd_frames=pd)


def _bright_pool(shift: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """A band-limited image [64, 64] of a bright pool (10) in a dim background (1), blurred like a
    reconstructed image (Gaussian, sigma 0.8 px), moved by ``shift`` pixels exactly (Fourier shift)."""
    rows, cols = np.indices((64, 64))
    image = np.where((rows - 32) ** 2 + (cols - 30) ** 2 <= 8**2, 10.0, 1.0)
    spectrum = np.fft.fft2(ndimage.gaussian_filter(image, 0.8))
    ky, kx = np.meshgrid(np.fft.fftfreq(64), np.fft.fftfreq(64), indexing="ij")
    return np.real(np.fft.ifft2(spectrum * np.exp(-2j * np.pi * (ky * shift[0] + kx * shift[1]))))


def test_cubic_warp_keeps_the_blood_out_of_the_pixels_next_to_a_pool() -> None:
    """Frames of a bright pool moved by fractional shifts and warped back with the exact field: the
    bilinear warp leaves a blur of the pool in the pixels 1-3 px outside its edge (where the
    myocardium is), the cubic B-spline warp less than half of it; integer shifts are exact either way."""
    shifts = [(0.5, 0.0), (0.3, -0.4), (-0.5, 0.5)]
    frames = np.stack([_bright_pool(s) for s in shifts]).astype(np.float32)
    field = np.zeros((2, len(shifts), 64, 64), dtype=np.float32)
    for k, (dy, dx) in enumerate(shifts):  # corrected(y) = frame(y + s) = reference(y)
        field[0, k], field[1, k] = dy, dx
    reference = _bright_pool()
    rows, cols = np.indices((64, 64))
    distance = np.hypot(rows - 32, cols - 30)
    ring = (distance > 9) & (distance <= 11)
    error = {order: float(np.mean(np.abs(warp_series(frames, field, order) - reference[None])[:, ring]))
             for order in (1, 3)}
    assert error[3] < 0.5 * error[1], error
    whole = np.broadcast_to(np.array([2.0, -1.0], dtype=np.float32)[:, None, None, None], (2, 1, 64, 64))
    moved = _bright_pool((2.0, -1.0))[None].astype(np.float32)
    for order in (1, 3):
        np.testing.assert_allclose(warp_series(moved, whole, order)[0, 8:56, 8:56], reference[8:56, 8:56], atol=1e-3)
    with pytest.raises(MotionCorrectionError, match="order"):
        warp_series(frames, field, 2)


def test_moco_interpolation_setting_reaches_the_final_warp(monkeypatch) -> None:
    from pydantic import ValidationError

    from perfline.gadgets import perfusion_preprocessing as preprocessing
    from perfline.gadgets.perfusion_items import ImageGeometry, SliceSeries
    from perfline.gadgets.perfusion_preprocessing import MotionCorrectionSettings, PerfusionMotionCorrection

    seen: list[int] = []
    correct = preprocessing.motion_correction.motion_correct_series

    def recording(*args, **kwargs):
        seen.append(kwargs["output_order"])
        return correct(*args, **kwargs)

    monkeypatch.setattr(preprocessing.motion_correction, "motion_correct_series", recording)
    frames = np.stack([_bright_pool((0.0, 0.0))] * 3 + [_bright_pool((0.6, -0.3))] * 3).astype(np.float32)
    item = SliceSeries(slice_index=0, data=frames, time_s=np.arange(6.0), units="signal", n_pd_frames=0,
                       geometry=ImageGeometry(field_of_view_mm=(120.0, 120.0, 8.0)))
    for interpolation in ("linear", "cubic"):
        PerfusionMotionCorrection(MotionCorrectionSettings(interpolation=interpolation)).process_item(item)
    assert seen == [1, 3]
    with pytest.raises(ValidationError, match="interpolation"):
        MotionCorrectionSettings(interpolation="quintic")
