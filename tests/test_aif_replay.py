"""benchmarks/aif_replay.py: aif-extract's inputs saved, loaded and replayed to the same curve."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from perfline.core.gadget import ChainContext
from perfline.gadgets.mapping import AifExtract, AifExtractSettings, LvHint
from test_mapping_gadgets import _aif_series

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("aif_replay", ROOT / "benchmarks" / "aif_replay.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_saved_inputs_load_back_and_replay_to_the_same_curve(tmp_path):
    replay = _module()
    settings = AifExtractSettings(lv_hint=False)
    series = dataclasses.replace(_aif_series(), pd_image=np.full((32, 32), 5.0, np.float32), stages=("a", "b"))
    context = ChainContext(parameters={"hematocrit": 0.4})
    gadget = AifExtract(settings, context)
    (curve,) = list(gadget.process(iter([series])))
    hint = LvHint(point_mm=np.array([1.0, -2.0, 3.5]), radius_mm=None, slice_index=2)
    path = replay.save_aif_inputs(tmp_path / "scan.npz", context, series, hint, curve)

    loaded, loaded_hint, xml, parameters, cached = replay.load_aif_inputs(path)
    assert xml == "" and parameters == {"hematocrit": 0.4}
    for name in ("data", "time_s", "pd_image"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(series, name), err_msg=name)
    assert (loaded.units, loaded.n_pd_frames, loaded.echo_times_ms, loaded.stages, loaded.geometry) == \
        (series.units, series.n_pd_frames, series.echo_times_ms, series.stages, series.geometry)
    assert loaded.acquired_data is None and loaded_hint.radius_mm is None and loaded_hint.slice_index == 2
    np.testing.assert_array_equal(loaded_hint.point_mm, hint.point_mm)
    np.testing.assert_array_equal(cached["curve_blood_gd_mmol_l"], curve.blood_gd_mmol_l)

    again = replay.replay(path, settings)  # the hint is ignored with lv_hint off, as in the chain
    np.testing.assert_array_equal(again.blood_gd_mmol_l, curve.blood_gd_mmol_l)
    assert again.hematocrit == 0.4  # the client's parameter, as the chain took it


def test_shipped_settings_are_the_perfusion_chains():
    settings = _module().shipped_settings()
    assert settings.foot_from_samples and settings.lv_partial_volume


def _dual_echo_series(seed: int, sigma: float, context):
    """The dual-echo AIF pool of test_aif_t2star_model (37 blood pixels, complex noise SD ``sigma``) as an
    AifSeries in signal units, acquired 0.13 s after its model times."""
    from perfline.gadgets.perfusion_items import AifSeries, ImageGeometry
    from perfline.toolbox import gd_conversion
    from test_aif_t2star_model import N_PD, TE_MS, _two_echo_pool

    sequence = gd_conversion.sequence_from_header(context.header, gd_conversion.AIF_ENCODING)
    echoes, time_s, _, _ = _two_echo_pool(seed, sigma, sequence, 25.0, 26.0)
    return AifSeries(data=echoes.astype(np.float32), time_s=time_s + 0.13, echo_times_ms=TE_MS, units="signal",
                     n_pd_frames=N_PD, geometry=ImageGeometry(field_of_view_mm=(144.0, 144.0, 8.0)))


def _chain_curve(series, context, **extract):
    """(resampled series, the AIF curve) of the shipped chain's aif-t2star .. aif-extract on a dual-echo AIF series;
    ``extract``: aif-extract settings changed from the chain's."""
    from perfline.gadgets.perfusion_preprocessing import (AifT2StarCorrection, GdConversion, SurfaceCoilCorrection,
                                                          TemporalResample)

    settings = _module().chain_settings()
    item = series
    for gadget in (AifT2StarCorrection(settings["aif-t2star"], context),
                   SurfaceCoilCorrection(settings["surface-coil-correction"], context),
                   GdConversion(settings["gd-conversion"], context)):
        item = gadget.process_item(item)
    (resampled,) = list(TemporalResample(settings["temporal-resample"], context).process(iter([item])))
    extract_settings = settings["aif-extract"].model_copy(update={"lv_hint": False, **extract})
    (curve,) = list(AifExtract(extract_settings, context).process(iter([resampled])))
    return resampled, curve


