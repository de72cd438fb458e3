"""Surface-coil correction: SR / smooth PD map removes a smooth receive profile."""

from __future__ import annotations

import numpy as np
import pytest

from perfline.toolbox.surface_coil import ProtonDensityError, coil_map_from_pd, normalize_by_pd


def smooth_profile(shape: tuple[int, int]) -> np.ndarray:
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    return 0.3 + np.exp(-((rows - 5) ** 2 + (cols - 10) ** 2) / (2 * 40.0**2))


def test_ratio_removes_coil_profile() -> None:
    shape = (96, 80)
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    body = ((rows - 48) / 40) ** 2 + ((cols - 40) / 34) ** 2 < 1
    profile = smooth_profile(shape)
    proton_density = np.where(body, 1.0, 0.0)
    sr_signal = np.where(body, 0.4, 0.0)  # uniform saturation-recovery magnetisation
    series = np.stack([profile * sr_signal * (1 + 0.1 * k) for k in range(3)])
    coil_map = coil_map_from_pd(profile * proton_density, box_size_px=7)
    ratio = normalize_by_pd(series, coil_map)
    inner = ((rows - 48) / 34) ** 2 + ((cols - 40) / 28) ** 2 < 1
    for k in range(3):
        values = ratio[k][inner]
        assert np.abs(values / (0.4 * (1 + 0.1 * k)) - 1).max() < 0.02
    # without the correction the profile varies by far more than 2 %
    raw = series[0][inner]
    assert raw.max() / raw.min() > 1.5


def test_map_is_positive_everywhere_and_smooth() -> None:
    rng = np.random.default_rng(1)
    image = np.zeros((64, 64))
    image[20:40, 20:40] = 1 + 0.2 * rng.standard_normal((20, 20))
    coil_map = coil_map_from_pd(image)
    assert np.all(coil_map > 0)
    assert np.std(coil_map[22:38, 22:38]) < 0.5 * np.std(image[22:38, 22:38])


@pytest.mark.parametrize(
    ("image", "match"),
    [(np.zeros((8, 8)), "no signal"), (np.full((8, 8), np.nan), "non-finite"), (np.ones(8), "2-D")],
    ids=["empty", "nan", "1d"])
def test_bad_pd(image: np.ndarray, match: str) -> None:
    with pytest.raises(ProtonDensityError, match=match):
        coil_map_from_pd(image)


def test_size_mismatch() -> None:
    with pytest.raises(ProtonDensityError, match="differ in size"):
        normalize_by_pd(np.ones((2, 4, 4)), np.ones((4, 5)))


def test_guided_map_keeps_tissue_proton_density_apart() -> None:
    rows, cols = np.mgrid[:48, :48]
    pool = (rows - 24) ** 2 + (cols - 24) ** 2 < 8**2
    wall = ~pool & ((rows - 24) ** 2 + (cols - 24) ** 2 < 11**2)
    proton_density = np.where(pool, 0.95, 0.80)
    guide = np.where(pool, 1.0, np.where(wall, 0.3, 0.5))  # e.g. the mean SR image
    plain = coil_map_from_pd(proton_density, box_size_px=7)
    guided = coil_map_from_pd(proton_density, box_size_px=7, guide=guide, guide_tolerance=0.05)
    assert np.abs(guided[wall] / 0.80 - 1).max() < 0.01
    assert np.abs(plain[wall] / 0.80 - 1).max() > 0.05  # the blood pool leaks in without a guide
