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


def interleaved_medians_ms(functions: dict, repeats: int) -> dict[str, float]:
    """Median ms of each function, calls alternating so that all see the same machine load
    (the 2 cores here are shared)."""
    for function in functions.values():
        function()
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            started = time.perf_counter()
            function()
            times[name].append(1000.0 * (time.perf_counter() - started))
    return {name: statistics.median(values) for name, values in times.items()}


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
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import logging

    import torch

    logging.basicConfig(level=logging.ERROR)

    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    crop = rng.random((1, 48, 176, 176), dtype=np.float32)
    loads = []
    for _ in range(5):
        segmenter = Segmenter(args.model, runtime="onnxruntime", threads=args.threads)
        loads.append(segmenter.load_ms)
    print(f"model {args.model.name}: {args.threads} threads, {args.repeats} repeats (medians)")
    print(f"onnxruntime model load (SHA-256 + session): {statistics.median(loads):.1f} ms")
    model = load_torch_model(args.model)
    tensor = torch.from_numpy(crop)

    def eager() -> None:
        with torch.no_grad():
            model(tensor)

    medians = interleaved_medians_ms({"ort": lambda: segmenter.predict(crop), "torch": eager},
                                     args.repeats)
    ort_ms, torch_ms = medians["ort"], medians["torch"]
    print(f"onnxruntime fp32: {ort_ms:.1f} ms/slice")
    print(f"pytorch eager fp32: {torch_ms:.1f} ms/slice -> onnxruntime fp32 {torch_ms / ort_ms:.1f}x")
    int8 = args.model.with_name(args.model.name + "_int8")
    if int8.with_suffix(".json").exists():
        quantised = Segmenter(int8, runtime="onnxruntime", threads=args.threads)
        int8_ms = median_ms(lambda: quantised.predict(crop), args.repeats)
        print(f"onnxruntime int8 load: {quantised.load_ms:.1f} ms; {int8_ms:.1f} ms/slice -> "
              f"{torch_ms / int8_ms:.1f}x pytorch eager fp32")
    from perfline.simulator import simulate_image_study

    slice_ = simulate_image_study(2 ** 30 + 5, n_slices=3)[1]
    series = slice_.gd[:48]
    repeats = max(3, args.repeats // 3)
    given = median_ms(lambda: segmenter.segment(series, slice_.pixel_spacing_mm,
                                                center_rc=slice_.lv_center_rc), repeats)
    found = median_ms(lambda: segmenter.segment(series, slice_.pixel_spacing_mm), repeats)
    print(f"whole segment() of one simulated {series.shape[1]}x{series.shape[2]}x48 slice: "
          f"{given:.1f} ms with the LV centre given, {found:.1f} ms with detection "
          f"(candidates + re-centred pass)")


if __name__ == "__main__":
    main()