def test_replay_from_the_t2star_input_reproduces_the_chain_and_follows_a_variant_chain(tmp_path):
    """A dual-echo pool (test_aif_t2star_model) through the shipped chain's aif-t2star .. aif-extract; saved
    with its aif-t2star input, replay_from_t2star gives the same curve with the shipped chain's settings and
    another with a chain directory whose T2* fit is the session-15 one (3 x 3 box, echo 1 only)."""
    import shutil

    from test_aif_t2star_model import N_PD, TE_MS, _header_context

    replay = _module()
    context = dataclasses.replace(_header_context(), parameters={"hematocrit": 0.43})
    series = _dual_echo_series(4, 0.002, context)
    resampled, curve = _chain_curve(series, context)
    path = replay.save_aif_inputs(tmp_path / "1_stress.npz", context, resampled, None, curve, t2star_input=series)

    again = replay.replay_from_t2star(path)
    np.testing.assert_array_equal(again.blood_gd_mmol_l, curve.blood_gd_mmol_l)
    np.testing.assert_array_equal(again.sample_blood_gd_mmol_l, curve.sample_blood_gd_mmol_l)
    loaded = replay.load_t2star_input(path)
    np.testing.assert_array_equal(loaded.data, series.data)
    assert (loaded.n_pd_frames, loaded.echo_times_ms, loaded.units) == (N_PD, TE_MS, "signal")

    variant = tmp_path / "chains"
    shutil.copytree(ROOT / "chains", variant, ignore=shutil.ignore_patterns("__pycache__"))
    text = (variant / "perfusion.toml").read_text()
    assert "smoothing_px = 7\ncombine_echoes = true\n" in text
    (variant / "perfusion.toml").write_text(text.replace("smoothing_px = 7\ncombine_echoes = true\n", ""))
    other = replay.replay_from_t2star(path, variant)
    assert not np.allclose(other.blood_gd_mmol_l, curve.blood_gd_mmol_l)
    # the same pool and a close curve: only the T2* correction differs
    np.testing.assert_array_equal(other.mask, curve.mask)
    assert abs(other.blood_gd_mmol_l.max() / curve.blood_gd_mmol_l.max() - 1.0) < 0.05


def test_inputs_captured_before_the_t2star_capture_say_so(tmp_path):
    replay = _module()
    series = dataclasses.replace(_aif_series(), pd_image=np.full((32, 32), 5.0, np.float32))
    context = ChainContext(parameters={})
    (curve,) = list(AifExtract(AifExtractSettings(lv_hint=False), context).process(iter([series])))
    path = replay.save_aif_inputs(tmp_path / "old.npz", context, series, None, curve)
    with pytest.raises(ValueError, match="no aif-t2star input"):
        replay.load_t2star_input(path)


def test_aif_extract_reports_the_frame_noise_of_its_first_pass_as_a_lower_bound():
    """The dual-echo pool of test_aif_t2star_model through the shipped chain's aif-t2star .. aif-extract
    with complex noise of SD 0.001 and 0.003: the AifCurve's per-sample noise scales with it (about 3 x; at 0.002
    and 0.006 the shipped T2* line on each pixel's own echoes adds noise faster than linearly, 4.1 x), and over 10
    noise draws at 0.004 the first pass's area scatters more than the frame noise predicts (the T2* and PD
    normalisations add gains shared by the pool's pixels: a lower bound)."""
    from test_aif_t2star_model import _header_context

    context = _header_context()

    def curve(seed: int, sigma: float):
        return _chain_curve(_dual_echo_series(seed, sigma, context), context)[1]

    low = [curve(seed, 0.001) for seed in range(5)]
    high = [curve(seed, 0.003) for seed in range(5)]
    assert low[0].sample_noise_sd_mmol_l.shape == low[0].sample_time_s.shape
    assert np.all(np.isfinite(low[0].sample_noise_sd_mmol_l)) and np.all(low[0].sample_noise_sd_mmol_l >= 0)
    ratio = (np.median([c.first_pass_frame_noise_pct for c in high])
             / np.median([c.first_pass_frame_noise_pct for c in low]))
    assert 2.2 < ratio < 3.8, ratio
    areas, predicted = [], []
    for seed in range(10):
        c = curve(seed, 0.004)
        t, b = c.sample_time_s, c.sample_blood_gd_mmol_l
        inside = (t >= c.arrival_time_s) & (t <= t[np.argmax(b)] + 8.0)
        areas.append(float(np.sum(b[inside] * np.gradient(t)[inside])))
        predicted.append(c.first_pass_frame_noise_pct)
    assert 0.0 < np.median(predicted) < 100 * np.std(areas, ddof=1) / np.mean(areas)


def test_aif_extract_foot_noise_sds_sets_the_arrival_noise_band_from_the_samples_noise(monkeypatch):
    """aif-extract foot_noise_sds = 3 on the noisy dual-echo pool: sample_foot_time gets 3 times the median
    SD of the acquired samples before the peak as its noise band (0 with the setting off), and the arrival
    it returns is the curve's."""
    from perfline.gadgets import mapping
    from test_aif_t2star_model import _header_context

    context = _header_context()
    series = _dual_echo_series(1, 0.006, context)
    calls = []
    original = mapping.sample_foot_time

    def spy(time_s, blood, level, noise_level=0.0):
        calls.append((np.array(blood), level, noise_level))
        return original(time_s, blood, level, noise_level)

    monkeypatch.setattr(mapping, "sample_foot_time", spy)
    curves = {k: _chain_curve(series, context, foot_noise_sds=k)[1] for k in (0.0, 3.0)}
    (blood0, level0, band0), (blood3, level3, band3) = calls
    assert band0 == 0.0 and level3 == level0
    sd = curves[3.0].sample_noise_sd_mmol_l
    np.testing.assert_allclose(band3, 3.0 * np.median(sd[:int(np.argmax(blood3))]), rtol=1e-12)
    assert band3 > 0.0
    assert curves[3.0].arrival_time_s == original(curves[3.0].sample_time_s, blood3, level3, band3)
    assert curves[3.0].arrival_time_s >= curves[0.0].arrival_time_s
