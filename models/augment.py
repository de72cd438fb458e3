"""Anatomical realism added to simulated training series (training-time augmentation only).

The phantom (``perfline.simulator``) renders a fixed family of shapes and surroundings; real
first-pass perfusion slices show more: papillary muscles and trabeculation of varied size
inside the LV blood pool (labelled blood pool by experts), epicardial / pericardial fat of
varied thickness, organs and chest wall touching the heart with their own enhancement
(liver, stomach, spleen, muscle), spatially correlated noise and local shape changes. This
module paints such structures into a series on its own grid, using the series' own
tissue curves (mean over the truth labels), so that the added structures follow the units,
the contrast and the noise level of the sample. The labels are never changed: everything
added is background (0) or, inside the LV blood pool, blood pool (1), as in manual contours
(Xue et al. 2020 App. E2; REFERENCES.md §5). Elastic deformation and correlated noise act on
the crop and live in :mod:`perfline.models.data`.

Arrays: frames float32 [time, rows, cols] (Gd mmol/L or signal, any scale); labels uint8
[rows, cols] (docs/conventions.md); lengths in mm, converted with the series' pixel spacing.
"""

from __future__ import annotations

import logging

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from scipy import ndimage

from perfline.toolbox.segmentation_post import LV_BLOOD, MYOCARDIUM, RV_BLOOD

logger = logging.getLogger(__name__)


class Realism(BaseModel):
    """Probabilities and ranges (uniform) of the anatomical augmentation; all off by default."""

    model_config = ConfigDict(extra="forbid")

    papillary_probability: float = Field(0.0, ge=0, le=1, description="dark muscles attached "
                                         "to the LV wall inside the blood pool")
    papillary_count: tuple[int, int] = (1, 4)
    papillary_radius_mm: tuple[float, float] = (2.0, 8.0)
    trabeculation_probability: float = Field(0.0, ge=0, le=1, description="dark finger-like "
                                             "band along the endocardium inside the pool")
    trabeculation_mm: tuple[float, float] = (1.5, 5.0)
    fat_probability: float = Field(0.0, ge=0, le=1, description="epicardial fat band")
    fat_mm: tuple[float, float] = (1.0, 7.0)
    fat_signal: tuple[float, float] = Field((0.3, 1.3), description="fat level in signal units, "
                                            "relative to the myocardial peak (short T1: bright "
                                            "before contrast, no enhancement)")
    clutter_probability: float = Field(0.0, ge=0, le=1, description="organs / chest wall next "
                                       "to or touching the heart")
    clutter_count: tuple[int, int] = (1, 4)
    clutter_radius_mm: tuple[float, float] = (8.0, 35.0)
    clutter_gap_mm: tuple[float, float] = Field((0.0, 4.0), description="distance kept from "
                                                "the heart (0: touching the epicardium)")
    elastic_probability: float = Field(0.0, ge=0, le=1, description="smooth random warp of "
                                       "image and labels together (applied on the crop)")
    elastic_mm: tuple[float, float] = Field((1.0, 4.0), description="largest displacement")
    elastic_scale_mm: tuple[float, float] = Field((8.0, 20.0), description="smoothness (SD of "
                                                  "the Gaussian that smooths the field)")
    correlated_noise_probability: float = Field(0.0, ge=0, le=1, description="noise smoothed "
                                                "in-plane (interpolated / filtered images)")
    correlated_noise_mm: tuple[float, float] = (0.5, 1.5)

    @property
    def paints(self) -> bool:
        """Whether any structure is painted into the series (:func:`add_structures`)."""
        return max(self.papillary_probability, self.trabeculation_probability,
                   self.fat_probability, self.clutter_probability) > 0


def tissue_curves(frames: np.ndarray, labels: np.ndarray) -> dict[int, np.ndarray]:
    """Mean curve float32 [time] of every label present in ``labels`` (frames [time, r, c])."""
    curves = {}
    for label in (0, LV_BLOOD, MYOCARDIUM, RV_BLOOD):
        mask = labels == label
        if mask.any():
            curves[label] = frames[:, mask].mean(axis=1).astype(np.float32)
    return curves


