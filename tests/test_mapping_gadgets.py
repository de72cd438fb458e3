"""aif-extract and flow-map gadgets (perfline.gadgets.mapping) on a small synthetic scan."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np
import pytest

from perfline.core.gadget import GadgetError
from perfline.gadgets.mapping import (
    AifExtract, AifExtractSettings, FlowMap, FlowMapSettings, image_point_mm, image_rc_of_point,
)
from perfline.gadgets.perfusion_items import (
    AifCurve, AifSeries, FlowMaps, ImageGeometry, SliceSegmentation, SliceSeries,
)
from perfline.toolbox import flow_models as fm

GEOMETRY = ImageGeometry(field_of_view_mm=(360.0, 270.0, 8.0))
DT = 0.5
N = 60


def _blood(time_s: np.ndarray) -> np.ndarray:
    x = np.clip(time_s - 8.0, 0.0, None)
    bolus = x**3 * np.exp(-x / 1.5)
    return 5.0 * bolus / bolus.max() + 0.3 * (1.0 - np.exp(-x / 8.0))


def _lv_rv_pools(time_s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(blood Gd [time, 32, 32] of an LV pool and an RV pool whose bolus comes 3 s earlier, the LV mask)."""
    rows, cols = np.mgrid[:32, :32]
    lv = (rows - 16) ** 2 + (cols - 18) ** 2 <= 16
    rv = (rows - 16) ** 2 / 9 + (cols - 9) ** 2 / 4 <= 1
    gd = np.zeros((time_s.size, 32, 32))
    gd[:, lv] = _blood(time_s)[:, None]
    gd[:, rv] = _blood(time_s + 3.0)[:, None]
    return gd, lv


def _aif_series() -> AifSeries:
    # irregular heartbeats: the gadget resamples the curve onto a uniform grid
    time_s = np.cumsum(np.r_[0.0, np.random.default_rng(0).uniform(0.45, 0.55, N - 1)])
    gd, _ = _lv_rv_pools(time_s)
    gd += np.random.default_rng(1).normal(0.0, 0.05, gd.shape)
    return AifSeries(data=gd[None].astype(np.float32), time_s=time_s, echo_times_ms=(1.0,), units="gd_mmol_l",
                     n_pd_frames=0, geometry=GEOMETRY)


def _slice(index: int, mbf: float) -> SliceSeries:
    time_s = 0.2 + DT * np.arange(N)  # read 0.2 s after the AIF in each beat
    plasma = _blood(time_s) / (1 - 0.42)
    plasma[time_s < 8.0] = 0.0
    curve = fm.fermi_tissue_curves(plasma, DT, mbf, 0.4, 3.0, 0.5)[0]
    data = np.broadcast_to(curve[:, None, None], (N, 6, 6)).astype(np.float32)
    return SliceSeries(slice_index=index, data=data, time_s=time_s, units="gd_mmol_l", n_pd_frames=0,
                       geometry=GEOMETRY)


def test_aif_then_maps_per_slice():
    (aif,) = list(AifExtract().process(iter([_aif_series()])))
    assert isinstance(aif, AifCurve)
    assert aif.mask[16, 18] and not aif.mask[16, 9]
    np.testing.assert_allclose(np.diff(aif.time_s), 0.5)
    assert 14 <= aif.foot_index <= 17
    assert abs(aif.blood_gd_mmol_l.max() - 5.0) < 0.3
    slices = [_slice(0, 1.0), _slice(1, 3.0)]
    # a slice before the AIF waits for it; the AIF is passed on for the report
    outputs = list(FlowMap(FlowMapSettings(model="fermi")).process(iter([slices[0], aif, slices[1]])))
    assert isinstance(outputs[0], AifCurve)
    maps = [item for item in outputs if isinstance(item, FlowMaps)]
    assert [m.slice_index for m in maps] == [0, 1]
    for flow, truth in zip(maps, (1.0, 3.0)):
        assert flow.mbf_ml_min_g.shape == (6, 6)
        assert abs(np.median(flow.mbf_ml_min_g) / truth - 1) < 0.1


def test_maps_only_the_dilated_heart_once_the_segmentation_arrives():
    (aif,) = list(AifExtract().process(iter([_aif_series()])))
    labels = np.zeros((6, 6), dtype=np.uint8)
    labels[2, 2] = 2
    segmentation = SliceSegmentation(slice_index=0, labels=labels, rv_insertion_deg=120.0, lv_center_rc=(2.0, 2.0))
    gadget = FlowMap(FlowMapSettings(model="fermi", heart_mask_px=1, mask_labels=(1, 2, 3)))
    outputs = list(gadget.process(iter([aif, _slice(0, 2.0), segmentation])))
    # the segmentation passes on for the report; the map waits for it and covers the dilated heart
    # (one 4-connected dilation of one pixel: a 5-pixel cross)
    assert [type(item) for item in outputs] == [AifCurve, SliceSegmentation, FlowMaps]
    mbf = outputs[2].mbf_ml_min_g
    assert np.isfinite(mbf).sum() == 5 and np.isfinite(mbf[2, 1:4]).all() and np.isfinite(mbf[1:4, 2]).all()
    assert abs(np.nanmedian(mbf) / 2.0 - 1) < 0.1


