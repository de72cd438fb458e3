"""Post-processing of CNN class probabilities into one clean label map (QPerf's rule).

Per foreground class the probability threshold is raised from 0.5 until a single connected
component remains; if none of the thresholds gives exactly one, the largest component at 0.5
is kept (Xue et al. 2020 App. E3 / QPerf, REFERENCES.md §5). Thresholds >= 0.5 keep the
classes disjoint because the probabilities of a pixel sum to 1.

Labels: 0 background, 1 LV blood pool, 2 myocardium, 3 RV blood pool (docs/conventions.md).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

logger = logging.getLogger(__name__)

LV_BLOOD, MYOCARDIUM, RV_BLOOD = 1, 2, 3
CLASS_NAMES = {LV_BLOOD: "LV blood pool", MYOCARDIUM: "myocardium", RV_BLOOD: "RV blood pool"}
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class PostProcessed:
    """Clean labels uint8 [rows, cols] plus what was (not) found."""

    labels: np.ndarray
    thresholds: dict[int, float]
    missing: tuple[str, ...] = field(default=())
    closed_ring: bool = False

    @property
    def empty(self) -> bool:
        """True when neither LV blood pool nor myocardium was found."""
        return not np.isin(self.labels, (LV_BLOOD, MYOCARDIUM)).any()


def single_component(probability: np.ndarray, *, start: float = 0.5, stop: float = 0.95,
                     step: float = 0.05) -> tuple[np.ndarray, float]:
    """Mask of one connected component of ``probability`` (float [rows, cols], 0-1).

    Raises the threshold from ``start`` to ``stop`` until exactly one 8-connected component
    remains; otherwise returns the largest component at ``start``. Returns (mask, threshold);
    an all-false mask when nothing exceeds ``start``.
    """
    for threshold in np.arange(start, stop + 1e-9, step):
        components, count = ndimage.label(probability > threshold, structure=_EIGHT_CONNECTED)
        if count == 1:
            return components == 1, float(threshold)
        if count == 0:
            break
    components, count = ndimage.label(probability > start, structure=_EIGHT_CONNECTED)
    if count == 0:
        return np.zeros(probability.shape, dtype=bool), float(start)
    sizes = np.bincount(components.ravel())[1:]
    return components == 1 + int(np.argmax(sizes)), float(start)


def is_closed_ring(labels: np.ndarray) -> bool:
    """True when the myocardium encloses the LV blood pool completely (4-connected path from
    the blood pool to the image edge must cross the myocardium)."""
    labels = np.asarray(labels)
    blood = labels == LV_BLOOD
    myocardium = labels == MYOCARDIUM
    if not blood.any() or not myocardium.any():
        return False
    outside, _ = ndimage.label(~myocardium)
    blood_regions = set(np.unique(outside[blood])) - {0}
    edge = np.concatenate([outside[0], outside[-1], outside[:, 0], outside[:, -1]])
    return not (blood_regions & set(np.unique(edge)))


def postprocess(probabilities: np.ndarray) -> PostProcessed:
    """Clean label map from class probabilities float [classes, rows, cols] (classes 0-3).

    Each foreground class keeps one connected component; holes inside the myocardial ring that
    no class claims are given to the LV blood pool.
    """
    probabilities = np.asarray(probabilities, dtype=np.float32)
    if probabilities.ndim != 3 or probabilities.shape[0] != 4:
        raise ValueError(f"expected probabilities [4, rows, cols], got {probabilities.shape}")
    if not np.isfinite(probabilities).all():
        raise ValueError("probabilities contain NaN or infinite values")
    labels = np.zeros(probabilities.shape[1:], dtype=np.uint8)
    thresholds: dict[int, float] = {}
    missing = []
    for label in (LV_BLOOD, MYOCARDIUM, RV_BLOOD):
        mask, thresholds[label] = single_component(probabilities[label])
        if not mask.any():
            missing.append(CLASS_NAMES[label])
        labels[mask] = label
    if labels.any():
        enclosed = ndimage.binary_fill_holes(np.isin(labels, (LV_BLOOD, MYOCARDIUM)))
        labels[enclosed & (labels == 0)] = LV_BLOOD if (labels == LV_BLOOD).any() else 0
    result = PostProcessed(labels=labels, thresholds=thresholds, missing=tuple(missing),
                           closed_ring=is_closed_ring(labels))
    if missing:
        logger.info("segmentation: not found: %s", ", ".join(missing))
    return result
