"""Static int8 quantisation of the exported ONNX graph with ONNX Runtime's tooling: the shipped
``models/STEM_int8.onnx`` graphs, which ``Segmenter(runtime="auto")`` runs with ONNX Runtime on
CPUs with VNNI and no native bf16 (docs/cnn_runtime.md). Re-make them whenever the weights
change: ``python -m perfline.models.quantize --model models/STEM --out models``.

QDQ format, per-channel int8 weights, uint8 activations, calibrated on crops of simulated
*training-split* studies (never held-out seeds, never real data). Calibration: MinMax,
Percentile or Entropy; by default the first convolution (48 raw frames in), the head
convolution and the final resize stay fp32, since the first MinMax trial lost accuracy there.
The result ``OUT/STEM_int8.onnx`` gets its own sidecar with the same network description and
its SHA-256, so ``Segmenter(OUT/STEM_int8)`` and ``perfline evaluate --model OUT/STEM_int8``
verify it at load like the shipped files.

    python -m perfline.models.quantize --out DIR [--model STEM] [--method percentile]
        [--studies 12] [--quantize-all]
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import tempfile
from pathlib import Path

import numpy as np

from perfline.models.weights import DEFAULT_MODEL, read_sidecar, sha256_of, verified_path

logger = logging.getLogger(__name__)

METHODS = ("minmax", "percentile", "entropy")
# node names of the exported ResUNet kept in fp32 unless --quantize-all
FLOAT_NODES = ("/stem/stem.0/stem.0.0/Conv", "/head/Conv", "/Resize")


def calibration_crops(n_studies: int = 12, first_seed: int = 500) -> np.ndarray:
    """Crops float32 [3 * n_studies, 48, 176, 176] of training-split simulated studies (no
    augmentation, true LV centre): the network's inputs for calibration."""
    from perfline.models.data import TEST_SEED_START, augmented_sample, is_validation_study
    from perfline.simulator import simulate_image_study

    rng = np.random.default_rng(first_seed)
    training = (s for s in range(first_seed, TEST_SEED_START) if not is_validation_study(s))
    crops = [augmented_sample(slice_, rng, None)[0]
             for seed in itertools.islice(training, n_studies)
             for slice_ in simulate_image_study(seed)]
    return np.stack(crops).astype(np.float32)


def quantize_int8(stem: Path, calibration: np.ndarray, out_dir: Path | None = None, *,
                  method: str = "percentile", percentile: float = 99.99,
                  float_nodes: tuple[str, ...] = FLOAT_NODES) -> Path:
    """Write ``out_dir/<stem name>_int8.onnx`` (+ .json sidecar) from the verified ``stem.onnx``.

    Args:
        stem: model stem with a verified ``.onnx``.
        calibration: float32 [n, frames, 176, 176] network inputs (crops).
        out_dir: folder of the result (default: next to ``stem``).
        method: calibration of the activation ranges, one of :data:`METHODS`.
        percentile: kept fraction (%) of each activation histogram for "percentile".
        float_nodes: ONNX node names left in fp32.
    """
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                          QuantType, quant_pre_process, quantize_static)

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    stem = Path(stem)
    source = verified_path(stem, ".onnx")
    target_stem = Path(out_dir or stem.parent) / (stem.name + "_int8")
    target = target_stem.with_suffix(".onnx")
    target.parent.mkdir(parents=True, exist_ok=True)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._items = iter(calibration[:, None].astype(np.float32))

        def get_next(self):
            item = next(self._items, None)
            return None if item is None else {"series": item}

    calibrate = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                 "entropy": CalibrationMethod.Entropy}[method]
    extra = {"CalibPercentile": percentile} if method == "percentile" else {}
    with tempfile.TemporaryDirectory() as folder:
        prepared = Path(folder) / "prepared.onnx"
        quant_pre_process(str(source), str(prepared))
        quantize_static(str(prepared), str(target), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=calibrate,
                        nodes_to_exclude=list(float_nodes), extra_options=extra)
    sidecar = read_sidecar(stem)
    sidecar["sha256"] = {"onnx": sha256_of(target)}
    sidecar["quantization"] = {
        "format": "QDQ", "weights": "int8 per channel", "activations": "uint8",
        "calibration": method, **({"percentile": percentile} if method == "percentile" else {}),
        "calibration_crops": len(calibration), "float_nodes": list(float_nodes),
        "source_onnx_sha256": sha256_of(source)}
    target_stem.with_suffix(".json").write_text(json.dumps(sidecar, indent=2, sort_keys=True)
                                                + "\n")
    logger.info("wrote %s (%s calibration, %d crops)", target, method, len(calibration))
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="int8 QDQ ONNX of a shipped segmentation model")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="model stem")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--method", choices=METHODS, default="percentile")
    parser.add_argument("--percentile", type=float, default=99.99)
    parser.add_argument("--studies", type=int, default=12, help="training-split studies (x3 crops)")
    parser.add_argument("--quantize-all", action="store_true",
                        help="also quantise the first and head convolutions")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    crops = calibration_crops(args.studies)
    quantize_int8(args.model, crops, args.out, method=args.method, percentile=args.percentile,
                  float_nodes=() if args.quantize_all else FLOAT_NODES)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