AIF_GEOMETRY = ImageGeometry(field_of_view_mm=(192.0, 192.0, 10.0), position=(0.0, 0.0, -15.0),
                             pixel_spacing_mm=(6.0, 6.0))
# the myocardial slice: 3 mm pixels, 25 mm from the AIF slice along the normal, centre shifted in plane
SLICE_GEOMETRY = ImageGeometry(field_of_view_mm=(192.0, 192.0, 8.0), position=(6.0, -3.0, 10.0),
                               pixel_spacing_mm=(3.0, 3.0))


def _aif_series_with_decoy() -> AifSeries:
    """_aif_series on 6 mm pixels plus a larger pool with the LV's timing below the RV, which the
    dynamics-only detection takes for the LV (fresh study 2**30 + 105)."""
    series = _aif_series()
    gd = np.array(series.data[0], dtype=np.float64)
    rows, cols = np.mgrid[:32, :32]
    decoy = (rows >= 22) & (rows < 32) & (cols >= 2) & (cols < 14)
    gd[:, decoy] += _blood(series.time_s)[:, None]
    return AifSeries(data=gd[None].astype(np.float32), time_s=series.time_s, echo_times_ms=(1.0,),
                     units="gd_mmol_l", n_pd_frames=0, geometry=AIF_GEOMETRY)


def _myocardial_slice_and_segmentation(index: int, lv_center_rc: tuple[float, float]):
    labels = np.zeros((64, 64), dtype=np.uint8)
    if np.all(np.isfinite(lv_center_rc)):
        rows, cols = np.mgrid[:64, :64]
        labels[np.hypot(rows - lv_center_rc[0], cols - lv_center_rc[1]) <= 7] = 1  # 21 mm: the AIF LV's radius
    series = SliceSeries(slice_index=index, data=np.zeros((N, 64, 64), np.float32), time_s=DT * np.arange(N),
                         units="gd_mmol_l", n_pd_frames=0, geometry=SLICE_GEOMETRY)
    return series, SliceSegmentation(slice_index=index, labels=labels, rv_insertion_deg=120.0,
                                     lv_center_rc=lv_center_rc)


def test_image_points_project_back_into_an_oblique_plane():
    read = np.array([0.8, 0.6, 0.0])
    phase = np.array([-0.36, 0.48, 0.8])
    geometry = ImageGeometry(field_of_view_mm=(100.0, 80.0, 8.0), position=(10.0, -20.0, 30.0),
                             read_dir=tuple(read), phase_dir=tuple(phase), slice_dir=tuple(np.cross(read, phase)),
                             pixel_spacing_mm=(2.0, 2.5))
    point = image_point_mm(geometry, (40, 40), 12.5, 30.0)
    assert image_rc_of_point(geometry, (40, 40), point) == pytest.approx((12.5, 30.0))
    # a point off the plane projects onto its foot
    normal = np.asarray(geometry.slice_dir)
    assert image_rc_of_point(geometry, (40, 40), point + 25.0 * normal) == pytest.approx((12.5, 30.0))
    # the AIF LV centre (row 16, col 18 of the 6 mm AIF grid) seen from the 3 mm myocardial slice
    lv = image_point_mm(AIF_GEOMETRY, (32, 32), 16.0, 18.0)
    assert image_rc_of_point(SLICE_GEOMETRY, (64, 64), lv) == pytest.approx((33.5, 34.5))


def test_aif_waits_for_the_cnn_lv_and_takes_the_pool_there():
    aif_series = _aif_series_with_decoy()
    slice_0, no_lv = _myocardial_slice_and_segmentation(0, (np.nan, np.nan))  # the CNN found no LV here
    slice_1, with_lv = _myocardial_slice_and_segmentation(1, (33.5, 34.5))
    outputs = list(AifExtract().process(iter([aif_series, slice_0, no_lv, slice_1, with_lv])))
    # nothing lost, slices and segmentations pass at once, the AIF follows the first LV centre
    assert [type(item) for item in outputs] == [SliceSeries, SliceSegmentation, SliceSeries, SliceSegmentation,
                                                AifCurve]
    aif = outputs[-1]
    assert aif.mask[16, 18] and aif.mask.sum() >= 8
    rows, cols = np.nonzero(aif.mask)
    assert np.all(np.hypot(rows - 16, cols - 18) <= 5)
    assert abs(aif.blood_gd_mmol_l.max() - 5.0) < 0.3


