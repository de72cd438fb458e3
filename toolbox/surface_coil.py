"""Surface-coil intensity correction from the proton-density (PD) frames.

Receive-coil sensitivity multiplies both the saturation-recovery (SR) and the PD images, so the
ratio SR / PD removes it (Kellman et al., JCMR 2017; Xue et al., MRM 2020). The PD image is
first turned into a smooth map - a masked box filter about 7 pixels wide - so that noise and
small structures of the PD image do not enter the ratio (REFERENCES.md section 2).
"""

from __future__ import annotations

import logging

import numpy as np
from scipy import ndimage

logger = logging.getLogger(__name__)


class ProtonDensityError(ValueError):
    """A PD image that cannot serve as a surface-coil reference."""


def coil_map_from_pd(pd_image: np.ndarray, *, box_size_px: int = 7,
                     mask_fraction: float = 0.05) -> np.ndarray:
    """Smooth surface-coil map from a mean PD image.

    Pixels below ``mask_fraction`` of the 99th percentile (air, lungs) are left out; the map is
    the box-filter average of the masked pixels (normalised convolution), and pixels with no
    masked neighbour in their box take the value of the nearest one.

    Args:
        pd_image: float [rows, cols] mean PD magnitude image.
        box_size_px: width of the square box filter in pixels.
        mask_fraction: signal threshold relative to the 99th percentile.

    Returns:
        float32 [rows, cols] strictly positive map.

    Raises:
        ProtonDensityError: if the image is not 2-D, not finite or has no signal.
    """
    pd_image = np.asarray(pd_image, dtype=np.float64)
    if pd_image.ndim != 2:
        raise ProtonDensityError(f"PD image must be 2-D [rows, cols], found shape {pd_image.shape}")
    if not np.all(np.isfinite(pd_image)):
        raise ProtonDensityError(f"PD image contains {int(np.sum(~np.isfinite(pd_image)))} non-finite values")
    reference = np.percentile(pd_image, 99)
    if not reference > 0:
        raise ProtonDensityError("PD image has no signal (99th percentile <= 0)")
    mask = pd_image > mask_fraction * reference
    weights = ndimage.uniform_filter(mask.astype(np.float64), box_size_px, mode="nearest")
    sums = ndimage.uniform_filter(np.where(mask, pd_image, 0.0), box_size_px, mode="nearest")
    supported = weights > 1e-6
    smooth = np.zeros_like(pd_image)
    smooth[supported] = sums[supported] / weights[supported]
    if not supported.all():
        _, (rows, cols) = ndimage.distance_transform_edt(~supported, return_indices=True)
        smooth = smooth[rows, cols]
    return np.maximum(smooth, 1e-6 * reference).astype(np.float32)


def normalize_by_pd(series: np.ndarray, coil_map: np.ndarray) -> np.ndarray:
    """SR / PD ratio of every frame: ``series [time, rows, cols] / coil_map [rows, cols]``."""
    series = np.asarray(series)
    coil_map = np.asarray(coil_map)
    if series.shape[-2:] != coil_map.shape:
        raise ProtonDensityError(
            f"series frames {series.shape[-2:]} and PD map {coil_map.shape} differ in size")
    return (series / coil_map).astype(np.float32)
