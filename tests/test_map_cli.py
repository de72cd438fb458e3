"""``perfline map`` and the array loaders it uses (perfline.commands.map, toolbox.array_io)."""

from __future__ import annotations

from pathlib import Path

import nibabel
import numpy as np
import pytest
import scipy.io

from perfline.cli import main
from perfline.toolbox import flow_models as fm
from perfline.toolbox.array_io import ArrayIOError, load_array, save_map

QPERF = Path("/work/shared/data/qperf/examples")
DT = 0.5
T = 50


def _inputs(rows: int = 8, cols: int = 9):
    """Blood AIF [T] with a baseline offset and a [rows, cols, T] Fermi tissue series."""
    time = np.arange(T) * DT
    x = np.clip(time - 6.0, 0.0, None)
    bolus = x**3 * np.exp(-x / 1.5)
    blood = 4.0 * bolus / bolus.max() + 0.05
    mbf = np.linspace(0.8, 3.5, rows * cols)
    tissue = fm.fermi_tissue_curves((blood - 0.05) / (1 - 0.42), DT, mbf, 0.4, 3.0, 0.5)
    return blood, tissue.reshape(rows, cols, T), mbf.reshape(rows, cols)


def test_map_npy_in_npy_out(tmp_path):
    blood, series, mbf = _inputs()
    np.save(tmp_path / "aif.npy", blood)
    np.save(tmp_path / "series.npy", series)
    out = tmp_path / "mbf.npy"
    code = main(["map", "--aif", str(tmp_path / "aif.npy"), "--series", str(tmp_path / "series.npy"),
                 "--dt", "0.5", "--hematocrit", "0.42", "--model", "fermi", "--out", str(out)])
    assert code == 0
    result = np.load(out)
    assert result.shape == mbf.shape
    assert np.median(np.abs(result / mbf - 1)) < 0.1


def test_map_mat_and_npz_variables_png_and_all_maps(tmp_path):
    blood, series, mbf = _inputs()
    scipy.io.savemat(tmp_path / "data.mat", {"data": series, "aif": blood[:, None]})
    np.savez(tmp_path / "more.npz", aif=blood, other=np.ones(3))
    png = tmp_path / "mbf.png"
    code = main(["map", "--aif", f"{tmp_path / 'more.npz'}:aif", "--series", f"{tmp_path / 'data.mat'}:data",
                 "--foot", "11", "--model", "fermi", "--out", str(png), "--all-maps", str(tmp_path / "all.npz")])
    assert code == 0
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    with np.load(tmp_path / "all.npz") as maps:
        assert set(maps.files) == {"mbf_ml_min_g", "ps_ml_min_g", "vp", "visf", "delay_s", "fit_rmse"}
        assert np.median(np.abs(maps["mbf_ml_min_g"] / mbf - 1)) < 0.1


@pytest.mark.parametrize(
    "aif_length, message",
    [(T - 1, "frames"), (None, "no bolus")],
    ids=["mismatched-lengths", "no-bolus"],
)
def test_map_bad_input_exits_with_message(tmp_path, capsys, aif_length, message):
    blood, series, _ = _inputs()
    aif = blood[:aif_length] if aif_length else np.full(T, 0.3)
    np.save(tmp_path / "aif.npy", aif)
    np.save(tmp_path / "series.npy", series)
    code = main(["map", "--aif", str(tmp_path / "aif.npy"), "--series", str(tmp_path / "series.npy"),
                 "--out", str(tmp_path / "mbf.npy")])
    assert code == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "mbf.npy").exists()


def test_load_array_errors_and_formats(tmp_path):
    with pytest.raises(ArrayIOError, match="not found"):
        load_array(str(tmp_path / "missing.npy"))
    scipy.io.savemat(tmp_path / "two.mat", {"a": np.ones(2), "b": np.zeros(2)})
    with pytest.raises(ArrayIOError, match="VARIABLE"):
        load_array(str(tmp_path / "two.mat"))
    with pytest.raises(ArrayIOError, match="no variable 'c'"):
        load_array(f"{tmp_path / 'two.mat'}:c")
    (tmp_path / "x.txt").write_text("1 2 3")
    with pytest.raises(ArrayIOError, match=r"\.npy"):
        load_array(str(tmp_path / "x.txt"))
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError):  # never unpickles
        load_array(str(tmp_path / "obj.npy"))
    data = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    save_map(tmp_path / "m.nii", data)
    np.testing.assert_array_equal(load_array(str(tmp_path / "m.nii")), data)
    with pytest.raises(ArrayIOError, match="2-D"):
        save_map(tmp_path / "m.png", data)
    with pytest.raises(ArrayIOError, match="unsupported output"):
        save_map(tmp_path / "m.jpg", data[0])


@pytest.mark.skipif(not QPERF.exists(), reason="QPerf example data not available")
def test_qperf_analyze_inputs_match_mat_and_give_physiological_rest_flow(tmp_path):
    analyze = load_array(str(QPERF / "data.hdr"))
    mat = load_array(f"{QPERF / 'perf_data.mat'}:data")
    np.testing.assert_allclose(analyze, mat, atol=1e-5)
    assert nibabel.load(str(QPERF / "aif.hdr")).shape[0] == analyze.shape[-1]
    out = tmp_path / "rest.npy"
    code = main(["map", "--aif", str(QPERF / "aif.hdr"), "--series", str(QPERF / "data.hdr"),
                 "--dt", "0.5", "--hematocrit", "0.42", "--foot", "22", "--model", "fermi", "--out", str(out)])
    assert code == 0
    mbf = np.load(out)
    # tissue pixels (no blood pool: peak Gd below 2 mmol/L) fitted well
    tissue = (analyze.max(axis=-1) < 2.0) & (analyze.max(axis=-1) > 0.3) & np.isfinite(mbf)
    assert 0.6 <= np.median(mbf[tissue]) <= 1.4