def test_aif_without_a_cnn_lv_uses_the_dynamics_alone():
    aif_series = _aif_series_with_decoy()
    slice_0, no_lv = _myocardial_slice_and_segmentation(0, (np.nan, np.nan))
    # no segmentation at all (a chain without the CNN): the AIF comes at the end of the stream
    outputs = list(AifExtract().process(iter([aif_series, slice_0])))
    assert [type(item) for item in outputs] == [SliceSeries, AifCurve]
    decoy_choice = outputs[-1].mask
    assert decoy_choice[22:, :14].sum() >= 0.9 * decoy_choice.sum()  # the decoy: what the hint fixes above
    # the CNN found no LV on any slice: the same, after the segmentations
    outputs = list(AifExtract().process(iter([aif_series, slice_0, no_lv])))
    assert [type(item) for item in outputs] == [SliceSeries, SliceSegmentation, AifCurve]
    np.testing.assert_array_equal(outputs[-1].mask, decoy_choice)
    # an empty slice keeps the crop's centre (finite) but has no LV pixel: not a hint either
    empty = SliceSegmentation(slice_index=0, labels=np.zeros((64, 64), np.uint8), rv_insertion_deg=float("nan"),
                              lv_center_rc=(40.0, 12.0))
    outputs = list(AifExtract().process(iter([aif_series, slice_0, empty])))
    assert [type(item) for item in outputs] == [SliceSeries, SliceSegmentation, AifCurve]
    np.testing.assert_array_equal(outputs[-1].mask, decoy_choice)
    # lv_hint off: the AIF at once, before anything else
    _, with_lv = _myocardial_slice_and_segmentation(0, (33.5, 34.5))
    outputs = list(AifExtract(AifExtractSettings(lv_hint=False)).process(iter([aif_series, slice_0, with_lv])))
    assert [type(item) for item in outputs] == [AifCurve, SliceSeries, SliceSegmentation]
    np.testing.assert_array_equal(outputs[0].mask, decoy_choice)


def test_errors_name_the_gadget_and_the_problem():
    signal = _aif_series()
    wrong = AifSeries(data=signal.data, time_s=signal.time_s, echo_times_ms=(1.0,), units="signal",
                      n_pd_frames=0, geometry=GEOMETRY)
    with pytest.raises(GadgetError, match="units 'gd_mmol_l'"):
        list(AifExtract().process(iter([wrong])))
    # while the AIF waits for the CNN's LV, a wrong AIF series fails on arrival, not at the end
    outputs = AifExtract().process(iter([wrong, _slice(0, 1.0)]))
    with pytest.raises(GadgetError, match="units 'gd_mmol_l'"):
        next(outputs)
    with pytest.raises(GadgetError, match="no AIF curve"):
        list(FlowMap().process(iter([_slice(0, 1.0)])))


def test_flow_map_images_carry_the_data_roles():
    import ismrmrd

    from perfline.gadgets.mapping import FlowMapImages

    (aif,) = list(AifExtract().process(iter([_aif_series()])))
    mbf = np.full((6, 6), np.nan, dtype=np.float32)
    mbf[2, 2] = 2.5
    flow = FlowMaps(slice_index=1, model="fermi", mbf_ml_min_g=mbf, geometry=GEOMETRY)
    images = list(FlowMapImages().process(iter([aif, flow])))
    roles = [ismrmrd.Meta.deserialize(image.attribute_string)["GADGETRON_DataRole"] for image in images]
    assert roles == ["AIFMASK", "Flow_Map"]
    assert images[0].data.squeeze().astype(bool).sum() == aif.mask.sum()
    values = images[1].data.squeeze()
    assert values[2, 2] == pytest.approx(2.5) and np.count_nonzero(values) == 1  # NaN sent as 0
    assert images[1].slice == 1


def test_client_hematocrit_overrides_the_setting_and_scales_the_plasma_aif():
    from perfline.core.gadget import ChainContext

    (default,) = list(AifExtract().process(iter([_aif_series()])))
    assert default.hematocrit == pytest.approx(0.42)
    context = ChainContext(parameters={"hematocrit": 0.35})
    (measured,) = list(AifExtract(context=context).process(iter([_aif_series()])))
    assert measured.hematocrit == pytest.approx(0.35)
    np.testing.assert_allclose(measured.blood_gd_mmol_l, default.blood_gd_mmol_l)  # blood curve unchanged
    np.testing.assert_allclose(measured.plasma_gd_mmol_l, default.plasma_gd_mmol_l * (1 - 0.42) / (1 - 0.35))
    # the plasma AIF is lower with a lower hematocrit: the same tissue curve maps to a higher MBF
    maps = {}
    for name, aif in (("default", default), ("measured", measured)):
        outputs = list(FlowMap(FlowMapSettings(model="fermi")).process(iter([aif, _slice(0, 2.0)])))
        maps[name] = float(np.median(outputs[-1].mbf_ml_min_g))
    assert maps["measured"] / maps["default"] == pytest.approx((1 - 0.35) / (1 - 0.42), rel=0.05)


