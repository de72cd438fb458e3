"""Image-domain API, ground-truth file and the ``perfline simulate`` command."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from perfline.cli import main
from perfline.simulator import ImageSlice, simulate_image_study
from perfline.simulator import study as st
from perfline.simulator.truth import TruthFormatError, read_truth, write_truth
from perfline.toolbox.aha import aha_segment_map


@pytest.fixture(scope="module")
def slices() -> list[ImageSlice]:
    return simulate_image_study(13, kind="stress", field_strength_t=3.0, n_frames=30)


def test_image_slices_have_the_documented_shapes_and_types(slices):
    assert [s.level for s in slices] == ["basal", "mid", "apical"]
    for s in slices:
        assert s.signal.dtype == np.float32 and s.signal.shape == (33, 144, 192)
        assert s.gd.dtype == np.float32 and s.gd.shape == (30, 144, 192)
        assert s.time_s.shape == (33,) and np.all(np.diff(s.time_s) > 0.3)
        assert s.n_pd_frames == 3 and s.pixel_spacing_mm == pytest.approx(1.875)
        assert s.labels.dtype == np.uint8 and set(np.unique(s.labels)) == {0, 1, 2, 3}
        assert np.all(np.isnan(s.mbf[s.labels != 2])) and np.all(np.isfinite(s.mbf[s.labels == 2]))
        assert 0 <= s.rv_insertion_deg < 360
        rows, cols = np.nonzero(s.labels == 1)
        assert s.lv_center_rc == pytest.approx((rows.mean(), cols.mean()))


def test_contrast_is_visible_in_signal_and_gd(slices):
    s = slices[1]
    lv, rv, myo = (s.signal[:, s.labels == k].mean(axis=1) for k in (1, 3, 2))
    n_pd = s.n_pd_frames
    assert np.argmax(rv[n_pd:]) < np.argmax(lv[n_pd:]), "RV must peak before the LV"
    assert lv[n_pd:].max() > 2 * lv[n_pd], "blood enhances strongly"
    gd_myo = s.gd[:, s.labels == 2].mean(axis=1)
    assert gd_myo[:3].max() < 0.15 and gd_myo.max() > 0.3, "myocardial Gd rises from ~0"
    # stress MBF in the documented range (defects may lower part of the wall)
    assert 1.0 < np.nanmedian(s.mbf) < 4.5


def test_same_seed_same_arrays_other_seed_other_arrays():
    a = simulate_image_study(3, n_slices=1, n_frames=12)
    b = simulate_image_study(3, n_slices=1, n_frames=12)
    c = simulate_image_study(4, n_slices=1, n_frames=12)
    assert np.array_equal(a[0].signal, b[0].signal) and np.array_equal(a[0].gd, b[0].gd, equal_nan=True)
    assert not np.array_equal(a[0].labels, c[0].labels)


def test_options_are_validated():
    with pytest.raises(ValueError, match="kind must be"):
        simulate_image_study(0, kind="exercise")
    with pytest.raises(ValueError, match="field_strength_t"):
        simulate_image_study(0, field_strength_t=7.0)


def test_truth_file_layout(tmp_path):
    study = st.sample_study(6, n_slices=3, n_frames=12)
    path = tmp_path / "truth.h5"
    write_truth(study, str(path))
    with h5py.File(path, "r") as f:
        for key in ("seed", "kind", "field_strength_t", "hematocrit", "pixel_spacing_mm"):
            assert key in f.attrs
        assert f["aif/time_s"].shape == f["aif/gd"].shape == (15,)
        g = f["slices/1"]
        assert g["labels"].dtype == np.uint8 and g["aha_segments"].dtype == np.uint8
        assert g["gd"].shape == (15, 144, 192) and g["motion"].shape == (15, 2, 144, 192)
        assert g.attrs["level"] == "mid"
        assert f["segment_mbf"].shape == (16,) and f["segment_mbf"].dtype == np.float32
    truth = read_truth(str(path))
    assert truth.attrs["seed"] == 6
    for sl in truth.slices:
        expected = aha_segment_map(sl.labels == 2, sl.lv_center_rc, sl.rv_insertion_deg, sl.level)
        assert np.array_equal(expected, sl.aha_segments)
    assert np.all(np.isfinite(truth.segment_mbf))
    mid = truth.slices[1]
    segment_7 = np.nanmean(mid.mbf[mid.aha_segments == 7])
    assert truth.segment_mbf[6] == pytest.approx(segment_7, rel=1e-5)
    (tmp_path / "other.h5").write_bytes(b"")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = 1
    with pytest.raises(TruthFormatError, match="expected"):
        read_truth(str(tmp_path / "other.h5"))


def test_cli_writes_kspace_and_truth(tmp_path):
    out, truth_path = tmp_path / "scan.h5", tmp_path / "truth.h5"
    code = main(["simulate", str(out), "--truth", str(truth_path), "--seed", "5", "--rest", "--field", "1.5",
                 "--slices", "1", "--frames", "10", "--coils", "4", "--acceleration", "3", "--flow-model", "fermi"])
    assert code == 0
    with h5py.File(out, "r") as f:
        assert f["dataset/data"].shape[0] > 1000
    truth = read_truth(str(truth_path), load_series=False)
    assert truth.attrs["kind"] == "rest" and truth.attrs["field_strength_t"] == 1.5
    assert len(truth.slices) == 1 and truth.slices[0].level == "mid"


def test_cli_refuses_bad_options(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["simulate", str(tmp_path / "a.h5"), "--truth", str(tmp_path / "b.h5"), "--acceleration", "2"])
    code = main(["simulate", str(tmp_path / "a.h5"), "--truth", str(tmp_path / "b.h5"), "--frames", "3"])
    assert code == 2 and "n_frames" in capsys.readouterr().err


def test_truth_motion_field_explains_the_moving_images(tmp_path):
    """frame t shows at p what the reference shows at p + motion[t, :, p] (docs/simulator.md)."""
    from scipy import ndimage

    from perfline.simulator.image_study import image_slice

    study = st.sample_study(9, n_slices=1, n_frames=12)
    moving = image_slice(study, 0, noise=False, motion=True).signal
    still = image_slice(study, 0, noise=False, motion=False).signal
    path = tmp_path / "truth.h5"
    write_truth(study, str(path))
    motion = read_truth(str(path)).slices[0].motion
    assert np.abs(motion).max() > 0.3, "this study should move"
    rows, cols = np.indices(still.shape[1:], dtype=np.float64)
    for t in (0, 7, 14):
        coords = np.stack([rows + motion[t, 0], cols + motion[t, 1]])
        expected = ndimage.map_coordinates(still[t], coords, order=1, mode="nearest")
        inner = (slice(5, -5), slice(5, -5))
        assert np.allclose(moving[t][inner], expected[inner], atol=1e-3 * still.max())


def test_heart_rate_variation_and_missed_triggers_shape_the_frame_times():
    for seed in range(40):
        study = st.sample_study(seed, n_frames=60)
        if study.timing.missed_trigger.any():
            break
    else:
        pytest.fail("no study with a missed trigger in 40 seeds")
    times = st.frame_times_s(study, "myocardium", 0)
    gaps = np.diff(times)
    missed = np.flatnonzero(study.timing.missed_trigger[:-1])
    normal = np.delete(gaps, missed)
    assert np.all(gaps[missed] > 1.6 * np.median(normal))
    assert normal.std() > 0.005, "beat-to-beat variation"


def test_truth_attributes_regenerate_the_same_study(tmp_path):
    from perfline.simulator.truth import parameters_json

    study = st.sample_study(17, n_slices=2, n_frames=15, n_coils=8, acceleration=1, flow_model="fermi")
    path = tmp_path / "truth.h5"
    write_truth(study, str(path))
    attrs = read_truth(str(path), load_series=False).attrs
    again = st.sample_study(int(attrs["seed"]), kind=attrs["kind"], field_strength_t=float(attrs["field_strength_t"]),
                            n_slices=int(attrs["n_slices"]), n_frames=int(attrs["n_frames"]),
                            n_coils=int(attrs["n_coils"]),
                            acceleration=int(attrs["acceleration"]), flow_model=attrs["flow_model"])
    assert parameters_json(again) == attrs["parameters_json"]


# --- speed kernels of the image path: same values as the plain computations ---

def test_matmul_columns_equals_matmul_and_checks_shapes():
    from perfline.simulator.kernels import matmul_columns

    rng = np.random.default_rng(0)
    a = rng.random((63, 14), dtype=np.float32)
    b = rng.random((14, 5000), dtype=np.float32)
    out = matmul_columns(a, b)
    assert out.shape == (63, 5000) and out.dtype == np.float32
    assert np.allclose(out, a.astype(np.float64) @ b.astype(np.float64), rtol=1e-5)
    assert np.allclose(matmul_columns(a, b, block=7), out, rtol=1e-6)
    with pytest.raises(ValueError, match=r"\[m, k\] @ \[k, n\]"):
        matmul_columns(a, b.T)


def test_rician_in_place_is_the_magnitude_of_the_complex_sum():
    from perfline.simulator.kernels import rician_in_place

    rng = np.random.default_rng(1)
    image = rng.random((3, 4, 5), dtype=np.float32) * 4
    re, im = rng.standard_normal(60, dtype=np.float32), rng.standard_normal(60, dtype=np.float32)
    for negate in (False, True):
        sign = -1 if negate else 1
        expected = np.abs(image.astype(np.float64) + sign * re.reshape(3, 4, 5) + 1j * im.reshape(3, 4, 5))
        work = image.copy()
        out = rician_in_place(work, re, negate, im * im, out=work)
        assert out is work and out.dtype == np.float32
        assert np.allclose(out, expected, rtol=1e-5)


def test_bank_noise_is_standard_normal_and_reproducible():
    from perfline.simulator.kernels import draw_bank_noise

    re, im_squared, negate = draw_bank_noise(np.random.default_rng(5), 200_000)
    again = draw_bank_noise(np.random.default_rng(5), 200_000)
    assert np.array_equal(re, again[0]) and np.array_equal(im_squared, again[1]) and negate == again[2]
    assert abs(re.mean()) < 0.01 and re.std() == pytest.approx(1.0, abs=0.01)
    assert im_squared.min() >= 0 and im_squared.mean() == pytest.approx(1.0, abs=0.02)
    assert not np.array_equal(re**2, im_squared), "real and imaginary parts come from different offsets"


def test_lut_inverse_with_a_per_pixel_scale_equals_the_scaled_ratio():
    from perfline.simulator.image_study import myocardial_lut

    lut = myocardial_lut(st.sample_study(2, n_frames=10).myocardial_sequence)
    rng = np.random.default_rng(2)
    sr = (rng.random((6, 16, 12)) * lut.ratio_grid[-1] * 1.3).astype(np.float32)
    scale = (0.5 + rng.random((16, 12))).astype(np.float32)
    sr[2, 3, 4] = np.nan
    got = lut.to_gd(sr, scale=scale)
    expected = lut.to_gd(sr * scale)
    assert got.dtype == np.float32 and np.isnan(got[2, 3, 4]) and np.count_nonzero(np.isnan(got)) == 1
    assert np.nanmax(np.abs(got - expected)) < 1e-4
    assert got[np.isfinite(got)].min() == 0.0 and np.nanmax(got) == pytest.approx(lut.gd_max_mmol_l)
    exact = lut.to_gd(sr.astype(np.float64), scale=scale.astype(np.float64))
    assert exact.dtype == np.float64 and np.nanmax(np.abs(exact - got)) < 1e-4
    with pytest.raises(ValueError, match="trailing axes"):
        lut.to_gd(sr, scale=scale.T)
    out = np.empty_like(sr)
    assert lut.to_gd(sr, scale=scale, out=out) is not None and np.array_equal(out, got, equal_nan=True)
    assert np.array_equal(lut.to_gd(sr, scale=np.float32(2.0)), lut.to_gd(sr * np.float32(2.0)), equal_nan=True)
    with pytest.raises(ValueError, match="C-contiguous float32"):
        lut.to_gd(sr, out=np.empty(sr.shape, dtype=np.float64))


def test_image_gd_is_the_lut_of_the_returned_signal_without_motion():
    """Without motion the returned signal is the measured series: its SR / PD through the LUT is gd."""
    from perfline.simulator.image_study import image_slice, myocardial_lut

    study = st.sample_study(21, n_slices=1, n_frames=10, flow_model="fermi")
    lut = myocardial_lut(study.myocardial_sequence)
    for noise in (False, True):
        s = image_slice(study, 0, noise=noise, motion=False)
        pd = np.maximum(s.signal[:3].astype(np.float64).mean(axis=0), 1e-6)
        expected = lut.to_gd(s.signal[3:].astype(np.float64) / pd)
        assert np.abs(s.gd - expected).max() < 2e-3
    clean = image_slice(study, 0, noise=False, motion=False).signal
    bright = clean > 5 * st.noise_sigma(study)  # Rician close to Gaussian there
    assert bright.sum() > 10_000
    residual = (s.signal - clean)[bright]
    assert residual.std() == pytest.approx(st.noise_sigma(study), rel=0.05), "noise scaled back to signal units"


def test_warp_leaves_the_torch_thread_count_as_it_found_it():
    torch = pytest.importorskip("torch")
    from perfline.simulator.motion import warp

    study = st.sample_study(4, n_slices=1, n_frames=10)
    field = st.motion_fields(study, "myocardium", 0, st.MYO_SHAPE, st.MYO_PIXEL_MM, (70.0, 90.0))
    images = np.random.default_rng(0).random((13, *st.MYO_SHAPE), dtype=np.float32)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        whole = warp(images, field)
        assert torch.get_num_threads() == 2
        part = warp(images[4:9], field.frames(4, 9))
        assert np.array_equal(part, whole[4:9]), "a block of frames warps like the whole series"
    finally:
        torch.set_num_threads(before)
