"""The shipped int8 graphs (ONNX Runtime, chosen by runtime="auto" on CPUs with VNNI and no
native bf16): verified, made from the shipped weights, and labelling like the fp32 graph."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from perfline.models import inference
from perfline.models.inference import Segmenter, cpu_has_vnni, cpu_lacks_bf16, int8_stem
from perfline.models.weights import DEFAULT_MODEL, ChecksumError, read_sidecar, sha256_of
from perfline.toolbox.seg_metrics import angle_error_deg, dice

pytest.importorskip("onnxruntime")
SHIPPED = (DEFAULT_MODEL, DEFAULT_MODEL.with_name(DEFAULT_MODEL.name + "_signal"))


@pytest.mark.parametrize("stem", SHIPPED, ids=lambda stem: stem.name)
def test_shipped_int8_graph_is_quantised_from_the_shipped_onnx(stem):
    quantised = int8_stem(stem)
    sidecar = read_sidecar(quantised)
    # a retrained model without a new int8 graph would fail here (and auto falls back to fp32)
    assert sidecar["quantization"]["source_onnx_sha256"] == sha256_of(stem.with_suffix(".onnx"))
    assert sidecar["sha256"]["onnx"] == sha256_of(quantised.with_suffix(".onnx"))
    assert sidecar["network"] == read_sidecar(stem)["network"]
    scale = read_sidecar(stem).get("class_probability_scale")
    assert sidecar.get("class_probability_scale") == scale


@pytest.mark.skipif(not cpu_has_vnni(), reason="int8 accuracy is measured with VNNI; without it "
                    "ONNX Runtime's u8 x s8 path can saturate and auto never chooses the graph")
def test_int8_labels_match_fp32_on_a_held_out_slice():
    from perfline.simulator import simulate_image_study

    slice_ = simulate_image_study(2 ** 30 + 778, kind="rest", field_strength_t=1.5,
                                  n_slices=3)[1]
    results = {}
    for runtime in ("onnxruntime", "onnxruntime-int8"):
        segmenter = Segmenter(DEFAULT_MODEL, runtime=runtime)
        assert segmenter.runtime == "onnxruntime"
        assert segmenter.precision == ("int8" if runtime.endswith("int8") else "fp32")
        results[runtime] = segmenter.segment(slice_.gd, slice_.pixel_spacing_mm)
    fp32, int8 = results["onnxruntime"], results["onnxruntime-int8"]
    for label in (1, 2, 3):
        assert dice(int8.labels == label, fp32.labels == label) > 0.97
    assert dice(int8.labels == 2, slice_.labels == 2) > 0.9
    assert angle_error_deg(int8.rv_insertion_deg, fp32.rv_insertion_deg) < 3.0
    assert int8.closed_ring and not int8.flags


def _no_openvino(self, cache_dir, *, require_bf16):
    raise RuntimeError("no native bf16 (test)")


def test_auto_takes_int8_only_with_vnni(monkeypatch):
    monkeypatch.setattr(Segmenter, "_load_openvino", _no_openvino)
    monkeypatch.setattr(inference, "cpu_has_vnni", lambda: True)
    chosen = Segmenter(DEFAULT_MODEL)
    assert (chosen.runtime, chosen.precision) == ("onnxruntime", "int8")
    monkeypatch.setattr(inference, "cpu_has_vnni", lambda: False)
    chosen = Segmenter(DEFAULT_MODEL)
    assert (chosen.runtime, chosen.precision) == ("onnxruntime", "fp32")
    # asked for explicitly, the int8 graph runs without VNNI too
    assert Segmenter(DEFAULT_MODEL, runtime="onnxruntime-int8").precision == "int8"


def test_int8_graph_of_other_weights_is_refused(tmp_path, monkeypatch, caplog):
    for suffix in (".json", ".onnx", ".safetensors"):
        shutil.copy(DEFAULT_MODEL.with_suffix(suffix), tmp_path / f"m{suffix}")
    for suffix in (".json", ".onnx"):
        shutil.copy(int8_stem(DEFAULT_MODEL).with_suffix(suffix), tmp_path / f"m_int8{suffix}")
    sidecar_path = tmp_path / "m_int8.json"
    sidecar = json.loads(sidecar_path.read_text())
    sidecar["quantization"]["source_onnx_sha256"] = "0" * 64   # as after retraining
    sidecar_path.write_text(json.dumps(sidecar))
    with pytest.raises(ChecksumError, match="quantised from an ONNX graph"):
        Segmenter(tmp_path / "m", runtime="onnxruntime-int8")
    monkeypatch.setattr(Segmenter, "_load_openvino", _no_openvino)
    monkeypatch.setattr(inference, "cpu_has_vnni", lambda: True)
    chosen = Segmenter(tmp_path / "m")
    assert (chosen.runtime, chosen.precision) == ("onnxruntime", "fp32")
    assert "quantised from an ONNX graph" in caplog.text
    # no int8 graph at all: the same fall-back
    for suffix in (".json", ".onnx"):
        (tmp_path / f"m_int8{suffix}").unlink()
    assert Segmenter(tmp_path / "m").precision == "fp32"


def test_cpu_has_vnni_reads_the_flags(tmp_path: Path):
    def cpuinfo(flags: str) -> Path:
        path = tmp_path / "cpuinfo"
        path.write_text(f"processor\t: 0\nflags\t\t: fpu sse2 {flags}\n\nprocessor\t: 1\n")
        return path

    assert cpu_has_vnni(cpuinfo("avx2 avx512f avx512_vnni"))
    assert cpu_has_vnni(cpuinfo("avx2 avx_vnni"))
    assert not cpu_has_vnni(cpuinfo("avx2 avx512f avx512_bf16 amx_bf16"))
    assert not cpu_has_vnni(tmp_path / "missing")
    assert isinstance(cpu_has_vnni(), bool)
    # auto skips OpenVINO (without importing it) only when the flags say "no bf16"
    assert cpu_lacks_bf16(cpuinfo("avx2 avx512f avx512_vnni"))
    assert not cpu_lacks_bf16(cpuinfo("avx512f avx512_bf16"))
    assert not cpu_lacks_bf16(cpuinfo("amx_tile amx_bf16"))
    assert not cpu_lacks_bf16(tmp_path / "missing")