@pytest.mark.parametrize("value", [42, 0.1, 0.75, "0.4", True, None])
def test_client_hematocrit_out_of_range_is_a_clear_error(value):
    from perfline.core.gadget import ChainContext

    context = ChainContext(parameters={"hematocrit": value})
    with pytest.raises(GadgetError, match="'hematocrit' must be a fraction between 0.2 and 0.7"):
        list(AifExtract(context=context).process(iter([_aif_series()])))


def _rest_curves_of_simulated_study(noise_sd: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Noisy BTEX tissue curves [P, T] of a simulated rest study's own parameters (seed 2**30 + 2,
    PS 1.16, Vp 0.092, Visf 0.17, delay 0.57 s), its plasma AIF on the 0.5 s grid, true MBF [P]."""
    from perfline.simulator import dynamics
    from perfline.simulator.study import sample_study

    study = sample_study(2**30 + 2, kind="rest")
    tissue, hematocrit = study.tissue, study.bolus.hematocrit
    grid = np.arange(0.0, 60.0, DT)
    plasma = dynamics.blood_curves(grid, study.bolus)["lv"] / (1.0 - hematocrit)
    mbf = np.repeat([0.6, 0.8, 1.0, 1.2, 1.5], 8)
    ones = np.ones(mbf.size)
    curves = fm.btex_tissue_curves(plasma, DT, mbf, tissue.ps_ml_min_g * ones, tissue.vp * ones,
                                   tissue.visf * ones, tissue.delay_s)
    return curves + np.random.default_rng(3).normal(0.0, noise_sd, curves.shape), plasma, mbf


def test_flow_map_search_finds_rest_flow_of_noisy_curves():
    # the toolbox's coarse search (every second grid point) sends some of these rest pixels into a
    # far basin (MBF 1.5-4x the truth: docs/integration.md, error attribution); flow-map searches
    # every point of the flow axes
    from perfline.gadgets.mapping import _btex_settings
    from perfline.toolbox.btex import fit_btex_curves

    curves, plasma, mbf = _rest_curves_of_simulated_study(0.02)
    fitted = fit_btex_curves(curves, plasma, DT, _btex_settings(FlowMapSettings()))["mbf_ml_min_g"]
    error = fitted / mbf - 1.0
    assert np.median(np.abs(error)) < 0.1
    assert np.mean(np.abs(error) > 0.4) < 0.1


def _sampled_stress_scan() -> tuple[AifCurve, SliceSeries, np.ndarray, np.ndarray]:
    """A noise-free stress scan acquired once per heartbeat (RR 0.62 s, slice 0.3 s after the AIF; BTEX Fp 3,
    PS 1, Vp 0.08, Visf 0.25, delay 0.6 s) through temporal-resample and aif-extract: (AifCurve, resampled
    slice, AIF acquisition times, slice acquisition times)."""
    from perfline.gadgets.perfusion_preprocessing import TemporalResample

    fine_dt = 1 / 16
    fine_time = np.arange(0.0, 45.0, fine_dt)
    aif_times = 0.1 + 0.62 * np.arange(68)
    slice_times = aif_times + 0.3
    gd, _ = _lv_rv_pools(aif_times)
    aif_series = AifSeries(data=gd[None].astype(np.float32), time_s=aif_times, echo_times_ms=(1.0,),
                           units="gd_mmol_l", n_pd_frames=0, geometry=GEOMETRY)
    plasma = _blood(fine_time) / (1 - 0.42)
    plasma[fine_time < 8.0] = 0.0
    curve = fm.btex_tissue_curves(plasma, fine_dt, 3.0, 1.0, 0.08, 0.25, 0.6)[0]
    data = np.broadcast_to(np.interp(slice_times, fine_time, curve)[:, None, None], (slice_times.size, 4, 4))
    tissue = SliceSeries(slice_index=0, data=data.astype(np.float32), time_s=slice_times, units="gd_mmol_l",
                         n_pd_frames=0, geometry=GEOMETRY)
    resampled = list(TemporalResample().process(iter([aif_series, tissue])))
    aif = next(item for item in AifExtract().process(iter(resampled[:1])) if isinstance(item, AifCurve))
    return aif, resampled[1], aif_times, slice_times


def _median_flow(settings: FlowMapSettings, aif: AifCurve, tissue: SliceSeries) -> float:
    (maps,) = [item for item in FlowMap(settings).process(iter([aif, tissue])) if isinstance(item, FlowMaps)]
    return float(np.median(maps.mbf_ml_min_g))


def test_acquired_samples_reach_flow_map_and_the_sampled_table_reads_high_flow():
    """temporal-resample -> aif-extract -> flow-map on a scan acquired once per heartbeat (RR 0.62 s,
    slice 0.3 s after the AIF): the AifCurve carries the AIF at its acquisition times (the grid
    curve is their linear interpolation), the resampled slice its acquisition times, and flow-map
    with ``aif_upsample = 4`` (fine AIF table, tissue sampling modelled) reads a noise-free stress
    flow of 3 ml/min/g within 6 %, the grid AIF's table more than 10 % high (+46 %). Visf 0.25 is a
    node of flow-map's Visf axis: at Visf 0.2, between nodes, the sampled table reads +9.6 % (the
    table's Visf interpolation, docs/mapping.md)."""
    aif, tissue, aif_times, slice_times = _sampled_stress_scan()
    np.testing.assert_array_equal(aif.sample_time_s, aif_times)
    np.testing.assert_allclose(np.interp(aif.time_s, aif.sample_time_s, aif.sample_blood_gd_mmol_l),
                               aif.blood_gd_mmol_l, atol=1e-6)
    np.testing.assert_array_equal(tissue.acquired_time_s, slice_times)
    read = {upsample: _median_flow(FlowMapSettings(aif_upsample=upsample, use_segmentation=False,
                                                   delay_smoothing_px=0.0), aif, tissue) / 3.0 - 1.0
            for upsample in (1, 4)}
    assert abs(read[4]) < 0.04, read
    assert read[1] > 0.10, read


