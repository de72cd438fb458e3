"""Temporal resampling: exact on piecewise-linear curves, irregular stamps, missed triggers."""

from __future__ import annotations

import numpy as np
import pytest

from perfline.toolbox.resample import (
    TimeStampError,
    resample_series,
    resample_to_uniform,
    uniform_grid,
)


def heartbeat_times(n: int, rr_s: np.ndarray | float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rr = np.broadcast_to(np.asarray(rr_s, dtype=float), (n - 1,))
    return 0.3 + np.concatenate([[0.0], np.cumsum(rr * (1 + 0.05 * rng.standard_normal(n - 1)))])


def test_grid_spacing_and_bounds() -> None:
    times = heartbeat_times(40, 0.9)
    grid = uniform_grid(times, 0.5)
    assert grid[0] == times[0]
    assert np.allclose(np.diff(grid), 0.5)
    assert grid[-1] <= times[-1] and grid[-1] + 0.5 > times[-1]


def test_linear_curve_exact_with_irregular_stamps() -> None:
    times = heartbeat_times(30, np.linspace(0.6, 1.3, 29), seed=1)
    slope = np.arange(12, dtype=float).reshape(3, 4)
    data = 2.0 + slope[None] * times[:, None, None]
    grid, out = resample_to_uniform(data, times, 0.5)
    expected = 2.0 + slope[None] * grid[:, None, None]
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)


def test_piecewise_linear_bridges_missed_trigger() -> None:
    times = heartbeat_times(25, 0.8, seed=2)
    times = np.delete(times, [10, 17, 18])  # missed triggers: gaps of two and three beats
    values = np.sin(times)  # the curve is linear between the remaining stamps by construction
    grid, out = resample_to_uniform(values[:, None], times, 0.5)
    np.testing.assert_allclose(out[:, 0], np.interp(grid, times, values), atol=1e-12)
    # a grid point inside the 3-beat gap lies on the chord between the gap's ends
    inside = (grid > times[15]) & (grid < times[16])
    assert inside.any()
    chord = values[15] + (values[16] - values[15]) * (grid[inside] - times[15]) / (times[16] - times[15])
    np.testing.assert_allclose(out[inside, 0], chord, atol=1e-12)


def test_smooth_curve_error_within_linear_interpolation_bound() -> None:
    times = heartbeat_times(60, 1.0, seed=3)
    tau = 5.0
    curve = lambda t: np.exp(-t / tau)  # noqa: E731 - analytic test curve
    grid, out = resample_to_uniform(curve(times)[:, None].astype(np.float64), times, 0.5)
    max_step = np.diff(times).max()
    bound = max_step**2 / 8 / tau**2  # |f''| <= 1 / tau^2
    assert np.max(np.abs(out[:, 0] - curve(grid))) <= bound


def test_start_on_first_sr_frame() -> None:
    times = np.arange(10, dtype=float)
    grid = uniform_grid(times, 0.5, start_s=3.0)
    assert grid[0] == 3.0 and grid[-1] == 9.0 and grid.size == 13


@pytest.mark.parametrize(
    ("times", "match"),
    [
        (np.array([0.0, 1.0, 1.0, 2.0]), "increase strictly"),
        (np.array([0.0, 2.0, 1.0, 3.0]), "increase strictly"),
        (np.array([0.0, np.nan, 2.0, 3.0]), "finite"),
        (np.array([0.0, 1.0, 2.0]), "expected 4 time stamps"),
    ],
    ids=["repeated", "decreasing", "nan", "wrong-length"],
)
def test_bad_time_stamps(times: np.ndarray, match: str) -> None:
    with pytest.raises(TimeStampError, match=match):
        resample_series(np.zeros((4, 2)), times, np.array([0.5]))


def test_no_extrapolation_and_no_nan_data() -> None:
    times = np.arange(4, dtype=float)
    with pytest.raises(ValueError, match="no extrapolation"):
        resample_series(np.zeros((4, 2)), times, np.array([3.5]))
    data = np.zeros((4, 2))
    data[1, 1] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        resample_series(data, times, np.array([0.5]))


def test_interpolation_matrix_is_np_interp() -> None:
    from perfline.toolbox.resample import interpolation_matrix

    rng = np.random.default_rng(4)
    source = np.cumsum(rng.uniform(0.4, 1.1, 30))
    target = np.linspace(source[0] - 1.0, source[-1] + 1.0, 77)
    values = rng.normal(size=(30, 3))
    matrix = interpolation_matrix(source, target)
    assert matrix.shape == (77, 30)
    np.testing.assert_allclose(matrix @ values, np.stack([np.interp(target, source, v) for v in values.T], 1),
                               atol=1e-12)
    # left=0: a curve that starts from zero before its first sample
    zero_before = interpolation_matrix(source, target, left=0.0) @ values[:, 0]
    np.testing.assert_allclose(zero_before, np.interp(target, source, values[:, 0], left=0.0), atol=1e-12)
    with pytest.raises(ValueError, match="left must be"):
        interpolation_matrix(source, target, left=1.0)


def test_temporal_resample_passes_on_the_acquisition_times() -> None:
    """temporal-resample keeps each series' acquisition times (and the AIF's acquired frames) next to
    the uniform grid: flow-map models the sampling with them."""
    from perfline.gadgets.perfusion_items import AifSeries, ImageGeometry, SliceSeries
    from perfline.gadgets.perfusion_preprocessing import TemporalResample

    geometry = ImageGeometry(field_of_view_mm=(100.0, 100.0, 8.0))
    aif_times = 0.1 + 0.62 * np.arange(40)
    slice_times = aif_times + 0.3
    aif_data = np.random.default_rng(0).uniform(0, 1, (1, 40, 4, 4)).astype(np.float32)
    aif = AifSeries(data=aif_data, time_s=aif_times, echo_times_ms=(1.0,), units="gd_mmol_l", n_pd_frames=0,
                    geometry=geometry)
    one = SliceSeries(slice_index=0, data=np.ones((40, 3, 3), dtype=np.float32), time_s=slice_times,
                      units="gd_mmol_l", n_pd_frames=0, geometry=geometry)
    out_aif, out_slice = list(TemporalResample().process(iter([one, aif])))
    assert isinstance(out_aif, AifSeries) and isinstance(out_slice, SliceSeries)
    np.testing.assert_allclose(np.diff(out_slice.time_s), 0.5)
    np.testing.assert_array_equal(out_slice.acquired_time_s, slice_times)
    np.testing.assert_array_equal(out_aif.acquired_time_s, aif_times)
    np.testing.assert_array_equal(out_aif.acquired_data, aif_data)
    assert out_aif.data.shape[1] == out_aif.time_s.size != 40