def blob(shape: tuple[int, int], center_rc: tuple[float, float], radius_px: float,
         rng: np.random.Generator, *, aspect: tuple[float, float] = (0.5, 1.0),
         wobble: float = 0.2) -> np.ndarray:
    """Soft random blob float32 [rows, cols] in [0, 1]: an ellipse (random axis ratio and
    orientation) whose radius varies with angle by harmonics 2-4 (relative amplitude up to
    ``wobble``), with a one-pixel linear edge (partial volume)."""
    rows, cols = np.indices(shape, dtype=np.float32)
    dr, dc = rows - np.float32(center_rc[0]), cols - np.float32(center_rc[1])
    angle = rng.uniform(0, np.pi)
    ratio = rng.uniform(*aspect)
    u = dc * np.cos(angle) + dr * np.sin(angle)
    v = (-dc * np.sin(angle) + dr * np.cos(angle)) / ratio
    theta = np.arctan2(v, u)
    radius = np.full(shape, radius_px, dtype=np.float32)
    for harmonic in (2, 3, 4):
        radius *= 1.0 + np.float32(rng.uniform(0, wobble / 2)) * np.cos(
            harmonic * theta + np.float32(rng.uniform(0, 2 * np.pi)))
    return np.clip(radius - np.hypot(u, v) + 0.5, 0.0, 1.0).astype(np.float32)


def _paint(frames: np.ndarray, smooth: np.ndarray, alpha: np.ndarray,
           curve: np.ndarray) -> None:
    """frames <- frames + alpha (curve - smooth), in place, where alpha > 0: the smooth
    content is replaced by ``curve`` and the pixel's own noise (frames - smooth) is kept."""
    rows, cols = np.nonzero(alpha > 0)
    if rows.size == 0:
        return
    a = alpha[rows, cols][None, :]
    frames[:, rows, cols] += a * (curve[:, None] - smooth[:, rows, cols])


def _shifted(curve: np.ndarray, shift: float) -> np.ndarray:
    """Curve delayed by ``shift`` frames (linear interpolation, ends held)."""
    positions = np.clip(np.arange(curve.size) - shift, 0, curve.size - 1)
    return np.interp(positions, np.arange(curve.size), curve).astype(np.float32)


def _pick(mask: np.ndarray, rng: np.random.Generator) -> tuple[float, float] | None:
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return None
    index = int(rng.integers(rows.size))
    return float(rows[index]), float(cols[index])


def add_papillary(frames, smooth, labels, curves, spacing_mm, rng, settings: Realism) -> None:
    """1-4 blobs of myocardial enhancement attached to the endocardium inside the LV blood
    pool (papillary muscles / trabecular masses); labels stay blood pool."""
    pool = labels == LV_BLOOD
    if MYOCARDIUM not in curves or not pool.any():
        return
    depth = ndimage.distance_transform_edt(pool) * spacing_mm
    for _ in range(int(rng.integers(settings.papillary_count[0], settings.papillary_count[1] + 1))):
        radius = rng.uniform(*settings.papillary_radius_mm)
        center = _pick((depth > 0.3 * radius) & (depth <= radius), rng)
        if center is None:
            continue
        alpha = blob(labels.shape, center, radius / spacing_mm, rng) * pool
        _paint(frames, smooth, alpha * np.float32(rng.uniform(0.7, 1.0)),
               curves[MYOCARDIUM] * np.float32(rng.uniform(0.8, 1.2)))


