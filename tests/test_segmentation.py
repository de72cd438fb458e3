"""Input pipeline geometry, LV detection, bad-input errors and the Segmenter end to end (tiny
untrained network: checks plumbing, runtimes and flags, not accuracy)."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from perfline.models.data import (CropGeometry, SeriesError, check_series, crop_labels,
                                  detect_lv_center, lv_center_candidates,
                                  resample_frames_to_interval, sample_crop,
                                  uncrop_probabilities)


def disc_series(shape=(40, 100, 120), center=(45.0, 70.0), rv_offset=(0.0, -22.0)):
    """Gd-like series: LV pool peaking at frame 14, RV pool at frame 9, myocardial ring."""
    frames, rows, cols = shape
    r, c = np.indices((rows, cols), dtype=np.float64)
    lv = np.hypot(r - center[0], c - center[1]) < 9
    myo = (np.hypot(r - center[0], c - center[1]) < 15) & ~lv
    rv = np.hypot(r - center[0] - rv_offset[0], c - center[1] - rv_offset[1]) < 8
    t = np.arange(frames, dtype=np.float64)[:, None, None]
    series = (lv * 5 * np.exp(-(t - 14) ** 2 / 10) + rv * 5.5 * np.exp(-(t - 9) ** 2 / 10)
              + myo * 0.6 * (t > 14))
    labels = (lv * 1 + myo * 2 + rv * 3).astype(np.uint8)
    return series.astype(np.float32), labels


def test_crop_then_uncrop_is_identity_on_the_input_grid():
    _, labels = disc_series()
    geometry = CropGeometry.centred(labels.shape, 1.6, (45.0, 70.0))
    crop = crop_labels(labels, geometry)
    assert crop.shape == (176, 176)
    # the LV disc of radius 9 px at 1.6 mm is ~ pi (14.4 mm)^2 at 1 mm pixels
    assert abs((crop == 1).sum() - np.pi * 14.4 ** 2) < 0.08 * np.pi * 14.4 ** 2
    one_hot = np.stack([(crop == k).astype(np.float32) for k in range(4)])
    back = uncrop_probabilities(one_hot, geometry).argmax(axis=0)
    inside = np.hypot(*(np.indices(labels.shape) - np.array([45, 70])[:, None, None])) < 40
    assert (back[inside] == labels[inside]).mean() > 0.98


def test_crop_normalised_and_padded():
    series, _ = disc_series(shape=(20, 100, 120))
    geometry = CropGeometry.centred(series.shape[1:], 1.6, (45.0, 70.0))
    crop = sample_crop(series, geometry)
    assert crop.shape == (48, 176, 176) and crop.max() == pytest.approx(1.0)
    assert np.array_equal(crop[19], crop[47])


def test_detector_ranks_lv_first_and_adds_image_centre():
    series, _ = disc_series()
    row, col = detect_lv_center(series, 1.6)
    candidates = lv_center_candidates(series, 1.6)
    assert candidates[-1] == (49.5, 59.5) and len(candidates) == 3  # LV, RV, image centre
    assert np.hypot(row - 45.0, col - 70.0) < 2.0


@pytest.mark.parametrize("series,match", [
    (np.zeros((10, 10)), "dimensions"),
    (np.zeros((5, 64, 64)), "at least 16 frames"),
    (np.full((30, 64, 64), np.nan), "NaN"),
], ids=["2d", "too-few-frames", "nan"])
def test_bad_series_raise_clear_errors(series, match):
    with pytest.raises(SeriesError, match=match):
        check_series(series)


def test_resampling_to_nominal_interval():
    series = np.arange(21, dtype=np.float32)[:, None, None] * np.ones((1, 4, 4), np.float32)
    out = resample_frames_to_interval(series, 0.5)
    assert out.shape[0] == 11 and out[3, 0, 0] == pytest.approx(6.0)
    assert resample_frames_to_interval(series, 0.9) is series
    with pytest.raises(SeriesError, match="> 0 s"):
        resample_frames_to_interval(series, 0.0)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    torch = pytest.importorskip("torch")
    from perfline.models.resunet import ResUNet, ResUNetConfig
    from perfline.models.weights import export_onnx, save_weights

    torch.manual_seed(0)
    model = ResUNet(ResUNetConfig(filters=(4, 8), blocks=(1, 1))).eval()
    stem = tmp_path_factory.mktemp("model") / "tiny"
    save_weights(model, stem)
    export_onnx(model, stem)
    return stem


def test_segmenter_runtimes_agree_and_report_flags(tiny_model):
    from perfline.models.inference import Segmenter

    series, _ = disc_series()
    results = {}
    for runtime in ("onnxruntime", "torch"):
        segmenter = Segmenter(tiny_model, runtime=runtime)
        assert segmenter.runtime == runtime and segmenter.load_ms > 0
        results[runtime] = segmenter.segment(series, 1.6, center_rc=(45.0, 70.0))
    a, b = results["onnxruntime"], results["torch"]
    assert a.labels.shape == series.shape[1:] and a.probabilities.shape == (4, 100, 120)
    assert np.allclose(a.probabilities, b.probabilities, atol=1e-4)
    assert np.allclose(a.probabilities.sum(axis=0), 1.0, atol=1e-4)
    # an untrained network finds no closed ring: that must be flagged, not crash
    assert a.flags and (a.empty or not a.closed_ring or np.isnan(a.rv_insertion_deg))
    with pytest.raises(SeriesError, match="NaN"):
        segmenter.segment(np.full_like(series, np.nan), 1.6)
    with pytest.raises(ValueError, match="runtime must be one of"):
        Segmenter(tiny_model, runtime="tensorrt")


def test_augmented_sample_keeps_labels_on_the_image():
    from types import SimpleNamespace

    from perfline.models.data import Augmentation, augmented_sample

    gd, labels = disc_series(shape=(60, 100, 120))
    slice_ = SimpleNamespace(gd=gd, signal=np.concatenate([np.ones((3, 100, 120), np.float32),
                                                          0.3 + gd], axis=0),
                             n_pd_frames=3, labels=labels, pixel_spacing_mm=1.6,
                             lv_center_rc=(45.0, 70.0))
    rng = np.random.default_rng(0)
    augmentation = Augmentation(noise_sd=(0.0, 0.0), small_fov_probability=1.0,
                                clamp_probability=1.0, gd_gamma=(0.8, 1.5))
    for _ in range(4):
        crop, crop_labels_ = augmented_sample(slice_, rng, augmentation)
        assert crop.shape == (48, 176, 176) and crop_labels_.shape == (176, 176)
        assert np.abs(crop).max() <= 2.0
        peak = crop.max(axis=0)
        assert peak[crop_labels_ == 1].mean() > 3 * peak[crop_labels_ == 0].mean()
        assert (crop[:, crop_labels_ == 0] == 0).any()   # the small field of view is zeroed


def test_blur_augmentation_smooths_the_crop_and_keeps_labels():
    from types import SimpleNamespace

    from perfline.models.data import Augmentation, augmented_sample

    gd, labels = disc_series(shape=(60, 100, 120))
    slice_ = SimpleNamespace(gd=gd, signal=0.3 + gd, n_pd_frames=0, labels=labels,
                             pixel_spacing_mm=1.6, lv_center_rc=(45.0, 70.0))
    common = dict(noise_sd=(0.0, 0.0), small_fov_probability=0.0, blur_probability=1.0,
                  signal_units_probability=0.0)
    sharp, sharp_labels = augmented_sample(slice_, np.random.default_rng(3),
                                           Augmentation(blur_mm=(0.0, 0.0), **common))
    smooth, smooth_labels = augmented_sample(slice_, np.random.default_rng(3),
                                             Augmentation(blur_mm=(1.5, 1.5), **common))
    np.testing.assert_array_equal(sharp_labels, smooth_labels)
    roughness = [float(np.square(np.diff(c, axis=2)).mean()) for c in (sharp, smooth)]
    assert roughness[1] < 0.8 * roughness[0]
    assert np.abs(smooth).max() <= 2.0


def test_openvino_runtime_agrees_and_caches_a_verified_compiled_model(tiny_model, tmp_path,
                                                                       caplog):
    pytest.importorskip("openvino")
    from perfline.models.inference import Segmenter, clear_compiled_models

    def load() -> Segmenter:
        return Segmenter(tiny_model, runtime="openvino", threads=1, cache_dir=tmp_path)

    crops = np.random.default_rng(3).random((2, 48, 176, 176), dtype=np.float32)
    reference = Segmenter(tiny_model, runtime="onnxruntime").predict(crops)
    clear_compiled_models()
    first = load()
    assert first.runtime == "openvino" and first.precision in ("bf16", "fp32")
    assert first.compiled_from == "compiled"
    blob = next(tmp_path.glob("*.blob"))
    assert len(blob.with_suffix(".json").read_text()) > 0
    assert load().compiled_from == "memory"  # same process: no compile, no import
    clear_compiled_models()
    second = load()
    assert second.compiled_from == "disk cache"
    tolerance = 0.05 if second.precision == "bf16" else 1e-4  # bf16: 8-bit mantissa
    assert np.abs(second.predict(crops) - reference).max() < tolerance
    assert np.abs(first.predict(crops) - second.predict(crops)).max() < 1e-6
    # a changed blob fails its SHA-256 and is recompiled, not imported
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    clear_compiled_models()
    assert load().compiled_from == "compiled" and "SHA-256" in caplog.text
    clear_compiled_models()
    assert load().compiled_from == "disk cache"  # rewritten by the recompilation


def test_auto_runtime_prefers_openvino_bf16_and_falls_back(tiny_model, tmp_path, monkeypatch):
    from perfline.models.inference import Segmenter

    try:
        import openvino

        bf16 = "BF16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except ImportError:
        bf16 = False
    chosen = Segmenter(tiny_model, cache_dir=tmp_path)
    assert (chosen.runtime, chosen.precision) == (("openvino", "bf16") if bf16 else
                                                  ("onnxruntime", "fp32"))
    monkeypatch.setitem(sys.modules, "openvino", None)  # import fails: ONNX Runtime fp32
    fallback = Segmenter(tiny_model, cache_dir=tmp_path)
    assert (fallback.runtime, fallback.precision) == ("onnxruntime", "fp32")
    with pytest.raises(ImportError):
        Segmenter(tiny_model, runtime="openvino", cache_dir=tmp_path)


@pytest.mark.parametrize("center,frames", [((45.3, 70.8), 40), ((8.0, 115.0), 40),
                                           ((50.0, 60.0), 20)],
                         ids=["inside", "across-the-edge", "padded"])
def test_separable_crop_and_uncrop_equal_the_reference_resampling(center, frames):
    from perfline.models.inference import crop_series, uncrop

    series, _ = disc_series(shape=(frames, 100, 120))
    series += np.random.default_rng(0).random(series.shape, dtype=np.float32)
    geometry = CropGeometry.centred(series.shape[1:], 1.6, center)
    fast = crop_series(series, geometry, 48)
    assert fast.shape == (48, 176, 176)
    assert np.allclose(fast, sample_crop(series, geometry), atol=2e-6)
    probabilities = np.random.default_rng(1).random((4, 176, 176), dtype=np.float32)
    probabilities /= probabilities.sum(axis=0)
    assert np.allclose(uncrop(probabilities, geometry),
                       uncrop_probabilities(probabilities, geometry), atol=2e-6)
    # a rotated crop (training augmentation only) takes the reference path
    rotated = CropGeometry.centred(series.shape[1:], 1.6, center, rotation_deg=20.0)
    assert np.array_equal(crop_series(series, rotated, 48), sample_crop(series, rotated))


@pytest.mark.parametrize("center,rotation,scale", [((45.3, 70.8), 20.0, 0.8),
                                                   ((4.0, 115.0), -35.0, 1.6),
                                                   ((50.0, 60.0), 0.0, 1.0)],
                         ids=["inside-rotated", "across-the-edge", "axis-aligned"])
def test_torch_crop_engine_equals_map_coordinates(center, rotation, scale):
    """The training crops' grid_sample path: same values as the scipy path (float32 rounding),
    including exact zeros beyond the input's outer pixel centres."""
    rng = np.random.default_rng(2)
    series = rng.random((40, 100, 120), dtype=np.float32) + 0.5
    geometry = CropGeometry.centred(series.shape[1:], 1.6, center, rotation_deg=rotation,
                                    scale=scale)
    shifts = rng.normal(0.0, 1.5, size=(40, 2))
    warp = rng.normal(0.0, 1.0, size=(2, 176, 176))
    reference = sample_crop(series, geometry, shifts_rc=shifts, displacement=warp)
    fast = sample_crop(series, geometry, shifts_rc=shifts, displacement=warp, engine="torch")
    assert fast.shape == reference.shape == (48, 176, 176)
    assert np.allclose(fast, reference, atol=5e-5)
    assert np.array_equal(fast == 0, reference == 0)  # the series is > 0 everywhere inside
    with pytest.raises(ValueError, match="engine must be"):
        sample_crop(series, geometry, engine="opencv")