def test_aif_smoothing_setting_reaches_the_fine_table_and_leaves_a_noise_free_aif_alone(monkeypatch):
    """``aif_smoothing = 'gcv'`` is passed to the fine-grid AIF of the sampled table; on the noise-free scan
    above GCV chooses (almost) no smoothing and the flow read is the interpolating spline's within 1 %;
    without ``aif_upsample`` > 1 the setting is refused (it would be ignored)."""
    import perfline.gadgets.mapping as mapping_gadgets
    from pydantic import ValidationError

    seen: list[str] = []
    spline = mapping_gadgets.aif_on_fine_grid

    def recording(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs.get("smoothing", "none"))
        return spline(*args, **kwargs)

    monkeypatch.setattr(mapping_gadgets, "aif_on_fine_grid", recording)
    aif, tissue, _, _ = _sampled_stress_scan()
    read = {smoothing: _median_flow(FlowMapSettings(aif_upsample=4, aif_smoothing=smoothing, use_segmentation=False,
                                                    delay_smoothing_px=0.0), aif, tissue)
            for smoothing in ("none", "gcv")}
    assert seen == ["none", "gcv"]
    assert abs(read["gcv"] / read["none"] - 1.0) < 0.01, read
    with pytest.raises(ValidationError, match="aif_upsample >= 2"):
        FlowMapSettings(aif_smoothing="gcv")


def _two_echo_aif_series(seed: int, sigma: float, sequence: Any) -> tuple[AifSeries, np.ndarray]:
    """Dual-echo magnitude AIF series (2 PD frames, 70 SR frames every 0.5 s) of an LV and an RV pool
    with the simulator's signal model: blood SR / PD from the Bloch table, echo decay exp(-TE R2*) with
    R2* = 25 + 26 Gd 1/s (3 T), complex Gaussian noise of SD ``sigma`` -> Rician magnitudes."""
    from perfline.toolbox.bloch import sr_and_pd_signal

    rng = np.random.default_rng(seed)
    n_pd, n_sr = 2, 70
    time_s = 0.5 * np.arange(n_pd + n_sr)
    rows, cols = np.mgrid[:32, :32]
    lv = (rows - 16) ** 2 + (cols - 19) ** 2 <= 5
    rv = (rows - 16) ** 2 / 9 + (cols - 9) ** 2 / 4 <= 1
    gd = np.zeros((n_pd + n_sr, 32, 32))
    gd[n_pd:, lv] = _two_echo_blood(time_s[n_pd:])[:, None]
    gd[n_pd:, rv] = _two_echo_blood(time_s[n_pd:] + 3.0)[:, None]
    sr, pd = sr_and_pd_signal(gd.ravel(), sequence, "blood")
    signal = np.where(np.arange(n_pd + n_sr)[:, None, None] < n_pd, pd.reshape(gd.shape), sr.reshape(gd.shape))
    echoes = []
    for te_ms in (0.76, 1.76):
        clean = signal * np.exp(-te_ms * 1e-3 * (25.0 + 26.0 * gd))
        echoes.append(np.abs(clean + sigma * (rng.normal(size=gd.shape) + 1j * rng.normal(size=gd.shape))))
    series = AifSeries(data=np.stack(echoes).astype(np.float32), time_s=time_s, echo_times_ms=(0.76, 1.76),
                       units="signal", n_pd_frames=n_pd, geometry=ImageGeometry(field_of_view_mm=(180.0, 180.0, 8.0)))
    return series, lv


def _two_echo_blood(time_s: np.ndarray) -> np.ndarray:
    x = np.clip(time_s - 8.0, 0.0, None)
    bolus = x**3 * np.exp(-x / 1.5)
    return 6.0 * bolus / bolus.max() + 0.8 * (1.0 - np.exp(-x / 4.0)) * np.exp(-x / 60.0)