def add_trabeculation(frames, smooth, labels, curves, spacing_mm, rng, settings: Realism) -> None:
    """A band of dark fingers along the endocardium inside the LV blood pool (labels stay
    blood pool): depth 1.5-5 mm, 6-20 fingers, partial-volume strength 0.3-0.9."""
    pool = labels == LV_BLOOD
    if MYOCARDIUM not in curves or not pool.any():
        return
    depth = ndimage.distance_transform_edt(pool) * spacing_mm
    width = rng.uniform(*settings.trabeculation_mm)
    center = ndimage.center_of_mass(pool)
    rows, cols = np.indices(labels.shape, dtype=np.float32)
    theta = np.arctan2(rows - center[0], cols - center[1])
    pattern = (0.5 + 0.5 * np.cos(rng.integers(6, 21) * theta + rng.uniform(0, 2 * np.pi))) ** 2
    alpha = np.clip(1.0 - depth / width, 0.0, 1.0) * pattern * pool * rng.uniform(0.3, 0.9)
    _paint(frames, smooth, alpha.astype(np.float32), curves[MYOCARDIUM])


def _fat_curve(curves, signal_units: bool, rng, settings: Realism) -> np.ndarray:
    reference = curves[MYOCARDIUM]
    if signal_units:  # short T1: bright from the first frame, no Gd uptake
        level = rng.uniform(*settings.fat_signal) * float(reference.max())
    else:  # no Gd in fat; only a small offset (noise / LUT floor)
        level = rng.uniform(0.0, 0.15) * float(reference.max())
    return np.full(reference.shape, level, dtype=np.float32)


def add_epicardial_fat(frames, smooth, labels, curves, spacing_mm, rng, settings: Realism, *,
                       signal_units: bool) -> None:
    """A band outside the LV myocardium and RV of angularly varying thickness (0 to 1-7 mm),
    fat curve (constant): labels stay background."""
    if MYOCARDIUM not in curves:
        return
    heart = labels > 0
    outside = ndimage.distance_transform_edt(~heart) * spacing_mm
    center = ndimage.center_of_mass(labels == MYOCARDIUM)
    rows, cols = np.indices(labels.shape, dtype=np.float32)
    theta = np.arctan2(rows - center[0], cols - center[1])
    thickest = rng.uniform(*settings.fat_mm)
    thickness = thickest * (0.5 + 0.5 * np.cos(theta - rng.uniform(0, 2 * np.pi))) ** rng.uniform(0.5, 3)
    alpha = np.clip(thickness - outside + 0.5 * spacing_mm, 0.0, spacing_mm) / spacing_mm * ~heart
    _paint(frames, smooth, alpha.astype(np.float32), _fat_curve(curves, signal_units, rng, settings))


def _clutter_curve(curves, signal_units: bool, rng, settings: Realism) -> np.ndarray:
    """An organ's curve: a mix of the myocardial and blood curves, delayed and scaled (liver,
    spleen, muscle, stomach wall), or fat."""
    kind = rng.random()
    if kind < 0.15:
        return _fat_curve(curves, signal_units, rng, settings)
    blood = curves.get(LV_BLOOD, curves[MYOCARDIUM])
    baseline = curves[MYOCARDIUM][:3].mean()
    weight = rng.uniform(0.0, 0.25)
    mix = (1 - weight) * curves[MYOCARDIUM] + weight * _shifted(blood, rng.uniform(0, 6))
    mix = _shifted(mix, rng.uniform(-2, 6))
    enhancement = rng.uniform(0.3, 1.6) if kind < 0.85 else rng.uniform(0.0, 0.3)
    return (baseline * rng.uniform(0.6, 1.6) + enhancement * (mix - baseline)).astype(np.float32)


