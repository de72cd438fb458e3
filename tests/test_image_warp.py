"""The compiled warp loops against scipy's map_coordinates (toolbox.image_warp)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from perfline.toolbox import image_warp
from perfline.toolbox.image_warp import WarpError, warp_frames

needs_numba = pytest.mark.skipif(image_warp.numba is None, reason="numba not installed or disabled")


def _series_and_field(seed: int = 0, shape: tuple[int, int, int] = (7, 23, 31)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    series = rng.random(shape, dtype=np.float32) * 100.0
    field = (rng.standard_normal((2,) + shape) * 2.0).astype(np.float32)
    field[0, :, :2] -= 6.0  # positions beyond every edge: clipped, edge values continued
    field[0, :, -2:] += 6.0
    field[1, :, :, :2] -= 6.0
    field[1, :, :, -2:] += 6.0
    return series, field


def _map_coordinates(series: np.ndarray, field: np.ndarray, order: int) -> np.ndarray:
    """The reference, written out independently of the module: scipy frame by frame, float64 positions."""
    n_rows, n_cols = series.shape[1:]
    rows, cols = np.mgrid[0:n_rows, 0:n_cols].astype(np.float64)
    return np.stack([ndimage.map_coordinates(series[f].astype(np.float64),
                                             [np.clip(rows + field[0, f], 0, n_rows - 1),
                                              np.clip(cols + field[1, f], 0, n_cols - 1)], order=order, mode="nearest")
                     for f in range(series.shape[0])])


@needs_numba
@pytest.mark.parametrize("order", [1, 3])
def test_compiled_warp_equals_map_coordinates(order: int) -> None:
    series, field = _series_and_field()
    reference = _map_coordinates(series, field, order)
    compiled = warp_frames(series, field[0], field[1], order, compiled=True)
    assert compiled.dtype == np.float32 and compiled.shape == series.shape
    np.testing.assert_allclose(compiled, reference, rtol=0, atol=1e-4)  # float32 output of values up to 100
    np.testing.assert_allclose(warp_frames(series, field[0], field[1], order, compiled=False), reference, rtol=0,
                               atol=1e-4)


@pytest.mark.parametrize("order", [1, 3])
def test_integer_shift_moves_the_image_exactly(order: int) -> None:
    series, _ = _series_and_field(1, (2, 16, 20))
    field = np.zeros((2,) + series.shape, dtype=np.float32)
    field[0] = 2.0  # sample 2 rows down, 3 columns left
    field[1] = -3.0
    warped = warp_frames(series, field[0], field[1], order)
    np.testing.assert_allclose(warped[:, :-2, 3:], series[:, 2:, :-3], atol=1e-3)
    np.testing.assert_allclose(warped[:, -2:, 3:], np.repeat(series[:, -1:, :-3], 2, axis=1), atol=1e-3)  # edge rows


def test_bilinear_half_pixel_is_the_mean_of_neighbours() -> None:
    series = np.arange(2 * 4 * 5, dtype=np.float32).reshape(2, 4, 5) ** 1.5
    half = np.full(series.shape, 0.5, dtype=np.float32)
    zero = np.zeros_like(half)
    warped = warp_frames(series, half, zero, 1)
    np.testing.assert_allclose(warped[:, :-1], 0.5 * (series[:, :-1] + series[:, 1:]), rtol=1e-6)


@pytest.mark.parametrize("series, rows, cols, order, match", [
    (np.zeros((2, 4, 4)), np.zeros((2, 4, 4)), np.zeros((2, 4, 4)), 2, "order must be one of"),
    (np.zeros((4, 4)), np.zeros((4, 4)), np.zeros((4, 4)), 1, r"\[time, rows >= 2, cols >= 2\]"),
    (np.zeros((2, 1, 4)), np.zeros((2, 1, 4)), np.zeros((2, 1, 4)), 1, r"\[time, rows >= 2, cols >= 2\]"),
    (np.zeros((2, 4, 4)), np.zeros((2, 4, 5)), np.zeros((2, 4, 4)), 1, "displacements must have the series' shape"),
])
def test_bad_input(series, rows, cols, order, match) -> None:
    with pytest.raises(WarpError, match=match):
        warp_frames(series, rows, cols, order)


@needs_numba
def test_warm_up_compiles_both_orders() -> None:
    assert image_warp.warm_compiled_warp() >= 0.0
    assert {signature for kernel in (image_warp._bilinear_c, image_warp._cubic_c) for signature in kernel.signatures}