def test_aif_tail_is_unbiased_when_the_blood_table_continues_below_zero():
    """Noisy two-echo AIF through aif-t2star -> surface-coil-correction -> gd-conversion -> aif-extract:
    per-pixel baseline SNR about 1 (SR of blood at Gd 0 is 3 % of its PD), as in the simulator. The
    clipped table rectifies the pre-bolus noise and the baseline subtraction takes it off every frame
    (tail about 0.95 of the truth); continued below Gd = 0 the tail and peak are unbiased."""
    import ismrmrd.xsd as xsd

    from perfline.core.gadget import ChainContext
    from perfline.gadgets.perfusion_preprocessing import AifT2StarCorrection, GdConversion, SurfaceCoilCorrection
    from perfline.simulator import mrd
    from perfline.simulator import study as st
    from perfline.toolbox import gd_conversion

    xml = mrd.build_header(st.sample_study(2, n_slices=1, n_frames=10, field_strength_t=3.0))
    context = ChainContext(header=xsd.CreateFromDocument(xml), header_xml=xml)
    sequence = gd_conversion.sequence_from_header(context.header, gd_conversion.AIF_ENCODING)
    tails: dict[bool, list[float]] = {False: [], True: []}
    peaks: dict[bool, list[float]] = {False: [], True: []}
    for seed in range(12):
        series, lv = _two_echo_aif_series(seed, 0.002, sequence)
        item = AifT2StarCorrection(context=context).process_item(series)
        item = SurfaceCoilCorrection(context=context).process_item(item)
        item = GdConversion(context=context).process_item(item)
        for continued in (False, True):
            gadget = AifExtract(AifExtractSettings(continue_below_zero=continued), context=context)
            (curve,) = list(gadget.process(iter([item])))
            assert curve.mask.sum() >= 4 and np.all(lv[curve.mask])
            truth = _two_echo_blood(curve.time_s)
            tails[continued].append(curve.blood_gd_mmol_l[-10:].mean() / truth[-10:].mean())
            peaks[continued].append(curve.blood_gd_mmol_l.max() / truth.max())
            assert curve.sample_blood_gd_mmol_l is None  # not resampled: no acquired samples
    assert abs(np.mean(tails[True]) - 1.0) < 0.03
    assert abs(np.mean(peaks[True]) - 1.0) < 0.03
    assert np.mean(tails[False]) < np.mean(tails[True]) - 0.03


def test_sampled_table_delay_nodes_are_the_fine_step():
    from perfline.gadgets.mapping import FlowMap, FlowMapSettings

    for upsample, step, stride in ((4, 0.125, 4), (2, 0.25, 2), (8, 0.0625, 8)):
        settings = FlowMap(FlowMapSettings(aif_upsample=upsample))._sampled_settings(0.5)
        assert np.isclose(settings.delay_step_s, step) and settings.coarse_stride[4] == stride


def _septal_slice(rv_label: int = 3) -> tuple[SliceSeries, SliceSegmentation]:
    """A 12 x 12 slice: RV blood (rows 0-3, its bolus 3 s before the LV's, labelled ``rv_label``),
    myocardium (rows 4-7, BTEX at rest, Fp 1.0; rows 4-5 hold 3 % RV blood as the septum next to a
    blurred RV does), LV blood (rows 8-11)."""
    time_s = DT * np.arange(N)
    plasma = _blood(time_s) / (1 - 0.42)
    plasma[time_s < 8.0] = 0.0
    tissue = fm.btex_tissue_curves(plasma, DT, np.array([1.0]), np.array([1.3]), np.array([0.07]),
                                   np.array([0.25]), 0.5)[0]
    gd = np.zeros((N, 12, 12))
    gd[:, :4] = _blood(time_s + 3.0)[:, None, None]
    gd[:, 4:8] = tissue[:, None, None]
    gd[:, 4:6] += 0.03 * _blood(time_s + 3.0)[:, None, None]
    gd[:, 8:] = _blood(time_s)[:, None, None]
    labels = np.zeros((12, 12), dtype=np.uint8)
    labels[:4], labels[4:8], labels[8:] = rv_label, 2, 1
    series = SliceSeries(slice_index=0, data=gd.astype(np.float32), time_s=time_s, units="gd_mmol_l",
                         n_pd_frames=0, geometry=GEOMETRY)
    return series, SliceSegmentation(slice_index=0, labels=labels, rv_insertion_deg=120.0, lv_center_rc=(10.0, 6.0))


def _flow_maps(settings: FlowMapSettings, *items: Any) -> FlowMaps:
    (maps,) = [item for item in FlowMap(settings).process(iter(items)) if isinstance(item, FlowMaps)]
    return maps


