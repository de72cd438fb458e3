"""Input pipeline of the segmentation CNN and its on-the-fly training data.

Geometry (Xue et al. 2020 App. E2, REFERENCES.md §5): the series is resampled to 1 mm pixels
and a 176 x 176 mm crop centred on the LV is taken; the first 48 frames from the first
saturation-recovery frame are the channels; each crop is divided by its maximum. Resampling
and cropping are one bilinear sampling (scipy.ndimage.map_coordinates) through an affine map
from crop to input pixels, so augmentation (scale, rotation, shift, residual motion) costs
nothing extra and the inverse map brings the CNN output back onto the input grid.

Arrays: series float32 [time, rows, cols]; crops float32 [frames, 176, 176]; labels uint8
[rows, cols] (docs/conventions.md). Training samples come from
``perfline.simulator.simulate_image_study`` (image domain), split by study seed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from scipy import ndimage

from perfline.models.augment import (Realism, add_structures, correlated_noise,
                                     elastic_displacement, standard_normal)

logger = logging.getLogger(__name__)

CROP_SIZE = 176
CROP_SPACING_MM = 1.0
N_FRAMES = 48
MIN_FRAMES = 16
# simulator seeds >= this are never used for training or validation (held-out test studies)
TEST_SEED_START = 2 ** 30


# frame interval of the training series (simulator: one frame per heartbeat); series sampled
# much faster or slower are resampled to it before cropping
NOMINAL_FRAME_INTERVAL_S = 1.0


class SeriesError(ValueError):
    """The input series cannot be segmented (shape, frame count, non-finite values)."""


@dataclass(frozen=True)
class CropGeometry:
    """Affine map from crop pixel (i, j) to input pixel (r, c): [r, c] = matrix @ [i, j] + offset.

    ``matrix`` float64 [2, 2], ``offset`` float64 [2]; ``input_shape`` (rows, cols).
    """

    matrix: np.ndarray
    offset: np.ndarray
    input_shape: tuple[int, int]

    @classmethod
    def centred(cls, input_shape: tuple[int, int], pixel_spacing_mm: float,
                center_rc: tuple[float, float], *, rotation_deg: float = 0.0,
                scale: float = 1.0, crop_size: int = CROP_SIZE) -> "CropGeometry":
        """Crop of ``crop_size`` pixels of ``CROP_SPACING_MM / scale`` mm centred on
        ``center_rc``, rotated counter-clockwise as displayed by ``rotation_deg``."""
        if pixel_spacing_mm <= 0:
            raise SeriesError(f"pixel spacing must be > 0 mm, got {pixel_spacing_mm}")
        step = CROP_SPACING_MM / (scale * pixel_spacing_mm)
        angle = np.radians(rotation_deg)
        rotation = np.array([[np.cos(angle), np.sin(angle)], [-np.sin(angle), np.cos(angle)]])
        matrix = step * rotation
        half = (crop_size - 1) / 2.0
        offset = np.asarray(center_rc, dtype=np.float64) - matrix @ np.array([half, half])
        return cls(matrix=matrix, offset=offset, input_shape=tuple(input_shape))

    def input_coordinates(self, crop_size: int = CROP_SIZE,
                          shift_rc: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
        """Input-pixel coordinates float64 [2, crop, crop] of every crop pixel."""
        grid = np.indices((crop_size, crop_size), dtype=np.float64).reshape(2, -1)
        points = self.matrix @ grid + (self.offset + np.asarray(shift_rc))[:, None]
        return points.reshape(2, crop_size, crop_size)

    def crop_coordinates(self) -> np.ndarray:
        """Crop-pixel coordinates float64 [2, rows, cols] of every input pixel."""
        grid = np.indices(self.input_shape, dtype=np.float64).reshape(2, -1)
        points = np.linalg.solve(self.matrix, grid - self.offset[:, None])
        return points.reshape(2, *self.input_shape)


def check_series(series: np.ndarray, *, min_frames: int = MIN_FRAMES) -> np.ndarray:
    """Validate a series float [time, rows, cols]; returns it as float32."""
    series = np.asarray(series)
    if series.ndim != 3:
        raise SeriesError(f"expected a series [time, rows, cols], got {series.ndim} dimensions "
                          f"(shape {series.shape})")
    if series.shape[0] < min_frames:
        raise SeriesError(f"expected at least {min_frames} frames from the first SR frame, got "
                          f"{series.shape[0]}")
    if min(series.shape[1:]) < 16:
        raise SeriesError(f"expected images of at least 16 x 16 pixels, got {series.shape[1:]}")
    if not np.isfinite(series).all():
        raise SeriesError(f"series has {int((~np.isfinite(series)).sum())} NaN or infinite "
                          f"values")
    return series.astype(np.float32, copy=False)


def resample_frames_to_interval(series: np.ndarray, dt_s: float,
                                target_s: float = NOMINAL_FRAME_INTERVAL_S,
                                tolerance: float = 0.25) -> np.ndarray:
    """Linear temporal resampling of [time, rows, cols] sampled every ``dt_s`` seconds to one
    frame every ``target_s`` seconds; returned unchanged when within ``tolerance`` (relative)."""
    if not dt_s > 0:
        raise SeriesError(f"frame interval must be > 0 s, got {dt_s}")
    if abs(dt_s / target_s - 1.0) <= tolerance:
        return series
    count = int(np.floor((series.shape[0] - 1) * dt_s / target_s)) + 1
    return _resample_frames(series, 0.0, target_s / dt_s, count)


def sample_crop(series: np.ndarray, geometry: CropGeometry, *, n_frames: int = N_FRAMES,
                shifts_rc: np.ndarray | None = None,
                displacement: np.ndarray | None = None,
                engine: str = "scipy") -> np.ndarray:
    """Bilinear crop float32 [n_frames, 176, 176] of the first ``n_frames`` frames, normalised
    by its maximum. Series shorter than ``n_frames`` are padded with their last frame.

    ``shifts_rc`` float [frames, 2], input pixels: per-frame translation (residual motion).
    ``displacement`` float [2, 176, 176], input pixels: per-crop-pixel warp (elastic).
    ``engine``: "scipy" (``ndimage.map_coordinates`` frame by frame, float64 arithmetic) or
    "torch" (all frames in one ``grid_sample`` call, float32; the same interpolation and the
    same zero outside the input, ~5x faster; used for training crops).
    """
    if engine not in ("scipy", "torch"):
        raise ValueError(f"engine must be 'scipy' or 'torch', got {engine!r}")
    count = min(n_frames, series.shape[0])
    crop = np.empty((n_frames, CROP_SIZE, CROP_SIZE), dtype=np.float32)
    base = geometry.input_coordinates()
    if displacement is not None:
        base = base + displacement
    if engine == "torch":
        crop[:count] = _bilinear_frames_torch(series[:count], base, shifts_rc)
    else:
        for frame in range(count):
            coordinates = base if shifts_rc is None else base + shifts_rc[frame][:, None, None]
            crop[frame] = ndimage.map_coordinates(series[frame], coordinates, order=1,
                                                  mode="constant", cval=0.0, prefilter=False)
    crop[count:] = crop[count - 1]
    return normalise_crop(crop)


def _bilinear_frames_torch(frames: np.ndarray, base_rc: np.ndarray,
                           shifts_rc: np.ndarray | None) -> np.ndarray:
    """Bilinear samples float32 [time, crop, crop] of ``frames`` [time, rows, cols] at the
    input-pixel coordinates ``base_rc`` [2, crop, crop] (+ ``shifts_rc[t]`` [time, 2] per
    frame); 0 outside [0, rows - 1] x [0, cols - 1], as ``map_coordinates(order=1,
    mode="constant")``."""
    import torch  # a training dependency; inference keeps the scipy path

    count, rows, cols = frames.shape
    # normalised coordinates, align_corners=True: -1 and +1 are the first and last pixel centres
    norm = np.array([2.0 / max(rows - 1, 1), 2.0 / max(cols - 1, 1)])
    base = torch.from_numpy((base_rc * norm[:, None, None] - 1.0).astype(np.float32))
    shifts_np = (np.zeros((count, 2)) if shifts_rc is None
                 else np.asarray(shifts_rc, dtype=np.float64)[:count])
    shifts = torch.from_numpy((shifts_np * norm).astype(np.float32))
    with torch.no_grad():
        grid = base.permute(1, 2, 0).flip(-1)[None] + shifts.flip(-1)[:, None, None, :]
        # map_coordinates' "constant" mode: 0 beyond the outer pixel centres (no ramp to 0);
        # decided in float64 input pixels, as map_coordinates does
        low = -np.asarray(base_rc).reshape(2, -1).min(axis=1)
        high = np.array([rows - 1, cols - 1]) - np.asarray(base_rc).reshape(2, -1).max(axis=1)
        near_edge = ((shifts_np < low[None] + 1e-9) | (shifts_np > high[None] - 1e-9)).any(axis=1)
        outside = torch.zeros(grid.shape[:3], dtype=torch.bool)
        for frame in np.flatnonzero(near_edge):
            r = base_rc[0] + shifts_np[frame, 0]
            c = base_rc[1] + shifts_np[frame, 1]
            outside[frame] = torch.from_numpy((r < 0) | (r > rows - 1) | (c < 0) | (c > cols - 1))
        sampled = torch.nn.functional.grid_sample(
            torch.from_numpy(np.ascontiguousarray(frames, dtype=np.float32))[:, None], grid,
            mode="bilinear", padding_mode="zeros", align_corners=True)[:, 0]
        sampled[outside] = 0.0
    return sampled.numpy()


def normalise_crop(crop: np.ndarray, clip: float = 2.0) -> np.ndarray:
    """Divide a crop [frames, rows, cols] by its maximum (paper), in place.

    The maximum is taken after a 5 x 5 mm box filter of the temporal-maximum image, so that
    isolated noise spikes (e.g. Gd through the LUT in air and lung, up to its 10 mmol/L
    ceiling) do not set the scale; values are then clipped to [-clip, clip].
    """
    peak = float(ndimage.uniform_filter(crop.max(axis=0), size=5, mode="constant").max())
    if peak > 0:
        crop /= np.float32(peak)
    np.clip(crop, -clip, clip, out=crop)
    return crop


def crop_labels(labels: np.ndarray, geometry: CropGeometry,
                displacement: np.ndarray | None = None) -> np.ndarray:
    """Nearest-neighbour crop uint8 [176, 176] of a label map [rows, cols]; ``displacement``
    as in :func:`sample_crop`."""
    coordinates = geometry.input_coordinates()
    if displacement is not None:
        coordinates = coordinates + displacement
    return ndimage.map_coordinates(labels, coordinates, order=0,
                                   mode="constant", cval=0).astype(np.uint8)


def uncrop_probabilities(probabilities: np.ndarray, geometry: CropGeometry) -> np.ndarray:
    """Class probabilities [classes, 176, 176] on the crop -> [classes, rows, cols] on the
    input grid (bilinear); outside the crop, background has probability 1."""
    coordinates = geometry.crop_coordinates()
    out = np.stack([ndimage.map_coordinates(p, coordinates, order=1, mode="constant",
                                            cval=1.0 if index == 0 else 0.0, prefilter=False)
                    for index, p in enumerate(probabilities)])
    return out / np.maximum(out.sum(axis=0, keepdims=True), 1e-6)


def lv_center_candidates(series: np.ndarray, pixel_spacing_mm: float, *,
                         count: int = 3) -> list[tuple[float, float]]:
    """Candidate LV blood-pool centres (row, col), pixels, best first, found on the series.

    Blood pools are the brightest-enhancing structures (REFERENCES.md §3): the bright
    components of the peak-enhancement image (after a 2.5 mm Gaussian), ranked by mean
    enhancement times area (capped at 1500 mm2, an LV blood pool's size); the image centre is
    appended last. The RV and the aorta are candidates too: the CNN picks among them
    (:meth:`perfline.models.inference.Segmenter.segment`).
    """
    series = check_series(series, min_frames=2)
    rows, cols = series.shape[1:]
    smooth = ndimage.gaussian_filter(series, sigma=(0.0, 2.5 / pixel_spacing_mm,
                                                    2.5 / pixel_spacing_mm))
    baseline = smooth[: max(1, min(3, series.shape[0] // 8))].mean(axis=0)
    peak = (smooth - baseline).max(axis=0)
    margin = max(1, int(round(10.0 / pixel_spacing_mm)))
    interior = np.zeros(peak.shape, dtype=bool)
    interior[margin:-margin, margin:-margin] = True
    candidates: list[tuple[float, float]] = []
    if interior.any() and peak[interior].max() > 0:
        components, found = ndimage.label((peak > 0.5 * float(peak[interior].max())) & interior)
        if found:
            index = np.arange(1, found + 1)
            area_mm2 = ndimage.sum(np.ones_like(peak), components, index) * pixel_spacing_mm ** 2
            brightness = np.asarray(ndimage.mean(peak, components, index))
            score = brightness * np.minimum(area_mm2, 1500.0)
            for best in index[np.argsort(score)[::-1][:count]]:
                center = ndimage.center_of_mass(np.where(components == best, peak, 0.0))
                candidates.append((float(center[0]), float(center[1])))
    candidates.append(((rows - 1) / 2.0, (cols - 1) / 2.0))
    return candidates


def detect_lv_center(series: np.ndarray, pixel_spacing_mm: float) -> tuple[float, float]:
    """Best candidate of :func:`lv_center_candidates` (no CNN)."""
    return lv_center_candidates(series, pixel_spacing_mm, count=1)[0]


class Augmentation(BaseModel):
    """Ranges of the random augmentation of one training sample (uniform unless noted)."""

    model_config = ConfigDict(extra="forbid")

    scale: tuple[float, float] = (0.85, 1.15)
    rotation_deg: float = Field(35.0, ge=0, description="+/- rotation")
    center_shift_mm: float = Field(24.0, ge=0, description="+/- LV centre offset in the crop")
    motion_mm: float = Field(1.5, ge=0, description="SD of residual per-frame translation")
    start_frame_shift: tuple[int, int] = (-2, 6)
    frame_interval: tuple[float, float] = (0.6, 1.6)
    min_frames: int = Field(24, ge=MIN_FRAMES, description="shortest series kept (then padded)")
    gamma: tuple[float, float] = (0.7, 1.4)
    gd_gamma: tuple[float, float] = Field((1.0, 1.0), description="power applied to Gd series "
                                          "(changes the myocardium / blood contrast)")
    clamp_probability: float = Field(0.0, ge=0, le=1, description="clip the series at 40-100 %% "
                                     "of its maximum (saturated or clamped blood)")
    shading: float = Field(0.4, ge=0, description="max relative smooth coil-shading amplitude")
    noise_sd: tuple[float, float] = (0.0, 0.05)
    blur_probability: float = Field(0.0, ge=0, le=1, description="Gaussian in-plane blur of "
                                    "the crop (smooth, interpolated or filtered scanner images)")
    blur_mm: tuple[float, float] = Field((0.0, 0.0), description="blur sigma range, mm")
    signal_units_probability: float = Field(0.5, ge=0, le=1)
    small_fov_probability: float = Field(0.2, ge=0, le=1,
                                         description="zero the crop outside a random box "
                                                     "(series cropped tightly around the LV)")
    small_fov_mm: tuple[float, float] = (90.0, 150.0)
    tight_fov_probability: float = Field(0.0, ge=0, le=1,
                                         description="zero the crop outside a box sized to the "
                                                     "heart (a series cropped to the LV, the "
                                                     "heart filling it: QPerf's exported maps)")
    tight_fov_ratio: tuple[float, float] = Field((0.9, 1.8), description="box half-size over the "
                                                 "epicardial equivalent radius, per axis")
    tight_fov_offset: float = Field(0.25, ge=0, description="+/- box centre offset from the LV "
                                    "centre, as a fraction of the box half-size")
    realism: Realism = Field(default_factory=Realism, description="anatomical structures, "
                             "elastic warp and correlated noise (perfline.models.augment)")


def _resample_frames(frames: np.ndarray, start: float, interval: float,
                     count: int) -> np.ndarray:
    """Linear resampling of [time, rows, cols] at frame positions start + k * interval."""
    positions = np.clip(start + interval * np.arange(count), 0, frames.shape[0] - 1)
    low = np.floor(positions).astype(int)
    high = np.minimum(low + 1, frames.shape[0] - 1)
    weight = (positions - low)[:, None, None].astype(np.float32)
    return frames[low] * (1 - weight) + frames[high] * weight


def augmented_sample(slice_, rng: np.random.Generator | None,
                     augmentation: Augmentation | None, *,
                     signal_units: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """One (crop [48, 176, 176] float32, labels [176, 176] uint8) pair from an ImageSlice.

    ``augmentation=None`` gives the plain paper pipeline centred on the true LV, on Gd units
    (or the SR signal frames when ``signal_units``).
    """
    spacing = float(slice_.pixel_spacing_mm)
    center = np.asarray(slice_.lv_center_rc, dtype=np.float64)
    if augmentation is None:
        geometry = CropGeometry.centred(slice_.labels.shape, spacing, tuple(center))
        frames = slice_.signal[slice_.n_pd_frames:] if signal_units else slice_.gd
        return sample_crop(np.asarray(frames), geometry), crop_labels(slice_.labels, geometry)
    a = augmentation
    use_signal = rng.random() < a.signal_units_probability
    frames = np.asarray(slice_.signal[slice_.n_pd_frames:] if use_signal else slice_.gd,
                        dtype=np.float32)
    interval = rng.uniform(*a.frame_interval)
    start = max(0.0, float(rng.integers(a.start_frame_shift[0], a.start_frame_shift[1] + 1)))
    available = int((frames.shape[0] - 1 - start) / interval) + 1
    count = int(min(N_FRAMES, available, rng.integers(a.min_frames, N_FRAMES + 1)
                    if rng.random() < 0.3 else N_FRAMES))
    frames = _resample_frames(frames, start, interval, max(count, 2))
    if a.realism.paints:  # before the intensity transforms, which then act on it too
        frames = add_structures(frames, slice_.labels, spacing, rng, a.realism,
                                signal_units=use_signal)
    scale = rng.uniform(*a.scale)
    shift = rng.uniform(-a.center_shift_mm, a.center_shift_mm, size=2) / spacing
    geometry = CropGeometry.centred(slice_.labels.shape, spacing, tuple(center + shift),
                                    rotation_deg=rng.uniform(-a.rotation_deg, a.rotation_deg),
                                    scale=scale)
    motion = rng.normal(0.0, a.motion_mm / spacing, size=(frames.shape[0], 2))
    if use_signal:  # gamma on the (few, small) input frames, not on the crop
        frames = np.maximum(frames, 0.0) ** np.float32(rng.uniform(*a.gamma))
    elif a.gd_gamma != (1.0, 1.0):
        frames = np.maximum(frames, 0.0) ** np.float32(rng.uniform(*a.gd_gamma))
    if rng.random() < a.clamp_probability:
        frames = np.minimum(frames, np.float32(rng.uniform(0.4, 1.0) * float(frames.max())))
    if a.shading > 0:
        rows, cols = np.indices(frames.shape[1:], dtype=np.float32)
        direction = rng.normal(size=2)
        ramp = (direction[0] * (rows - center[0]) + direction[1] * (cols - center[1]))
        ramp /= max(float(np.abs(ramp).max()), 1e-6)
        frames = frames * (1.0 + np.float32(rng.uniform(0, a.shading)) * ramp)[None]
    warp = None
    if a.realism.elastic_probability > 0 and rng.random() < a.realism.elastic_probability:
        crop_warp = elastic_displacement(CROP_SIZE, CROP_SPACING_MM, rng, a.realism)
        warp = np.einsum("ij,jrc->irc", geometry.matrix, crop_warp)  # crop -> input pixels
    crop = sample_crop(frames, geometry, shifts_rc=motion, displacement=warp, engine="torch")
    if a.blur_probability > 0 and rng.random() < a.blur_probability:
        sigma = rng.uniform(*a.blur_mm) / CROP_SPACING_MM
        if sigma > 0:
            crop = ndimage.gaussian_filter(crop, sigma=(0.0, sigma, sigma), mode="nearest")
    noise_sd = rng.uniform(*a.noise_sd)
    if noise_sd > 0:
        if (a.realism.correlated_noise_probability > 0
                and rng.random() < a.realism.correlated_noise_probability):
            sigma = rng.uniform(*a.realism.correlated_noise_mm) / CROP_SPACING_MM
            crop += np.float32(noise_sd) * correlated_noise(crop.shape, sigma, rng)
        else:
            crop += np.float32(noise_sd) * standard_normal(crop.shape, rng)
    labels = crop_labels(slice_.labels, geometry, warp)
    if a.tight_fov_probability > 0 and rng.random() < a.tight_fov_probability:
        _zero_outside_heart_box(crop, labels, rng, a)
    elif rng.random() < a.small_fov_probability:
        half = rng.uniform(*a.small_fov_mm, size=2) / (2.0 * CROP_SPACING_MM)
        middle = (CROP_SIZE - 1) / 2.0 - shift * spacing / CROP_SPACING_MM
        low = np.clip(np.round(middle - half).astype(int), 0, CROP_SIZE)
        high = np.clip(np.round(middle + half).astype(int), 0, CROP_SIZE)
        outside = np.ones((CROP_SIZE, CROP_SIZE), dtype=bool)
        outside[low[0]:high[0], low[1]:high[1]] = False
        crop[:, outside] = 0.0
        labels[outside] = 0
        normalise_crop(crop)
    return crop, labels


def _zero_outside_heart_box(crop: np.ndarray, labels: np.ndarray, rng: np.random.Generator,
                            a: Augmentation) -> None:
    """Zero ``crop`` [time, rows, cols] and ``labels`` [rows, cols] (in place, then renormalise)
    outside a box around the LV whose half-sizes are ``tight_fov_ratio`` times the epicardial
    equivalent radius (LV blood pool + myocardium area); the box may cut into the ring, as a
    tight export crop around the LV does. No heart in the crop: nothing is changed."""
    heart = (labels == 1) | (labels == 2)
    if not heart.any():
        return
    radius = np.sqrt(heart.sum() / np.pi)
    middle = np.asarray(ndimage.center_of_mass(heart))
    half = radius * rng.uniform(*a.tight_fov_ratio, size=2)
    middle = middle + rng.uniform(-a.tight_fov_offset, a.tight_fov_offset, size=2) * half
    low = np.clip(np.round(middle - half).astype(int), 0, CROP_SIZE)
    high = np.clip(np.round(middle + half).astype(int), 0, CROP_SIZE)
    outside = np.ones(labels.shape, dtype=bool)
    outside[low[0]:high[0], low[1]:high[1]] = False
    crop[:, outside] = 0.0
    labels[outside] = 0
    normalise_crop(crop)


def is_validation_study(seed: int, validation_fraction: float = 0.125) -> bool:
    """Study-level split: a fixed fraction of seeds (by a hash of the seed) is validation."""
    return (seed * 2654435761 % 2 ** 32) / 2 ** 32 < validation_fraction


def study_samples(seed: int, rng: np.random.Generator, augmentation: Augmentation | None, *,
                  repeats: int = 1, **simulator_options) -> list[tuple[np.ndarray, np.ndarray]]:
    """``repeats`` augmented samples of every slice of the simulated study ``seed``."""
    from perfline.simulator import simulate_image_study  # the simulator is a training dependency

    study = simulate_image_study(seed, **simulator_options)
    return [augmented_sample(slice_, rng, augmentation) for _ in range(repeats)
            for slice_ in study]

