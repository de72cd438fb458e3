"""ResUNet shapes, configuration checks, loss behaviour, weights round trip and ONNX parity."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from perfline.models.resunet import (ResUNet, ResUNetConfig, count_convolutions,  # noqa: E402
                                     segmentation_loss)
from perfline.models.weights import (ChecksumError, export_onnx, load_torch_model,  # noqa: E402
                                     save_weights, verified_path)

TINY = ResUNetConfig(in_channels=6, filters=(4, 8), blocks=(1, 1), stem_stride=2)


@pytest.mark.parametrize("config", [TINY, ResUNetConfig(in_channels=6, filters=(4, 8, 8),
                                                         blocks=(1, 2, 1), stem_stride=1)],
                         ids=["two-levels-stride2", "three-levels"])
def test_output_shape_matches_input_grid(config):
    model = ResUNet(config).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 6, 32, 48))
    assert out.shape == (2, 4, 32, 48)


def test_paper_configuration_and_validation():
    paper = ResUNetConfig.paper()
    assert paper.filters == (64, 128) and paper.blocks == (2, 3) and paper.stem_stride == 1
    # 2 + 3 encoder blocks, 2 decoder blocks (two convs each), stem, down, up, merge, head
    assert count_convolutions(ResUNet(paper)) == 2 * (2 + 3 + 2) + 5
    with pytest.raises(ValueError, match="one entry per level"):
        ResUNetConfig(filters=(8, 16), blocks=(1,))
    with pytest.raises(ValueError, match="extra"):
        ResUNetConfig(filter=(8,))


def test_loss_is_small_for_confident_truth_and_training_reduces_it():
    target = torch.zeros(1, 16, 16, dtype=torch.long)
    target[:, 4:12, 4:12] = 2
    perfect = torch.nn.functional.one_hot(target, 4).permute(0, 3, 1, 2).float() * 20
    assert segmentation_loss(perfect, target) < 0.01
    assert segmentation_loss(-perfect, target) > 1.0
    with pytest.raises(ValueError, match="expected logits"):
        segmentation_loss(perfect[0], target)
    torch.manual_seed(0)
    model = ResUNet(TINY)
    x = torch.zeros(2, 6, 16, 16)
    x[:, :, 4:12, 4:12] = 1.0
    y = target.repeat(2, 1, 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(30):
        loss = segmentation_loss(model(x), y)
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5 * first


def test_weights_round_trip_checksum_and_onnx_parity(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(1)
    model = ResUNet(TINY).eval()
    stem = tmp_path / "tiny"
    save_weights(model, stem, metadata={"note": "test"})
    export_onnx(model, stem)
    sidecar = json.loads(stem.with_suffix(".json").read_text())
    assert set(sidecar["sha256"]) == {"safetensors", "onnx"} and sidecar["note"] == "test"
    loaded = load_torch_model(stem)
    x = torch.randn(2, 6, 176, 176)
    with torch.no_grad():
        expected = model(x).numpy()
        assert np.allclose(loaded(x).numpy(), expected, atol=1e-5)
    session = ort.InferenceSession(str(verified_path(stem, ".onnx")),
                                   providers=["CPUExecutionProvider"])
    assert np.allclose(session.run(None, {"series": x.numpy()})[0], expected, atol=1e-4)
    data = bytearray(stem.with_suffix(".onnx").read_bytes())
    data[-1] ^= 0xFF
    stem.with_suffix(".onnx").write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match="SHA-256"):
        verified_path(stem, ".onnx")


# ---- training-time realism (models/augment.py) -------------------------------------------

def _ring_phantom(frames: int = 20, size: int = 96):
    """Synthetic short-axis slice: LV pool radius 12 px, myocardium to 18 px, RV blob;
    blood and myocardium curves with different shapes, background flat."""
    from types import SimpleNamespace

    rows, cols = np.indices((size, size))
    radius = np.hypot(rows - 48, cols - 48)
    labels = np.zeros((size, size), dtype=np.uint8)
    labels[np.hypot(rows - 48, cols - 22) < 11] = 3
    labels[radius < 18] = 2
    labels[radius < 12] = 1
    t = np.arange(frames, dtype=np.float32)
    blood = 4.0 * np.exp(-0.5 * ((t - 6) / 2.0) ** 2) + 0.5
    myo = 0.8 / (1 + np.exp(-(t - 9))) + 0.1
    curves = {0: np.full(frames, 0.05, np.float32), 1: blood, 2: myo, 3: blood * 1.2}
    series = np.zeros((frames, size, size), np.float32)
    for label, curve in curves.items():
        series[:, labels == label] = curve[:, None]
    return SimpleNamespace(gd=series, signal=np.concatenate([series[:3], series]), n_pd_frames=3,
                           labels=labels, pixel_spacing_mm=1.5, lv_center_rc=(48.0, 48.0))


def test_realism_paints_only_where_the_labels_allow():
    from perfline.models.augment import Realism, add_structures

    slice_ = _ring_phantom()
    rng = np.random.default_rng(3)
    off = add_structures(slice_.gd, slice_.labels, 1.5, rng, Realism(), signal_units=False)
    assert np.array_equal(off, slice_.gd)
    inside = Realism(papillary_probability=1, trabeculation_probability=1)
    painted = add_structures(slice_.gd, slice_.labels, 1.5, rng, inside, signal_units=False)
    changed = np.abs(painted - slice_.gd).max(axis=0) > 1e-4
    assert changed.any() and np.all(slice_.labels[changed] == 1)
    # papillary muscles / trabeculation take the myocardial curve: darker than blood at its peak
    assert painted[6][changed].mean() < slice_.gd[6][changed].mean() - 0.5
    outside = Realism(fat_probability=1, clutter_probability=1)
    changed = np.zeros_like(changed)
    for seed in range(4):
        painted = add_structures(slice_.gd, slice_.labels, 1.5, np.random.default_rng(seed),
                                 outside, signal_units=True)
        changed |= np.abs(painted - slice_.gd).max(axis=0) > 1e-4
    assert changed.any() and np.all(slice_.labels[changed] == 0)
    with pytest.raises(ValueError, match="differ in-plane"):
        add_structures(slice_.gd, slice_.labels[:-1], 1.5, rng, inside, signal_units=False)


def test_elastic_warp_moves_labels_with_the_image_and_noise_is_correlated():
    from perfline.models.augment import Realism, correlated_noise, elastic_displacement
    from perfline.models.data import Augmentation, augmented_sample

    settings = Realism(elastic_probability=1, elastic_mm=(3.0, 3.0))
    field = elastic_displacement(64, 1.0, np.random.default_rng(0), settings)
    assert field.shape == (2, 64, 64) and np.isclose(np.abs(field).max(), 3.0)
    noise = correlated_noise((4, 64, 64), 1.5, np.random.default_rng(0))
    neighbour = np.corrcoef(noise[:, :, :-1].ravel(), noise[:, :, 1:].ravel())[0, 1]
    assert abs(noise.std() - 1) < 0.05 and neighbour > 0.5
    plain = dict(scale=(1, 1), rotation_deg=0, center_shift_mm=0, motion_mm=0,
                 start_frame_shift=(0, 0), frame_interval=(1, 1), gamma=(1, 1), shading=0,
                 noise_sd=(0, 0), signal_units_probability=0, small_fov_probability=0)
    slice_ = _ring_phantom()
    crop, labels = augmented_sample(slice_, np.random.default_rng(1), Augmentation(**plain))
    warped, warped_labels = augmented_sample(
        slice_, np.random.default_rng(1), Augmentation(**plain, realism=settings))
    assert not np.array_equal(labels, warped_labels)
    # the image follows its labels: blood-pool pixels are bright at the blood peak
    for image, truth in ((crop, labels), (warped, warped_labels)):
        bright = image[6] > 0.5 * image[6].max()
        assert bright[truth == 1].mean() > 0.97 and bright[truth == 2].mean() < 0.05


def test_tight_field_of_view_is_sized_to_the_heart_and_zeroes_image_and_labels_together():
    from perfline.models.data import Augmentation, augmented_sample

    plain = dict(scale=(1, 1), rotation_deg=0, center_shift_mm=0, motion_mm=0,
                 start_frame_shift=(0, 0), frame_interval=(1, 1), gamma=(1, 1), shading=0,
                 noise_sd=(0, 0), signal_units_probability=0, small_fov_probability=0)
    slice_ = _ring_phantom()  # epicardium radius 18 px of 1.5 mm = 27 mm = 27 crop pixels
    full, full_labels = augmented_sample(slice_, np.random.default_rng(2), Augmentation(**plain))
    tight = Augmentation(**plain, tight_fov_probability=1, tight_fov_ratio=(1.2, 1.2),
                         tight_fov_offset=0)
    crop, labels = augmented_sample(slice_, np.random.default_rng(2), tight)
    inside = np.abs(crop).max(axis=0) > 0
    rows, cols = np.nonzero(inside)
    # the box is 2 x 1.2 x the equivalent epicardial radius (about 27 crop pixels) on each axis
    for extent in (rows.max() - rows.min() + 1, cols.max() - cols.min() + 1):
        assert 2 * 1.2 * 24 < extent < 2 * 1.2 * 30
    assert not np.any(labels[~inside]) and np.any(full_labels[~inside] == 3)  # RV cut away
    assert np.array_equal(labels[inside], full_labels[inside])
    assert (labels == 2).sum() == (full_labels == 2).sum()  # the whole ring stays at 1.2
    # renormalised to what the box keeps: a bright object outside it no longer sets the scale
    from perfline.models.data import CROP_SIZE, _zero_outside_heart_box

    image = np.zeros((2, CROP_SIZE, CROP_SIZE), np.float32)
    heart_labels = np.zeros((CROP_SIZE, CROP_SIZE), np.uint8)
    heart_labels[78:98, 78:98] = 2
    image[:, 78:98, 78:98] = 0.25
    image[:, 5:20, 5:20] = 1.0  # far outside a box of 0.9-1.8 heart radii
    _zero_outside_heart_box(image, heart_labels, np.random.default_rng(0), tight)
    assert image[:, :30, :30].max() == 0 and np.isclose(image.max(), 1.0)


def test_torch_standard_normal_is_standard_and_follows_the_numpy_generator():
    from perfline.models.augment import standard_normal

    first = standard_normal((8, 64, 64), np.random.default_rng(5))
    assert first.dtype == np.float32 and first.shape == (8, 64, 64)
    assert abs(first.mean()) < 0.02 and abs(first.std() - 1) < 0.02
    assert np.array_equal(first, standard_normal((8, 64, 64), np.random.default_rng(5)))
    assert not np.array_equal(first, standard_normal((8, 64, 64), np.random.default_rng(6)))


def test_bf16_autocast_gradients_match_float32():
    torch.manual_seed(2)
    model = ResUNet(TINY)
    x = torch.rand(2, 6, 32, 32)
    y = torch.randint(0, 4, (2, 32, 32))
    gradients = []
    for enabled in (False, True):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            logits = model(x)
        assert logits.dtype == (torch.bfloat16 if enabled else torch.float32)
        segmentation_loss(logits.float(), y).backward()
        gradients.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    cosine = torch.nn.functional.cosine_similarity(gradients[0], gradients[1], dim=0)
    assert cosine > 0.98


def test_training_run_from_settings_json_writes_best_and_resumes(tmp_path):
    """Two tiny epochs through ``python -m perfline.models.train`` (bf16 autocast, realism
    augmentation, simulated studies), then a resumed third epoch."""
    pytest.importorskip("perfline.simulator")
    from perfline.models.train import TrainSettings, main

    settings = TrainSettings(
        network=ResUNetConfig(filters=(4, 8), blocks=(1, 1), stem_stride=2),
        epochs=2, steps_per_epoch=1, batch_size=2, validation_studies=1, workers=0,
        autocast_bf16=True, augmentations_per_slice=1, simulator_frames=48,
        augmentation={"realism": {"papillary_probability": 1, "fat_probability": 1,
                                  "elastic_probability": 1, "correlated_noise_probability": 1}})
    out = tmp_path / "run"
    assert main(["--settings", settings.model_dump_json(), "--out", str(out)]) == 0
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [entry["epoch"] for entry in log] == [0, 1]
    assert all(0 <= entry["val_dice_myo"] <= 1 and np.isfinite(entry["train_loss"])
               for entry in log)
    best = json.loads((out / "best.json").read_text())
    assert best["settings"]["autocast_bf16"] is True
    assert best["metrics"]["val_dice_myo"] == max(entry["val_dice_myo"] for entry in log)
    resumed = settings.model_copy(update={"epochs": 3})
    settings_file = tmp_path / "settings.json"
    settings_file.write_text(resumed.model_dump_json())
    assert main(["--settings", str(settings_file), "--out", str(out), "--resume"]) == 0
    log = (out / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in log] == [0, 1, 2]


def test_perfline_train_options_and_settings_file(tmp_path):
    """`perfline train --bf16 --augmentations-per-slice N` reach TrainSettings; a bad --settings
    file is refused with a message instead of a traceback."""
    import argparse

    from perfline.commands.train import _settings_from_options, add_parser, run

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["train", "--out", str(tmp_path), "--bf16", "--augmentations-per-slice", "2",
                              "--filters", "4", "8", "--blocks", "1", "1"])
    settings = _settings_from_options(args)
    assert settings.autocast_bf16 is True and settings.augmentations_per_slice == 2
    assert tuple(settings.network.filters) == (4, 8)
    default = _settings_from_options(parser.parse_args(["train", "--out", str(tmp_path)]))
    assert default.autocast_bf16 is False and default.augmentations_per_slice == 3
    bad = tmp_path / "bad.json"
    bad.write_text('{"epochs": "many"}')
    assert run(parser.parse_args(["train", "--out", str(tmp_path / "o"), "--settings", str(bad)])) == 2
    assert not (tmp_path / "o").exists()