def test_rv_spillover_setting_takes_the_rv_blood_out_of_the_septum(caplog):
    (aif,) = list(AifExtract().process(iter([_aif_series()])))
    series, segmentation = _septal_slice()

    def septal_and_far(settings: FlowMapSettings) -> tuple[float, float]:
        maps = _flow_maps(settings, aif, series, segmentation)
        return float(np.median(maps.mbf_ml_min_g[4:6])), float(np.median(maps.mbf_ml_min_g[6:8]))

    septal, far = septal_and_far(FlowMapSettings())
    assert septal > 1.2 and abs(far - 1.0) < 0.08
    with caplog.at_level(logging.INFO):
        septal, far_with = septal_and_far(FlowMapSettings(spillover_labels=(3,), spillover_reach_px=3.5))
    assert "blood spill-over pool label 3: " in caplog.text  # the label, not the regressor's index
    assert abs(septal - 1.0) < 0.08
    assert abs(far_with - far) < 0.01


@pytest.mark.parametrize("update", [
    dict(model="fermi"), dict(use_segmentation=False), dict(spillover_labels=(2,)),
], ids=["fermi", "no-segmentation", "myocardium-label"])
def test_spillover_settings_that_would_be_ignored_or_use_the_myocardium_are_rejected(update):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="need model 'btex' and use_segmentation" if "spillover_labels"
                       not in update else "Input should be 1 or 3"):
        FlowMapSettings(**{"spillover_labels": (3,), **update})
    assert FlowMapSettings(spillover_labels=(1, 3)).spillover_labels == (1, 3)
    FlowMapSettings(**{k: v for k, v in update.items() if k != "spillover_labels"})  # valid without spill-over


def test_spillover_labels_of_another_shape_than_the_slice_are_an_error():
    (aif,) = list(AifExtract().process(iter([_aif_series()])))
    series, segmentation = _septal_slice()
    small = SliceSegmentation(slice_index=0, labels=segmentation.labels[:10, :10], rv_insertion_deg=120.0,
                              lv_center_rc=(8.0, 6.0))
    with pytest.raises(GadgetError, match=r"flow-map, slice 0: labels \(10, 10\) differ from the image \(12, 12\)"):
        _flow_maps(FlowMapSettings(spillover_labels=(3,)), aif, series, small)


def test_slice_without_the_rv_label_is_logged_and_fitted_without_spillover(caplog):
    (aif,) = list(AifExtract().process(iter([_aif_series()])))
    series, segmentation = _septal_slice(rv_label=0)
    plain = _flow_maps(FlowMapSettings(), aif, series, segmentation)
    with caplog.at_level(logging.INFO):
        with_setting = _flow_maps(FlowMapSettings(spillover_labels=(3,), spillover_reach_px=3.5), aif, series,
                                  segmentation)
    assert "spill-over pools () of (3,)" in caplog.text
    for name in ("mbf_ml_min_g", "ps_ml_min_g", "vp", "visf", "delay_s", "fit_rmse_mmol_l"):
        np.testing.assert_array_equal(getattr(with_setting, name), getattr(plain, name), err_msg=name)


def test_delay_prior_sd_setting_reaches_the_pixel_fit(monkeypatch):
    import perfline.gadgets.mapping as mapping_gadgets
    from pydantic import ValidationError

    seen: list[float] = []
    fit = mapping_gadgets.map_btex

    def recording(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs["delay_prior_sd_s"])
        return fit(*args, **kwargs)

    monkeypatch.setattr(mapping_gadgets, "map_btex", recording)
    (aif,) = list(AifExtract().process(iter([_aif_series()])))
    series, segmentation = _septal_slice()
    default = _flow_maps(FlowMapSettings(), aif, series, segmentation)
    wide = _flow_maps(FlowMapSettings(delay_prior_sd_s=1.0), aif, series, segmentation)
    assert seen == [0.25, 1.0]
    assert not np.allclose(default.delay_s, wide.delay_s, equal_nan=True)
    with pytest.raises(ValidationError, match="delay_prior_sd_s"):
        FlowMapSettings(delay_prior_sd_s=0.0)


