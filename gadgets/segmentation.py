"""``cnn-segmentation``: LV blood pool, myocardium and RV of each slice with the shipped ResUNet.

Thin adapter of :class:`perfline.models.inference.Segmenter` (runtime chosen and logged there:
OpenVINO bf16, else ONNX Runtime fp32, else torch): every ``SliceSeries`` passes on unchanged
(the flow-map gadget needs it) and a ``SliceSegmentation`` on the slice's own grid follows it.
In the ``perfusion`` chain this gadget runs before ``aif-extract``, which takes the AIF pool at
the LV centre of the first segmentation that has one (the slice's geometry places it in the AIF
image); the AIF series passes through here untouched.
The frames from the first saturation-recovery frame are used; a series sampled far from one
frame per second is resampled to it (the training data's rate). Slices where nothing is found
are flagged, not fatal.

Contours on the images (Xue et al. 2020: the segmentation returns endo/epi/RV contours to the
scanner): MRD images of the roles in ``contour_roles`` (by default the Gd frames that
``perfusion-series-images`` sends before this gadget) are held until their slice
(``image.slice``) is segmented and then passed on with the CNN's endo, epi and RV contours as
``GT_ROI_<label>`` / ``ROI_<label>`` meta (docs/cnn_runtime.md; format of
``perfline.toolbox.sector_contours``); other images pass straight through.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from typing import Any, Literal

import ismrmrd
import numpy as np
from pydantic import Field

from perfline.core.gadget import Gadget, GadgetError, GadgetSettings, register_gadget
from perfline.gadgets.perfusion_items import SliceSegmentation, SliceSeries
from perfline.toolbox.rv_insertion import refine_rv_mask, rv_insertion_deg

_UNITS = {"gd_mmol_l": "gd", "signal": "signal"}
FLAGS_META_KEY = "PERFLINE_SegmentationFlags"


class SegmentationSettings(GadgetSettings):
    runtime: Literal["auto", "openvino", "onnxruntime-int8", "onnxruntime", "torch"] = Field(
        "auto", description="inference runtime (auto: OpenVINO bf16 if the CPU has native bf16, "
                            "else ONNX Runtime int8 if it has VNNI, else ONNX Runtime fp32, "
                            "else torch)")
    threads: int = Field(1, ge=1, le=64, description="intra-op threads of the runtime")
    image_contours: bool = Field(True, description="add the endo/epi/RV contours to the slice "
                                                   "images of contour_roles passing through")
    contour_roles: tuple[str, ...] = Field(("Gd",), description="GADGETRON_DataRole of the "
                                                                "images that get contours")


def contour_meta(segmentation: SliceSegmentation) -> dict[str, list[str]]:
    """``GT_ROI_<label>`` and ``ROI_<label>`` meta (labels endo, epi, rv) of a segmentation;
    empty when the slice has no usable myocardium."""
    from perfline.toolbox.sector_contours import ContourError, fire_roi_meta, gadgetron_roi_meta
    from perfline.toolbox.segmentation_post import segmentation_contours

    if not all(math.isfinite(v) for v in segmentation.lv_center_rc):
        return {}
    try:
        contours = segmentation_contours(segmentation.labels, segmentation.lv_center_rc)
    except (ContourError, ValueError):
        return {}
    return {**gadgetron_roi_meta(contours), **fire_roi_meta(contours)}


@register_gadget
class CnnSegmentation(Gadget):
    """SliceSeries (Gd or signal) -> the same SliceSeries + its SliceSegmentation; images of
    ``contour_roles`` -> the same images with contour meta."""

    name = "cnn-segmentation"
    Settings = SegmentationSettings
    accepts = (SliceSeries, ismrmrd.Image)
    produces = (SliceSeries, SliceSegmentation, ismrmrd.Image)
    settings: SegmentationSettings

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._segmenters: dict[str, Any] = {}  # units -> Segmenter, loaded at first use

    @classmethod
    def warm_up(cls, settings: SegmentationSettings, chain: Any,
                stop: threading.Event | None = None) -> str | None:
        """Load the Gd model once at server start: OpenVINO compiles it there (0.2-0.5 s) and
        keeps it for the process (and in its disk cache), so a scan's load is a checksum."""
        from perfline.models.inference import Segmenter
        from perfline.models.weights import default_model

        segmenter = Segmenter(default_model("gd"), runtime=settings.runtime,
                              threads=settings.threads)
        return f"segmentation model: {segmenter.runtime} {segmenter.precision}, " \
               f"{segmenter.load_ms:.0f} ms"

    def process(self, items: Iterator[Any]) -> Iterator[Any]:
        held: dict[int, list[ismrmrd.Image]] = {}
        # slice index -> (segmentation, its contour meta), for images arriving after it
        done: dict[int, tuple[SliceSegmentation, dict[str, list[str]]]] = {}
        for item in items:
            if isinstance(item, ismrmrd.Image):
                if not self._wants_contours(item):
                    yield item
                elif item.slice in done:
                    yield self._annotated(item, *done[item.slice])
                else:
                    held.setdefault(item.slice, []).append(item)
                continue
            yield item
            segmentation = self._segment(item)
            yield segmentation
            if not self.settings.image_contours:
                continue
            meta = contour_meta(segmentation)
            if not meta:
                self.log.warning("slice %d: no endo/epi contours for the images",
                                 segmentation.slice_index)
            done[segmentation.slice_index] = (segmentation, meta)
            for image in held.pop(segmentation.slice_index, []):
                yield self._annotated(image, segmentation, meta)
        for index, images in sorted(held.items()):
            self.log.warning("slice %d: %d image(s) but no series to segment; sent without "
                             "contours", index, len(images))
            yield from images

    def _wants_contours(self, image: ismrmrd.Image) -> bool:
        return self.settings.image_contours and \
            image.meta.get("GADGETRON_DataRole") in self.settings.contour_roles

    def _annotated(self, image: ismrmrd.Image, segmentation: SliceSegmentation,
                   meta: dict[str, list[str]]) -> ismrmrd.Image:
        """The image with the slice's contour meta (and its flags)."""
        cols, rows = int(image.matrix_size[0]), int(image.matrix_size[1])
        if (rows, cols) != segmentation.labels.shape:
            self.log.warning("slice %d: image %d x %d but labels %s: no contours",
                             segmentation.slice_index, rows, cols, segmentation.labels.shape)
            return image
        attributes = dict(image.meta)
        attributes.update(meta)
        if segmentation.flags:
            attributes[FLAGS_META_KEY] = list(segmentation.flags)
        image.meta = ismrmrd.Meta(attributes)
        return image

    def _segment(self, series: SliceSeries) -> SliceSegmentation:
        from perfline.models.data import SeriesError, resample_frames_to_interval
        from perfline.models.inference import Segmenter
        from perfline.models.weights import default_model

        units = _UNITS.get(series.units)
        if units is None:
            raise GadgetError(f"cnn-segmentation needs Gd or signal slices, slice "
                              f"{series.slice_index} has units {series.units!r}")
        segmenters = self._segmenters
        if units not in segmenters:
            segmenters[units] = Segmenter(default_model(units), runtime=self.settings.runtime,
                                          threads=self.settings.threads)
            loaded = segmenters[units]
            self.log.info("segmentation runtime %s (%s), model loaded in %.0f ms%s",
                          loaded.runtime, loaded.precision, loaded.load_ms,
                          f" ({loaded.compiled_from})" if loaded.compiled_from else "")
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
        labels, insertion, flags = result.labels, result.rv_insertion_deg, tuple(result.flags)
        if math.isfinite(insertion) and units == "gd":
            # an RV mask running on along tissue that does not enhance like RV blood (docs/report.md;
            # its 25 % enhancement threshold was set on Gd series, so signal-unit slices are left as they are)
            # then the thin RV wedge at the insertions, blurred in the series, that the CNN leaves out
            labels, shift, added = refine_rv_mask(result.labels, frames, result.lv_center_rc)
            if shift:
                flags += (f"RV mask ran {shift:.0f} deg along non-enhancing tissue: trimmed",)
            if shift or added:
                insertion = rv_insertion_deg(labels, result.lv_center_rc)
        self.log.info("slice %d: myocardium %d px, RV insertion %.1f deg%s",
                      series.slice_index, int((labels == 2).sum()), insertion,
                      f", flags: {'; '.join(flags)}" if flags else "")
        return SliceSegmentation(slice_index=series.slice_index, labels=labels,
                                 rv_insertion_deg=insertion,
                                 lv_center_rc=result.lv_center_rc,
                                 flags=tuple(series.flags) + flags)
