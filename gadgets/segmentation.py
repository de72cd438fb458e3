"""``cnn-segmentation``: LV blood pool, myocardium and RV of each slice with the shipped ResUNet.

Thin adapter of :class:`perfline.models.inference.Segmenter` (ONNX Runtime, torch fallback):
every ``SliceSeries`` passes on unchanged (the flow-map gadget needs it) and a
``SliceSegmentation`` on the slice's own grid follows it. The frames from the first
saturation-recovery frame are used; a series sampled far from one frame per second is resampled
to it (the training data's rate). Slices where nothing is found are flagged, not fatal.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
from pydantic import Field

from perfline.core.gadget import Gadget, GadgetError, GadgetSettings, register_gadget
from perfline.gadgets.perfusion_items import SliceSegmentation, SliceSeries

_UNITS = {"gd_mmol_l": "gd", "signal": "signal"}


class SegmentationSettings(GadgetSettings):
    runtime: Literal["auto", "onnxruntime", "torch"] = Field(
        "auto", description="inference runtime (auto: ONNX Runtime, else torch)")
    threads: int = Field(1, ge=1, le=64, description="intra-op threads of the runtime")


@register_gadget
class CnnSegmentation(Gadget):
    """SliceSeries (Gd or signal) -> the same SliceSeries + its SliceSegmentation."""

    name = "cnn-segmentation"
    Settings = SegmentationSettings
    accepts = (SliceSeries,)
    produces = (SliceSeries, SliceSegmentation)
    settings: SegmentationSettings

    def process(self, items: Iterator[Any]) -> Iterator[Any]:
        from perfline.models.data import SeriesError, resample_frames_to_interval
        from perfline.models.inference import Segmenter
        from perfline.models.weights import default_model

        segmenters: dict[str, Segmenter] = {}
        for series in items:
            yield series
            units = _UNITS.get(series.units)
            if units is None:
                raise GadgetError(f"cnn-segmentation needs Gd or signal slices, slice "
                                  f"{series.slice_index} has units {series.units!r}")
            if units not in segmenters:
                segmenters[units] = Segmenter(default_model(units), runtime=self.settings.runtime,
                                              threads=self.settings.threads)
            frames = np.asarray(series.data[series.n_pd_frames:], dtype=np.float32)
            steps = np.diff(np.asarray(series.time_s[series.n_pd_frames:], dtype=np.float64))
            spacing = series.geometry.pixel_spacing_mm
            if abs(spacing[0] - spacing[1]) > 1e-3 * max(spacing):
                raise GadgetError(f"cnn-segmentation needs square pixels, slice "
                                  f"{series.slice_index} has {spacing} mm")
            try:
                if steps.size:
                    frames = resample_frames_to_interval(frames, float(np.median(steps)))
                result = segmenters[units].segment(frames, float(spacing[0]))
            except (SeriesError, ValueError) as error:
                raise GadgetError(f"cnn-segmentation, slice {series.slice_index}: {error}") from error
            self.log.info("slice %d: myocardium %d px, RV insertion %.1f deg%s",
                          series.slice_index, int((result.labels == 2).sum()),
                          result.rv_insertion_deg,
                          f", flags: {'; '.join(result.flags)}" if result.flags else "")
            yield SliceSegmentation(slice_index=series.slice_index, labels=result.labels,
                                    rv_insertion_deg=result.rv_insertion_deg,
                                    lv_center_rc=result.lv_center_rc, flags=result.flags)
