"""Segmentation of one 2D+T perfusion slice with the shipped ResUNet (inference only).

Runs the ONNX graph with ONNX Runtime (measured fastest on this CPU, docs/segmentation.md);
falls back to PyTorch eager with the safetensors weights when ONNX Runtime is missing or fails
to load the graph. Both files are verified by SHA-256 before use (``perfline.models.weights``).
Pipeline (Xue et al. 2020 App. E2-E3): 1 mm, 176 x 176 crop centred on the LV, first 48
frames from the first SR frame, divided by the crop maximum -> softmax -> back to the input
grid -> QPerf post-processing -> RV insertion. Without a given LV centre, a detector on the
series gives a first centre and the CNN's own LV centroid a second, refined crop.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from perfline.models.data import (CROP_SIZE, CROP_SPACING_MM, CropGeometry, check_series,
                                  lv_center_candidates, sample_crop, uncrop_probabilities)
from perfline.models.weights import DEFAULT_MODEL, read_sidecar, verified_path
from perfline.toolbox.rv_insertion import InsertionNotFoundError, lv_center_rc, rv_insertion_deg
from perfline.toolbox.segmentation_post import PostProcessed, postprocess

logger = logging.getLogger(__name__)

RUNTIMES = ("auto", "onnxruntime", "torch")


@dataclass(frozen=True)
class SliceSegmentation:
    """Result for one slice on the input grid.

    labels: uint8 [rows, cols] (0 bg, 1 LV blood, 2 myocardium, 3 RV);
    probabilities: float32 [4, rows, cols]; lv_center_rc in input pixels;
    rv_insertion_deg: anterior RV insertion (docs/conventions.md), NaN when no RV was found;
    flags: human-readable problems (empty slice, open ring, missing class).
    """

    labels: np.ndarray
    probabilities: np.ndarray
    lv_center_rc: tuple[float, float]
    rv_insertion_deg: float
    closed_ring: bool
    empty: bool
    flags: tuple[str, ...]


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


class Segmenter:
    """The shipped network behind one ``predict`` call; ``runtime`` is "auto" (ONNX Runtime,
    else torch), "onnxruntime" or "torch"."""

    def __init__(self, stem: Path = DEFAULT_MODEL, *, runtime: str = "auto",
                 threads: int | None = None) -> None:
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
        started = time.perf_counter()
        self.stem = Path(stem)
        self.sidecar = read_sidecar(self.stem)
        self.n_frames = int(self.sidecar["network"]["in_channels"])
        # per-class factors on the softmax output (prior correction calibrated on simulated
        # validation studies, recorded in the sidecar; 1 = none)
        scale = self.sidecar.get("class_probability_scale", [1.0] * 4)
        self.class_scale = np.asarray(scale, dtype=np.float32).reshape(1, -1, 1, 1)
        self.runtime = ""
        if runtime in ("auto", "onnxruntime"):
            try:
                self._load_onnxruntime(threads)
            except (ImportError, OSError, RuntimeError) as error:
                if runtime == "onnxruntime":
                    raise
                logger.warning("ONNX Runtime unavailable (%s); falling back to torch", error)
        if not self.runtime:
            self._load_torch(threads)
        self.load_ms = 1000.0 * (time.perf_counter() - started)
        logger.debug("loaded %s with %s in %.1f ms", self.stem, self.runtime, self.load_ms)

    def _load_onnxruntime(self, threads: int | None) -> None:
        import onnxruntime

        path = verified_path(self.stem, ".onnx")
        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        # one thread by default: on the shared 2-core machine two threads measured slower
        # (docs/segmentation.md); the chain runs other gadgets in parallel anyway
        options.intra_op_num_threads = threads or 1
        options.log_severity_level = 3
        self._session = onnxruntime.InferenceSession(str(path), options,
                                                     providers=["CPUExecutionProvider"])
        self._input_name = self._session.get_inputs()[0].name
        self.runtime = "onnxruntime"

    def _load_torch(self, threads: int | None) -> None:
        import torch

        from perfline.models.weights import load_torch_model

        if threads:
            torch.set_num_threads(threads)
        self._torch = torch
        self._model = load_torch_model(self.stem)
        self.runtime = "torch"

    def predict(self, crops: np.ndarray) -> np.ndarray:
        """Class probabilities float32 [batch, 4, 176, 176] of crops [batch, frames, 176, 176]."""
        crops = np.ascontiguousarray(crops, dtype=np.float32)
        if crops.ndim != 4 or crops.shape[1:] != (self.n_frames, 176, 176):
            raise ValueError(f"expected crops [batch, {self.n_frames}, 176, 176], got "
                             f"{crops.shape}")
        if self.runtime == "onnxruntime":
            logits = self._session.run(None, {self._input_name: crops})[0]
        else:
            with self._torch.inference_mode():
                logits = self._model(self._torch.from_numpy(crops)).numpy()
        probabilities = _softmax(logits.astype(np.float32)) * self.class_scale
        return probabilities / probabilities.sum(axis=1, keepdims=True)

    def _probabilities(self, series: np.ndarray, pixel_spacing_mm: float,
                       centers: list[tuple[float, float]]) -> list[np.ndarray]:
        """Crop probabilities [4, 176, 176] for each centre (one batched network call)."""
        crops = np.stack([sample_crop(series, CropGeometry.centred(
            series.shape[1:], pixel_spacing_mm, center), n_frames=self.n_frames)
            for center in centers])
        return list(self.predict(crops))

    @staticmethod
    def _heart_score(probabilities: np.ndarray, radius_mm: float = 40.0) -> float:
        """Expected LV blood + myocardium area (mm2) within ``radius_mm`` of the crop centre."""
        half = (CROP_SIZE - 1) / 2.0
        rows, cols = np.indices((CROP_SIZE, CROP_SIZE))
        near = np.hypot(rows - half, cols - half) * CROP_SPACING_MM < radius_mm
        return float((probabilities[1] + probabilities[2])[near].sum()) * CROP_SPACING_MM ** 2

    def segment(self, series: np.ndarray, pixel_spacing_mm: float, *,
                center_rc: tuple[float, float] | None = None) -> SliceSegmentation:
        """Segment one slice.

        Args:
            series: float [time, rows, cols], Gd (mmol/L) or signal intensity, starting at the
                first saturation-recovery frame; at least 16 frames (shorter than 48 is padded
                with the last frame).
            pixel_spacing_mm: square pixel size of the series.
            center_rc: LV centre (row, col) in pixels if known (e.g. from the AIF series).
                Otherwise the candidates of :func:`lv_center_candidates` are all segmented,
                the one whose crop centre holds the most LV and myocardium is kept, and the
                crop is re-centred on the CNN's LV centroid for the final pass.
        """
        series = check_series(series)
        if not pixel_spacing_mm > 0:
            raise ValueError(f"pixel spacing must be > 0 mm, got {pixel_spacing_mm}")
        if center_rc is not None:
            center = (float(center_rc[0]), float(center_rc[1]))
            crop = self._probabilities(series, pixel_spacing_mm, [center])[0]
        else:
            candidates = lv_center_candidates(series, pixel_spacing_mm)
            crops = self._probabilities(series, pixel_spacing_mm, candidates)
            best = int(np.argmax([self._heart_score(p) for p in crops]))
            center, crop = candidates[best], crops[best]
            first = postprocess(uncrop_probabilities(crop, self._geometry(series, pixel_spacing_mm,
                                                                          center)))
            try:
                refined = lv_center_rc(first.labels)
            except InsertionNotFoundError:
                refined = None
            if refined is not None and np.hypot(*np.subtract(refined, center)) > 1.0:
                center = refined
                crop = self._probabilities(series, pixel_spacing_mm, [center])[0]
        probabilities = uncrop_probabilities(crop, self._geometry(series, pixel_spacing_mm,
                                                                  center)).astype(np.float32)
        return self._finish(probabilities, center)

    @staticmethod
    def _geometry(series: np.ndarray, pixel_spacing_mm: float,
                  center: tuple[float, float]) -> CropGeometry:
        return CropGeometry.centred(series.shape[1:], pixel_spacing_mm, center)

    @staticmethod
    def _finish(probabilities: np.ndarray, center: tuple[float, float]) -> SliceSegmentation:
        clean: PostProcessed = postprocess(probabilities)
        flags = [f"not found: {name}" for name in clean.missing]
        if clean.empty:
            flags.insert(0, "empty: no LV blood pool or myocardium found")
        elif not clean.closed_ring:
            flags.append("myocardial ring not closed")
        try:
            center = lv_center_rc(clean.labels)
            insertion = rv_insertion_deg(clean.labels, center)
        except InsertionNotFoundError as error:
            insertion = float("nan")
            if not clean.empty:
                flags.append(f"no RV insertion: {error}")
        for flag in flags:
            logger.warning("segmentation: %s", flag)
        return SliceSegmentation(labels=clean.labels, probabilities=probabilities,
                                 lv_center_rc=(float(center[0]), float(center[1])),
                                 rv_insertion_deg=insertion, closed_ring=clean.closed_ring,
                                 empty=clean.empty, flags=tuple(flags))
