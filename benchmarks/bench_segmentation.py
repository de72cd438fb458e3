"""Segmentation speed: model load and ms per slice (176 x 176 x 48) of the shipped network with
ONNX Runtime (fp32 graph and, if shipped, the int8 graph) against PyTorch eager fp32 of the same
weights, in the same process; plus one whole ``Segmenter.segment`` call (crop, network,
uncrop, post-processing, RV insertion). Prints medians over repeated runs.

    python benchmarks/bench_segmentation.py [--model STEM] [--repeats 30] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np


def median_ms(function, repeats: int) -> float:
    function()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(1000.0 * (time.perf_counter() - started))
    return statistics.median(times)


def main() -> None:
    from perfline.models.inference import Segmenter
    from perfline.models.weights import DEFAULT_MODEL, load_torch_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    crop = rng.random((1, 48, 176, 176), dtype=np.float32)
    loads = []
    for _ in range(5):
        segmenter = Segmenter(args.model, runtime="onnxruntime", threads=args.threads)
        loads.append(segmenter.load_ms)
    print(f"model {args.model.name}: {args.threads} threads, {args.repeats} repeats (medians)")
    print(f"onnxruntime model load (SHA-256 + session): {statistics.median(loads):.1f} ms")
    ort_ms = median_ms(lambda: segmenter.predict(crop), args.repeats)
    model = load_torch_model(args.model)
    tensor = torch.from_numpy(crop)

    def eager() -> None:
        with torch.no_grad():
            model(tensor)

    torch_ms = median_ms(eager, args.repeats)
    print(f"onnxruntime fp32: {ort_ms:.1f} ms/slice")
    print(f"pytorch eager fp32: {torch_ms:.1f} ms/slice -> onnxruntime fp32 {torch_ms / ort_ms:.1f}x")
    int8 = args.model.with_name(args.model.name + "_int8")
    if int8.with_suffix(".json").exists():
        quantised = Segmenter(int8, runtime="onnxruntime", threads=args.threads)
        int8_ms = median_ms(lambda: quantised.predict(crop), args.repeats)
        print(f"onnxruntime int8 load: {quantised.load_ms:.1f} ms; {int8_ms:.1f} ms/slice -> "
              f"{torch_ms / int8_ms:.1f}x pytorch eager fp32")
    series = rng.random((48, 144, 192), dtype=np.float32)
    whole = median_ms(lambda: segmenter.segment(series, 1.875, center_rc=(72.0, 96.0)),
                      max(3, args.repeats // 3))
    print(f"whole segment() of one 144x192x48 slice (given centre, fp32): {whole:.1f} ms")


if __name__ == "__main__":
    main()