def test_simex_setting_divides_the_map_by_the_ratio_of_the_myocardial_core(caplog):
    from pydantic import ValidationError

    (aif,) = list(AifExtract().process(iter([_aif_series()])))
    series, segmentation = _septal_slice()
    noisy = np.asarray(series.data) + np.random.default_rng(0).normal(0.0, 0.02, np.shape(series.data))
    series = dataclasses.replace(series, data=noisy.astype(np.float32))
    plain = _flow_maps(FlowMapSettings(), aif, series, segmentation)
    with caplog.at_level(logging.INFO):
        corrected = _flow_maps(FlowMapSettings(simex_pairs=1), aif, series, segmentation)
    assert plain.mbf_noise_ratio is None and corrected.mbf_noise_ratio is not None
    assert corrected.mbf_noise_ratio != 1.0
    # the core: myocardium rows 4-7 eroded by 1 px, rows 5-6 and columns 1-10
    assert "SIMEX noise-bias ratio" in caplog.text and "on 20 core pixels (1 pair(s)" in caplog.text
    np.testing.assert_allclose(corrected.mbf_ml_min_g, plain.mbf_ml_min_g / corrected.mbf_noise_ratio, rtol=1e-6)
    np.testing.assert_array_equal(corrected.ps_ml_min_g, plain.ps_ml_min_g)
    again = _flow_maps(FlowMapSettings(simex_pairs=1), aif, series, segmentation)
    np.testing.assert_array_equal(again.mbf_ml_min_g, corrected.mbf_ml_min_g)  # seeded: the same report twice
    pool = int(np.count_nonzero(aif.mask))
    with caplog.at_level(logging.INFO):
        skipped = _flow_maps(FlowMapSettings(simex_pairs=1, simex_min_aif_pixels=pool + 1), aif, series, segmentation)
    assert skipped.mbf_noise_ratio is None and f"the AIF pool has {pool} pixels (fewer than {pool + 1})" in caplog.text
    np.testing.assert_array_equal(skipped.mbf_ml_min_g, plain.mbf_ml_min_g)
    kept = _flow_maps(FlowMapSettings(simex_pairs=1, simex_min_aif_pixels=pool), aif, series, segmentation)
    np.testing.assert_array_equal(kept.mbf_ml_min_g, corrected.mbf_ml_min_g)
    for update in (dict(use_segmentation=False), dict(model="fermi")):
        with pytest.raises(ValidationError, match="simex_pairs 1 needs model 'btex' and use_segmentation"):
            FlowMapSettings(simex_pairs=1, **update)


def test_aif_foot_from_samples_skips_pre_bolus_bumps_and_zeroes_the_aif_before_the_arrival():
    """aif-extract foot_from_samples: an AIF acquired once per 0.8 s beat and resampled (the acquired samples
    kept) with noise bumps of 0.5 mmol/L in the LV pool at 5.9 and 7.5 s. The grid foot (3-frame smoothing) lies
    before the last bump; the samples' last 5 % crossing lies at the bolus (the curve starts at 8 s, its 5 %
    point is at 8.7 s), curve and samples are zero before it, and flow-map's plasma starts there."""
    from perfline.gadgets.mapping import _plasma_on
    from perfline.gadgets.perfusion_preprocessing import TemporalResample

    times = 0.3 + 0.8 * np.arange(45)
    gd, lv = _lv_rv_pools(times)
    gd += np.random.default_rng(3).normal(0.0, 0.05, gd.shape)
    bumps = np.isin(np.arange(times.size), (7, 9))  # 5.9 and 7.5 s, the bolus starts at 8 s
    gd[np.ix_(bumps, np.arange(32), np.arange(32))] += 0.5 * lv
    series = AifSeries(data=gd[None].astype(np.float32), time_s=times, echo_times_ms=(1.0,), units="gd_mmol_l",
                       n_pd_frames=0, geometry=GEOMETRY)
    (resampled,) = list(TemporalResample().process(iter([series])))
    settings = AifExtractSettings(lv_hint=False)
    (plain,) = list(AifExtract(settings).process(iter([resampled])))
    (sampled,) = list(AifExtract(settings.model_copy(update={"foot_from_samples": True})).process(iter([resampled])))
    fine = np.linspace(0.0, 40.0, 40001)
    true_arrival = fine[np.argmax(_blood(fine) > 0.05 * _blood(fine).max())]
    assert plain.foot_time_s is None and plain.arrival_time_s < 7.5  # before the last bump
    assert abs(sampled.arrival_time_s - true_arrival) < 0.3  # measured 0.08 s
    assert sampled.time_s[sampled.foot_index] <= sampled.foot_time_s < sampled.time_s[sampled.foot_index + 1]
    assert np.all(sampled.blood_gd_mmol_l[sampled.time_s < sampled.foot_time_s] == 0.0)
    assert np.all(sampled.sample_blood_gd_mmol_l[sampled.sample_time_s < sampled.foot_time_s] == 0.0)
    after = sampled.time_s >= sampled.foot_time_s
    np.testing.assert_allclose(sampled.blood_gd_mmol_l[after], plain.blood_gd_mmol_l[after])  # same baseline
    plasma = _plasma_on(sampled.time_s, sampled)
    assert np.all(plasma[sampled.time_s < sampled.foot_time_s] == 0.0) and plasma[after][0] >= 0.0


def test_flow_map_visf_steps_sets_the_tables_visf_grid():
    """``flow-map visf_steps`` reaches the BTEX table's grid (default QPerf's 6 points over 0.1-0.475 ml/ml)."""
    from perfline.gadgets.mapping import FlowMapSettings, _btex_settings

    shipped = _btex_settings(FlowMapSettings()).axes()[3]
    finer = _btex_settings(FlowMapSettings(visf_steps=9)).axes()[3]
    np.testing.assert_allclose(shipped, np.linspace(0.1, 0.475, 6))
    np.testing.assert_allclose(finer, np.linspace(0.1, 0.475, 9))
    with pytest.raises(ValueError):
        FlowMapSettings(visf_steps=2)
