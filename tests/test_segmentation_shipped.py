"""The shipped models on a held-out simulated slice: `perfline segment`, the chain gadget and
`perfline evaluate` (accuracy floors well below the documented results, so they fail only on
real regressions)."""

from __future__ import annotations

import numpy as np
import pytest

from perfline.cli import main
from perfline.toolbox.seg_metrics import angle_error_deg, dice

HELD_OUT_SEED = 2 ** 30 + 777


@pytest.fixture(scope="module")
def held_out_slice():
    from perfline.simulator import simulate_image_study

    return simulate_image_study(HELD_OUT_SEED, kind="stress", field_strength_t=3.0,
                                n_slices=3)[1]


def test_segment_command_on_held_out_slice(held_out_slice, tmp_path, capsys):
    series = np.moveaxis(held_out_slice.gd, 0, 2)              # [rows, cols, time]
    np.save(tmp_path / "series.npy", series)
    out = tmp_path / "labels.npy"
    code = main(["segment", str(tmp_path / "series.npy"), "--pixel-spacing",
                 str(held_out_slice.pixel_spacing_mm), "--dt", "1.0", "--out", str(out)])
    assert code == 0
    labels = np.load(out)
    assert labels.shape == held_out_slice.labels.shape and labels.dtype == np.uint8
    assert dice(labels == 2, held_out_slice.labels == 2) > 0.9
    assert dice(labels == 1, held_out_slice.labels == 1) > 0.9
    printed = capsys.readouterr().out
    angle = float(printed.split("RV insertion (anterior):")[1].split("deg")[0])
    assert angle_error_deg(angle, held_out_slice.rv_insertion_deg) < 8.0


def test_segment_command_rejects_nan_series(tmp_path):
    from perfline.models.data import SeriesError

    series = np.full((64, 64, 30), np.nan)
    np.save(tmp_path / "nan.npy", series)
    with pytest.raises(SeriesError, match="NaN"):
        main(["segment", str(tmp_path / "nan.npy"), "--pixel-spacing", "1.5", "--dt", "1",
              "--out", str(tmp_path / "labels.npy")])


def test_gadget_passes_series_and_adds_segmentation(held_out_slice):
    from perfline.gadgets.perfusion_items import ImageGeometry, SliceSegmentation, SliceSeries
    from perfline.gadgets.segmentation import CnnSegmentation

    spacing = held_out_slice.pixel_spacing_mm
    rows, cols = held_out_slice.labels.shape
    series = SliceSeries(slice_index=1, data=held_out_slice.gd,
                         time_s=held_out_slice.time_s[held_out_slice.n_pd_frames:],
                         units="gd_mmol_l", n_pd_frames=0,
                         geometry=ImageGeometry(field_of_view_mm=(rows * spacing, cols * spacing,
                                                                  8.0),
                                                pixel_spacing_mm=(spacing, spacing)))
    outputs = list(CnnSegmentation().process(iter([series])))
    assert outputs[0] is series and isinstance(outputs[1], SliceSegmentation)
    assert dice(outputs[1].labels == 2, held_out_slice.labels == 2) > 0.9
    assert outputs[1].slice_index == 1 and not outputs[1].flags


def test_evaluate_command_prints_the_table(capsys):
    assert main(["evaluate", "--studies", "1"]) == 0
    printed = capsys.readouterr().out
    for row in ("myocardium Dice", "boundary error (mm)", "Hausdorff endo (max)",
                "RV insertion error (deg)"):
        assert row in printed
    dice_mean = float(printed.split("myocardium Dice")[1].split()[0])
    assert dice_mean > 0.9
