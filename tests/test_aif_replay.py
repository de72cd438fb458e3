"""benchmarks/aif_replay.py: aif-extract's inputs saved, loaded and replayed to the same curve."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import numpy as np

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
