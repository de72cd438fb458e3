"""The compiled box filter against scipy's uniform_filter1d (toolbox.box_filter)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from perfline.toolbox import box_filter
from perfline.toolbox.box_filter import box_filter_plane

needs_numba = pytest.mark.skipif(box_filter.numba is None, reason="numba not installed or disabled")


@needs_numba
@pytest.mark.parametrize("shape, width", [((2, 3, 17, 23), 7), ((4, 9, 12), 3), ((1, 5, 4), 9), ((6, 1), 3)])
def test_compiled_box_filter_equals_scipy(shape: tuple[int, ...], width: int) -> None:
    data = np.random.default_rng(0).standard_normal(shape).astype(np.float32) * 10.0
    reference = ndimage.uniform_filter1d(ndimage.uniform_filter1d(data, width, axis=-2, mode="nearest"), width,
                                         axis=-1, mode="nearest")
    result = box_filter_plane(data, width, compiled=True)
    assert result.dtype == np.float32 and result.shape == data.shape
    np.testing.assert_allclose(result, reference, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(box_filter_plane(data, width, compiled=False), reference)


def test_constant_image_stays_constant_and_a_spike_spreads_evenly() -> None:
    flat = np.full((1, 8, 9), 2.5, dtype=np.float32)
    np.testing.assert_allclose(box_filter_plane(flat, 5), flat, rtol=1e-6)
    spike = np.zeros((1, 9, 9), dtype=np.float32)
    spike[0, 4, 4] = 9.0
    out = box_filter_plane(spike, 3)
    np.testing.assert_allclose(out[0, 3:6, 3:6], np.ones((3, 3)), rtol=1e-6)
    assert np.count_nonzero(out) == 9


@pytest.mark.parametrize("data, width, match", [
    (np.zeros((4, 4), np.float32), 4, "positive odd"),
    (np.zeros((4, 4), np.float32), 0, "positive odd"),
    (np.zeros(4, np.float32), 3, r"\[\.\.\., rows, cols\]"),
])
def test_bad_input(data, width, match) -> None:
    with pytest.raises(ValueError, match=match):
        box_filter_plane(data, width)
