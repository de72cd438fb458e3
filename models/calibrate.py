"""Calibration of the myocardium probability scale on simulated *validation* studies.

The network over-segments the myocardium slightly (false positives above false negatives). A
factor on the myocardium softmax probability before post-processing (a prior correction)
balances them. This script prints the metrics for a few factors on the validation split
(seeds of ``is_validation_study``, true LV centre, Gd); the chosen factor goes into the model
sidecar as ``class_probability_scale``. Never run on held-out test seeds or real data.

    python -m perfline.models.calibrate --studies 16 --scales 1.0 0.8 0.65 0.5
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

from perfline.models.data import CropGeometry, sample_crop, uncrop_probabilities
from perfline.models.inference import Segmenter
from perfline.models.weights import DEFAULT_MODEL
from perfline.toolbox.seg_metrics import slice_metrics
from perfline.toolbox.segmentation_post import postprocess

COLUMNS = ("dice", "false_positive", "false_negative", "boundary_error_mm",
           "hausdorff_endo_mm", "hausdorff_epi_mm")


def main(argv: list[str] | None = None) -> int:
    from perfline.models.train import validation_seeds
    from perfline.simulator import simulate_image_study

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=16)
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 0.8, 0.65, 0.5])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    segmenter = Segmenter(args.model)
    segmenter.class_scale[:] = 1.0  # calibrate from the raw network output
    rows: dict[float, list[list[float]]] = {scale: [] for scale in args.scales}
    for seed in validation_seeds(args.studies):
        for slice_ in simulate_image_study(seed):
            geometry = CropGeometry.centred(slice_.labels.shape, slice_.pixel_spacing_mm,
                                            slice_.lv_center_rc)
            raw = segmenter.predict(sample_crop(slice_.gd, geometry)[None])[0]
            for scale in args.scales:
                scaled = raw.copy()
                scaled[2] *= scale
                scaled /= scaled.sum(axis=0, keepdims=True)
                labels = postprocess(uncrop_probabilities(scaled, geometry)).labels
                metrics = slice_metrics(labels, slice_.labels, slice_.pixel_spacing_mm)
                rows[scale].append([getattr(metrics, column) for column in COLUMNS])
    print("scale  slices  " + "  ".join(COLUMNS))
    for scale, values in rows.items():
        means = np.nanmean(np.array(values), axis=0)
        print(f"{scale:5.2f}  {len(values):6d}  " + "  ".join(f"{value:.3f}" for value in means))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
