"""Surface-coil intensity correction from the proton-density (PD) frames.

Receive-coil sensitivity multiplies both the saturation-recovery (SR) and the PD images, so the
ratio SR / PD removes it (Kellman et al., JCMR 2017; Xue et al., MRM 2020). The PD image is
first turned into a smooth map - a masked box filter about 7 pixels wide - so that noise and
small structures of the PD image do not enter the ratio (REFERENCES.md section 2).

The PD frames are acquired at the start of the scan (often in a breath hold) and motion
correction registers them among themselves only, so after correction they can sit 1-2 pixels
away from the SR frames; the ratio then divides every SR pixel by the proton density of a
neighbouring tissue (blood, fat, lung) and scales the whole Gd curve of a study (docs/preprocessing.md,
"Per-study Gd scale of the tissue curves"). :func:`pd_to_sr_translation` measures that offset
by edge direction over the heart and :func:`translate_image` moves the PD image onto the SR frames.
"""

from __future__ import annotations

import logging

import numpy as np
from scipy import ndimage

from perfline.toolbox.motion_correction import contrast_invariant_translation, locate_heart

logger = logging.getLogger(__name__)


class ProtonDensityError(ValueError):
    """A PD image that cannot serve as a surface-coil reference."""


def coil_map_from_pd(pd_image: np.ndarray, *, box_size_px: int = 7, mask_fraction: float = 0.05,
                     guide: np.ndarray | None = None, guide_tolerance: float = 0.1) -> np.ndarray:
    """Smooth PD reference map for the SR / PD ratio.

    Pixels below ``mask_fraction`` of the 99th percentile (air, lungs) are left out; the map is
    the box-filter average of the masked pixels (normalised convolution), and pixels with no
    masked neighbour in their box take the value of the nearest one.

    With a ``guide`` image (e.g. the mean of the SR frames, in which blood pool and myocardium
    differ) each neighbour is also weighted by ``exp(-(dg / (tolerance * g99))^2)`` of its guide
    difference ``dg`` (a joint bilateral filter): the PD of the blood pool (higher proton
    density) then does not leak into the thin myocardial wall, while noise is still averaged.
    Measured in docs/preprocessing.md.

    Args:
        pd_image: float [rows, cols] mean PD magnitude image.
        box_size_px: width of the square neighbourhood in pixels (odd).
        mask_fraction: signal threshold relative to the 99th percentile.
        guide: optional float [rows, cols] edge guide.
        guide_tolerance: guide difference, relative to the guide's 99th percentile, at which a
            neighbour's weight falls to 1/e.

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
    if guide is None:
        weights = ndimage.uniform_filter(mask.astype(np.float64), box_size_px, mode="nearest")
        sums = ndimage.uniform_filter(np.where(mask, pd_image, 0.0), box_size_px, mode="nearest")
    else:
        weights, sums = _guided_sums(pd_image, mask, np.asarray(guide, dtype=np.float64), box_size_px,
                                     guide_tolerance)
    supported = weights > 1e-6
    smooth = np.zeros_like(pd_image)
    smooth[supported] = sums[supported] / weights[supported]
    if not supported.all():
        _, (rows, cols) = ndimage.distance_transform_edt(~supported, return_indices=True)
        smooth = smooth[rows, cols]
    return np.maximum(smooth, 1e-6 * reference).astype(np.float32)


def _guided_sums(pd_image: np.ndarray, mask: np.ndarray, guide: np.ndarray, box_size_px: int,
                 tolerance: float) -> tuple[np.ndarray, np.ndarray]:
    """Joint-bilateral weight and weighted-PD sums over a box neighbourhood."""
    if guide.shape != pd_image.shape:
        raise ProtonDensityError(f"guide {guide.shape} and PD image {pd_image.shape} differ in size")
    scale = tolerance * max(float(np.percentile(guide, 99)), 1e-12)
    half = box_size_px // 2
    pad = ((half, half), (half, half))
    padded_pd = np.pad(np.where(mask, pd_image, 0.0), pad, mode="edge")
    padded_mask = np.pad(mask.astype(np.float64), pad, mode="edge")
    padded_guide = np.pad(guide, pad, mode="edge")
    rows, cols = pd_image.shape
    weights = np.zeros_like(pd_image)
    sums = np.zeros_like(pd_image)
    for dr in range(box_size_px):
        for dc in range(box_size_px):
            window = (slice(dr, dr + rows), slice(dc, dc + cols))
            weight = padded_mask[window] * np.exp(-(((padded_guide[window] - guide) / scale) ** 2))
            weights += weight
            sums += weight * padded_pd[window]
    return weights, sums


def normalize_by_pd(series: np.ndarray, coil_map: np.ndarray) -> np.ndarray:
    """SR / PD ratio of every frame: ``series [time, rows, cols] / coil_map [rows, cols]``."""
    series = np.asarray(series)
    coil_map = np.asarray(coil_map)
    if series.shape[-2:] != coil_map.shape:
        raise ProtonDensityError(
            f"series frames {series.shape[-2:]} and PD map {coil_map.shape} differ in size")
    return (series / coil_map).astype(np.float32)


def pd_to_sr_translation(pd_image: np.ndarray, sr_frames: np.ndarray, *, window_px: float = 15.0,
                         heart_prior_px: float = 30.0, max_shift_px: int = 3) -> np.ndarray:
    """Translation that lines the PD image up with the SR frames over the heart, pixels.

    The heart is located in the SR frames (``motion_correction.locate_heart``: largest temporal
    spread near the image centre, centre weight of sigma ``heart_prior_px``); around it a Gaussian
    window of sigma ``window_px`` weighs the normalised-gradient (edge direction) match of the PD
    image against the temporal median of the SR frames (``motion_correction.contrast_invariant_translation``,
    Haber & Modersitzki 2006): PD and SR frames have different contrast, but the outlines of the
    heart, lungs and chest wall are the same edges in both.

    Args:
        pd_image: float [rows, cols] mean of the (motion-corrected) PD frames.
        sr_frames: float [time, rows, cols] motion-corrected SR frames.
        window_px: sigma of the heart window, pixels.
        heart_prior_px: sigma of the image-centre weight of the heart search, pixels.
        max_shift_px: largest shift searched per axis, pixels.

    Returns:
        float64 [2] (row, col) shift ``t`` with ``pd_image(x + t) ~ SR anatomy(x)``: pass it to
        :func:`translate_image`.

    Raises:
        ProtonDensityError: on shape mismatch or an image too small for the window.
    """
    pd_image = np.asarray(pd_image, dtype=np.float32)
    sr_frames = np.asarray(sr_frames, dtype=np.float32)
    if pd_image.ndim != 2 or sr_frames.ndim != 3 or sr_frames.shape[1:] != pd_image.shape:
        raise ProtonDensityError(f"PD image [rows, cols] and SR frames [time, rows, cols] of the same size expected, "
                                 f"found {pd_image.shape} and {sr_frames.shape}")
    if min(pd_image.shape) < 5 * window_px:
        raise ProtonDensityError(f"image of {pd_image.shape} pixels too small for a heart window of sigma "
                                 f"{window_px} px (needs 5 sigma per axis)")
    centre = locate_heart(sr_frames, heart_prior_px)
    # only a box of 6 sigma around the heart (the window is 0.011 at its border): the temporal
    # median of the whole frames was 3/4 of the cost
    n_rows, n_cols = pd_image.shape
    box_rows, box_cols = (min(n, 2 * int(round(3 * window_px))) for n in (n_rows, n_cols))
    top = int(np.clip(round(centre[0]) - box_rows // 2, 0, n_rows - box_rows))
    left = int(np.clip(round(centre[1]) - box_cols // 2, 0, n_cols - box_cols))
    box = (slice(top, top + box_rows), slice(left, left + box_cols))
    rows, cols = np.indices((box_rows, box_cols), dtype=np.float32)
    window = np.exp(-0.5 * ((rows - (centre[0] - top)) ** 2 + (cols - (centre[1] - left)) ** 2) / window_px**2)
    shift = contrast_invariant_translation(pd_image[box][None], np.median(sr_frames[(slice(None),) + box], axis=0),
                                           window, max_shift_px=max_shift_px)[0]
    logger.debug("PD frames vs SR frames: heart at (%.0f, %.0f) px, shift (%.2f, %.2f) px", centre[0], centre[1],
                 shift[0], shift[1])
    return shift


def translate_image(image: np.ndarray, shift_px: np.ndarray) -> np.ndarray:
    """``image(x + shift)`` by linear interpolation (edges continued), float32 [rows, cols]."""
    image = np.asarray(image, dtype=np.float64)
    return ndimage.shift(image, -np.asarray(shift_px, dtype=np.float64), order=1, mode="nearest").astype(np.float32)
