"""Static int8 quantisation of the exported ONNX graph with ONNX Runtime's tooling.

QDQ format, per-channel int8 weights, uint8 activations, calibrated (MinMax) on crops of
simulated *training-split* studies. The result ``STEM_int8.onnx`` gets its own sidecar with
the same network description and its SHA-256. Accuracy must be checked with
``perfline evaluate --model STEM_int8`` before shipping it (docs/segmentation.md).
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import numpy as np

from perfline.models.weights import read_sidecar, sha256_of, verified_path

logger = logging.getLogger(__name__)


def quantize_int8(stem: Path, calibration: np.ndarray) -> Path:
    """Write ``stem_int8.onnx`` (+ .json) from ``stem.onnx``.

    Args:
        stem: model stem with a verified ``.onnx``.
        calibration: float32 [n, frames, 176, 176] network inputs (crops) for calibration.
    """
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quant_pre_process, quantize_static)

    stem = Path(stem)
    source = verified_path(stem, ".onnx")
    target_stem = stem.with_name(stem.name + "_int8")
    target = target_stem.with_suffix(".onnx")

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._items = iter(calibration[:, None].astype(np.float32))

        def get_next(self):
            item = next(self._items, None)
            return None if item is None else {"series": item}

    with tempfile.TemporaryDirectory() as folder:
        prepared = Path(folder) / "prepared.onnx"
        quant_pre_process(str(source), str(prepared))
        quantize_static(str(prepared), str(target), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8)
    sidecar = read_sidecar(stem)
    sidecar["sha256"] = {"onnx": sha256_of(target)}
    sidecar["quantization"] = {"format": "QDQ", "weights": "int8 per channel",
                               "activations": "uint8", "calibration_crops": len(calibration)}
    target_stem.with_suffix(".json").write_text(json.dumps(sidecar, indent=2, sort_keys=True)
                                                + "\n")
    logger.info("wrote %s", target)
    return target
