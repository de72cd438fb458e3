"""Segmentation speed: model load and ms per slice (176 x 176 x 48 crop) of the shipped network
with each runtime against PyTorch eager fp32 of the same weights, in the same process with the
same thread count, calls alternating so that all see the same machine load; plus whole
``Segmenter.segment`` calls (crop, network, uncrop, post-processing, RV insertion) with the
reference resampling (``scipy.ndimage.map_coordinates``) and with the separable one. Prints
medians and the load average.

    python benchmarks/bench_segmentation.py [--model STEM] [--repeats 30] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
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


def load_ms(model: Path, runtime: str, threads: int, cache_dir: Path | None,
            repeats: int = 5, *, keep_compiled: bool = False) -> float:
    """Median ``Segmenter`` construction time; OpenVINO's in-process compiled models are
    forgotten before each load unless ``keep_compiled``."""
    from perfline.models.inference import Segmenter, clear_compiled_models

    times = []
    for _ in range(repeats):
        if not keep_compiled:
            clear_compiled_models()
        times.append(Segmenter(model, runtime=runtime, threads=threads,
                               cache_dir=cache_dir).load_ms)
    return statistics.median(times)


def main() -> None:
    from perfline.models.inference import Segmenter, cpu_has_vnni
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
    print(f"model {args.model.name}: {args.threads} thread(s), {args.repeats} repeats (medians); "
          f"load average before {' '.join(f'{v:.1f}' for v in os.getloadavg())}")

    crop = np.random.default_rng(0).random((1, 48, 176, 176), dtype=np.float32)
    # what runtime="auto" chooses on this machine; its first load in a process probes (and
    # imports) the runtimes in turn, as a server's warm-up does
    fastest = Segmenter(args.model, threads=args.threads)
    segmenters = {"onnxruntime": Segmenter(args.model, runtime="onnxruntime", threads=args.threads)}
    try:  # the int8 graph (explicitly, so also on a CPU without VNNI)
        segmenters["onnxruntime-int8"] = Segmenter(args.model, runtime="onnxruntime-int8",
                                                   threads=args.threads)
    except (OSError, RuntimeError) as error:
        print(f"int8 graph not available: {error}")
    try:
        segmenters["openvino"] = Segmenter(args.model, runtime="openvino", threads=args.threads)
    except ImportError as error:
        print(f"openvino not available: {error}")
    print(f"onnxruntime model load (SHA-256 + session): "
          f"{load_ms(args.model, 'onnxruntime', args.threads, None):.1f} ms")
    if "onnxruntime-int8" in segmenters:
        print(f"onnxruntime int8 model load (sidecars + SHA-256 + session): "
              f"{load_ms(args.model, 'onnxruntime-int8', args.threads, None):.1f} ms")
    if "openvino" in segmenters:
        with tempfile.TemporaryDirectory() as folder:
            compiling = load_ms(args.model, "openvino", args.threads, None, repeats=3)
            Segmenter(args.model, runtime="openvino", threads=args.threads, cache_dir=Path(folder))
            cached = load_ms(args.model, "openvino", args.threads, Path(folder))
            in_memory = load_ms(args.model, "openvino", args.threads, Path(folder),
                                keep_compiled=True)
        print(f"openvino model load: SHA-256 + compile {compiling:.1f} ms; SHA-256 + import from "
              f"the verified disk cache {cached:.1f} ms; SHA-256 + compiled model already in "
              f"the process (after the server warm-up) {in_memory:.1f} ms")
    model = load_torch_model(args.model)
    tensor = torch.from_numpy(crop)

    def eager() -> None:
        with torch.no_grad():
            model(tensor)

    # network only (logits, like the eager call); predict() adds the softmax in numpy
    functions = {name: (lambda s=s: s.logits(crop)) for name, s in segmenters.items()}
    functions["torch"] = eager
    print(f"runtime chosen by auto on this CPU: {fastest.runtime} {fastest.precision} "
          f"(VNNI: {cpu_has_vnni()}); auto load, first in this process {fastest.load_ms:.1f} ms, "
          f"then {load_ms(args.model, 'auto', args.threads, None, keep_compiled=True):.1f} ms")
    functions["predict"] = lambda: fastest.predict(crop)
    medians = interleaved_medians_ms(functions, args.repeats)
    for name, segmenter in segmenters.items():
        print(f"{name} {segmenter.precision}: {medians[name]:.1f} ms/slice -> "
              f"{medians['torch'] / medians[name]:.1f}x pytorch eager fp32")
    print(f"pytorch eager fp32: {medians['torch']:.1f} ms/slice; predict() (network + softmax, "
          f"auto's runtime): {medians['predict']:.1f} ms")

    from perfline.models import inference
    from perfline.simulator import simulate_image_study

    slice_ = simulate_image_study(2 ** 30 + 5, n_slices=3)[1]
    series, spacing = slice_.gd[:48], slice_.pixel_spacing_mm
    segmenter = Segmenter(args.model, threads=args.threads)

    aligned = inference._is_axis_aligned

    def whole_call(reference: bool, center: tuple[float, float] | None):
        def call() -> None:
            # reference: every crop takes the map_coordinates path (as before the separable one)
            inference._is_axis_aligned = (lambda geometry: False) if reference else aligned
            segmenter.segment(series, spacing, center_rc=center)
        return call

    calls = {f"{where} {name}": whole_call(name == "map_coordinates", center)
             for name in ("map_coordinates", "separable")
             for where, center in (("given", slice_.lv_center_rc), ("detect", None))}
    whole = interleaved_medians_ms(calls, max(3, args.repeats // 3))
    inference._is_axis_aligned = aligned
    print(f"whole segment() ({segmenter.runtime} {segmenter.precision}) of one simulated "
          f"{series.shape[1]}x{series.shape[2]}x48 slice, crop resampling map_coordinates -> "
          f"separable: LV centre given {whole['given map_coordinates']:.1f} -> "
          f"{whole['given separable']:.1f} ms; with detection {whole['detect map_coordinates']:.1f}"
          f" -> {whole['detect separable']:.1f} ms")
    print(f"load average after {' '.join(f'{v:.1f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
