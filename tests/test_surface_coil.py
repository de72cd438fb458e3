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


def _phantom_with_moved_pd(shift_px: tuple[float, float]):
    """A motion-free simulated rest slice (1.5 T, noise-free, coil shading) whose PD frames sit
    ``shift_px`` away from its SR frames, as after motion correction of a breath-hold PD block."""
    import scipy.ndimage as ndi

    from perfline.simulator import study as st
    from perfline.simulator.image_study import coil_shading
    from perfline.toolbox.surface_coil import translate_image

    study = st.sample_study(5, kind="rest", field_strength_t=1.5, n_slices=1, n_frames=30)
    phantom = st.slice_phantom(study, 0)
    n_pd = study.n_pd_frames
    series = (phantom.clean * coil_shading(study)[None]).astype(np.float32)
    moved = series.copy()
    for frame in range(n_pd):
        moved[frame] = translate_image(series[frame], np.asarray(shift_px))
    core = ndi.binary_erosion(phantom.anatomy.labels == 2, iterations=1)
    return study, phantom, series, moved, core


def _core_gd_scale(pd_align: bool, series: np.ndarray, study, phantom, core: np.ndarray) -> tuple[float, np.ndarray]:
    """Slope of the gadget's myocardial Gd on the true Gd over the core, and the gadget's PD image."""
    from perfline.core.gadget import ChainContext
    from perfline.gadgets.perfusion_items import ImageGeometry, SliceSeries
    from perfline.gadgets.perfusion_preprocessing import SurfaceCoilCorrection, SurfaceCoilSettings
    from perfline.toolbox.gd_conversion import myocardial_gd

    item = SliceSeries(slice_index=0, data=series, time_s=phantom.time_s, units="signal",
                       n_pd_frames=study.n_pd_frames, geometry=ImageGeometry(field_of_view_mm=(360.0, 270.0, 8.0)))
    out = SurfaceCoilCorrection(SurfaceCoilSettings(align_pd=pd_align), context=ChainContext()).process_item(item)
    gd = myocardial_gd(out.data, study.myocardial_sequence)[:, core]
    truth = phantom.gd[study.n_pd_frames:][:, core]
    return float((gd * truth).sum() / (truth * truth).sum()), out.pd_image


def test_pd_frames_off_the_sr_frames_scale_the_gd_and_the_alignment_removes_it() -> None:
    """PD frames 1.4 px from the SR frames (motion correction registers them only among themselves):
    every myocardial pixel is divided by a neighbour's proton density and the study's Gd reads about
    8 % high; with ``align_pd`` the edge-direction translation finds the offset and the Gd is within
    3 % of the truth (noise-free; the exact-PD ratio is exact, the smoothed map +0.5 %)."""
    from perfline.toolbox.surface_coil import pd_to_sr_translation

    shift = (0.4, -1.3)
    study, phantom, series, moved, core = _phantom_with_moved_pd(shift)
    n_pd = study.n_pd_frames
    found = pd_to_sr_translation(moved[:n_pd].mean(axis=0), moved[n_pd:])
    assert np.abs(found + np.asarray(shift)).max() < 0.15  # moved(x + found) = series(x): found = -shift
    plain, _ = _core_gd_scale(False, moved, study, phantom, core)
    aligned, pd_image = _core_gd_scale(True, moved, study, phantom, core)
    assert abs(plain - 1.0) > 0.05
    assert abs(aligned - 1.0) < 0.03
    true_pd = series[:n_pd].mean(axis=0)
    assert np.abs(pd_image - true_pd)[core].mean() < 0.015 * true_pd[core].mean()


def test_pd_alignment_leaves_aligned_frames_untouched() -> None:
    from perfline.toolbox.surface_coil import pd_to_sr_translation

    study, phantom, series, _, core = _phantom_with_moved_pd((0.0, 0.0))
    n_pd = study.n_pd_frames
    assert np.abs(pd_to_sr_translation(series[:n_pd].mean(axis=0), series[n_pd:])).max() < 0.1
    plain, plain_pd = _core_gd_scale(False, series, study, phantom, core)
    aligned, aligned_pd = _core_gd_scale(True, series, study, phantom, core)
    assert aligned == plain
    np.testing.assert_array_equal(aligned_pd, plain_pd)


def test_pd_alignment_checks_its_inputs() -> None:
    from perfline.toolbox.surface_coil import pd_to_sr_translation

    with pytest.raises(ProtonDensityError, match="same size"):
        pd_to_sr_translation(np.ones((96, 96)), np.ones((4, 96, 80)))
    with pytest.raises(ProtonDensityError, match="too small"):
        pd_to_sr_translation(np.ones((40, 40)), np.ones((4, 40, 40)))