def add_clutter(frames, smooth, labels, curves, spacing_mm, rng, settings: Realism, *,
                signal_units: bool) -> None:
    """1-4 organ-like blobs near the heart (a gap of 0-4 mm from the LV myocardium and RV,
    0: touching), each with its own enhancement curve; labels stay background."""
    if MYOCARDIUM not in curves:
        return
    heart = labels > 0
    outside = ndimage.distance_transform_edt(~heart) * spacing_mm
    lv_center = np.asarray(ndimage.center_of_mass(heart))
    for _ in range(int(rng.integers(settings.clutter_count[0], settings.clutter_count[1] + 1))):
        gap = rng.uniform(*settings.clutter_gap_mm)
        radius = rng.uniform(*settings.clutter_radius_mm)
        edge = _pick((outside > gap) & (outside <= gap + spacing_mm * 1.5), rng)
        if edge is None:
            continue
        direction = np.asarray(edge) - lv_center
        direction /= max(float(np.hypot(*direction)), 1e-6)
        # the blob's near side touches the edge point (overlap up to a third of its radius)
        center = np.asarray(edge) + direction * radius * rng.uniform(0.65, 1.0) / spacing_mm
        alpha = blob(labels.shape, tuple(center), radius / spacing_mm, rng, wobble=0.4)
        alpha *= np.clip((outside - gap) / spacing_mm, 0.0, 1.0)
        _paint(frames, smooth, alpha.astype(np.float32), _clutter_curve(curves, signal_units, rng, settings))


def add_structures(frames: np.ndarray, labels: np.ndarray, spacing_mm: float,
                   rng: np.random.Generator, settings: Realism, *,
                   signal_units: bool) -> np.ndarray:
    """Paint the enabled structures into a copy of ``frames`` [time, rows, cols] (float32) on
    the grid of ``labels`` [rows, cols] (``spacing_mm`` per pixel); labels are unchanged.

    Tissue curves are measured on the series itself before anything is painted.
    """
    if frames.shape[1:] != labels.shape:
        raise ValueError(f"frames {frames.shape} and labels {labels.shape} differ in-plane")
    frames = np.array(frames, dtype=np.float32, copy=True)
    curves = tissue_curves(frames, labels)
    smooth = ndimage.gaussian_filter(frames, sigma=(0.0, 1.5, 1.5), truncate=2.0)
    if rng.random() < settings.clutter_probability:
        add_clutter(frames, smooth, labels, curves, spacing_mm, rng, settings, signal_units=signal_units)
    if rng.random() < settings.fat_probability:
        add_epicardial_fat(frames, smooth, labels, curves, spacing_mm, rng, settings,
                           signal_units=signal_units)
    if rng.random() < settings.papillary_probability:
        add_papillary(frames, smooth, labels, curves, spacing_mm, rng, settings)
    if rng.random() < settings.trabeculation_probability:
        add_trabeculation(frames, smooth, labels, curves, spacing_mm, rng, settings)
    return frames


def elastic_displacement(size: int, spacing_mm: float, rng: np.random.Generator,
                         settings: Realism) -> np.ndarray:
    """Smooth random displacement float64 [2, size, size] in pixels of a grid of
    ``spacing_mm``: white noise smoothed by a Gaussian of 8-20 mm SD, scaled so that its
    largest displacement is 1-4 mm."""
    sigma = rng.uniform(*settings.elastic_scale_mm) / spacing_mm
    field = ndimage.gaussian_filter(rng.standard_normal((2, size, size)), (0, sigma, sigma),
                                    mode="wrap")
    peak = float(np.abs(field).max())
    if peak == 0:
        return np.zeros_like(field)
    return field * (rng.uniform(*settings.elastic_mm) / spacing_mm / peak)


def standard_normal(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Standard normal samples float32 of ``shape``, drawn by torch's generator seeded from
    ``rng`` (the same distribution as ``rng.standard_normal``, ~4x faster for a crop)."""
    import torch  # a training dependency

    generator = torch.Generator().manual_seed(int(rng.integers(2 ** 62)))
    return torch.randn(shape, generator=generator, dtype=torch.float32).numpy()


def correlated_noise(shape: tuple[int, ...], sigma_px: float,
                     rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise float32 of unit SD, smoothed in-plane (last two axes) by ``sigma_px``."""
    noise = standard_normal(shape, rng)
    noise = ndimage.gaussian_filter(noise, sigma=(0,) * (len(shape) - 2) + (sigma_px, sigma_px),
                                    truncate=2.0)
    sd = float(noise.std())
    return noise / np.float32(sd if sd > 0 else 1.0)
