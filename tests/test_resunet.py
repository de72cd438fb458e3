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
