"""Non-rigid in-plane motion correction of a perfusion series through the contrast change.

Frames of a first-pass series differ in contrast (the bolus), so registering every frame to one
reference frame fails. Following Xue et al. (MRM 2020; REFERENCES.md section 2, and the
synthetic-image approach of Xue et al., MRM 2012;67:1644), each pass builds, for every frame,
a synthetic frame of the same contrast from a low-rank Karhunen-Loeve (PCA) approximation of
the current series - the few leading temporal components capture the contrast dynamics but
not the frame-to-frame respiratory jitter - and registers the original frame to it; the
corrected series feeds the next pass.

Registration engine: dense Gauss-Newton (Lucas-Kanade) flow with the symmetric gradient,
box-filtered least-squares windows, field smoothing and a 2 x 2 block-average pyramid
(:func:`flow_register`); it runs on all frames of a slice at once as one array
([time, rows, cols]), which is what makes it fast enough inline (measured against demons in
docs/preprocessing.md). Intensity-based passes are followed by a contrast-invariant
translation of the heart region (normalised gradient fields, Haber & Modersitzki, 2006).
A series whose estimated heart motion is under a fraction of the 0.5 px residual target, and
single frames with sub-pixel fields, are left as they came (a motion-free series comes out
identical to the input).

Displacements are in pixels, float32 [2, time, rows, cols] = (row, col) components, and
define a backward map: ``corrected[t, y] = frame[t, y + u[:, t, y]]``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy import fft, ndimage

from perfline.toolbox.box_filter import box_filter_plane
from perfline.toolbox.image_warp import WARP_ORDERS, warp_frames

logger = logging.getLogger(__name__)


class MotionCorrectionError(ValueError):
    """A series that cannot be registered (wrong shape, non-finite values, too few frames)."""


@dataclass(frozen=True)
class MotionCorrectionResult:
    """Output of :func:`motion_correct_series`.

    Attributes:
        corrected: float32 [time, rows, cols] registered series.
        displacement_px: float32 [2, time, rows, cols] backward map (row, col) in pixels.
        heart_motion_px: estimated motion of the saturation-recovery frames, pixels:
            :func:`heart_motion_rms_px` of the field before any frame was left untouched, over
            the located heart (over the whole image when the heart translation does not run).
        still_series: True if the saturation-recovery frames were all left untouched because
            ``heart_motion_px`` was under the stillness threshold.
    """

    corrected: np.ndarray
    displacement_px: np.ndarray
    heart_motion_px: float
    still_series: bool


def warp_series(series: np.ndarray, displacement_px: np.ndarray, order: int = 1) -> np.ndarray:
    """Resample every frame at ``y + u(y)`` (edge values continued; ``toolbox.image_warp``).

    ``order`` 1: bilinear. ``order`` 3: cubic B-spline (each frame prefiltered, Unser, IEEE Signal
    Process. Mag. 1999;16(6):22): bilinear resampling at a fractional shift averages neighbouring
    pixels, which carries the bright LV blood of the first pass one pixel further into the
    myocardium in every moved frame; the chain's tissue curves in the report's core then arrive
    0.1-0.6 s early and their delays collapse to 0 (docs/mapping.md, "Session 11"). The cubic spline
    keeps the edge (noisy 610 rest: mean early arrival -0.42 -> -0.06 s).

    Args:
        series: float [time, rows, cols].
        displacement_px: float [2, time, rows, cols] (row, col) backward displacement.
        order: interpolation order, 1 or 3.

    Returns:
        float32 [time, rows, cols].
    """
    if order not in WARP_ORDERS:
        raise MotionCorrectionError(f"warp interpolation order must be one of {WARP_ORDERS}, got {order}")
    return warp_frames(series, displacement_px[0], displacement_px[1], order)


BOX_PASSES = 1


def _box_width(sigma_px: float, passes: int) -> int:
    """Odd box width whose ``passes``-fold repetition has the variance of a Gaussian of ``sigma_px``."""
    width = np.sqrt(12.0 * sigma_px**2 / passes + 1.0)
    return int(2 * round((width - 1) / 2) + 1)


def _smooth_plane(data: np.ndarray, sigma_px: float) -> np.ndarray:
    """Approximate Gaussian smoothing over the last two axes: ``BOX_PASSES`` box filters along each.

    Box filters cost O(1) per pixel whatever their width (running sums), which is what keeps
    the per-pixel least-squares windows cheap (``toolbox.box_filter``: compiled loops equal to
    scipy's ``uniform_filter1d``; float32 out, as every caller here passes).
    """
    if sigma_px <= 0:
        return data
    width = _box_width(sigma_px, BOX_PASSES)
    if width <= 1:
        return data
    out = data
    for _ in range(BOX_PASSES):
        out = box_filter_plane(out, width)
    return out


def _smooth_field(field: np.ndarray, sigma_px: float) -> np.ndarray:
    """Smoothing of a [2, time, rows, cols] field in the image plane only."""
    return _smooth_plane(field, sigma_px)


def _gradient(series: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Central-difference gradient (rows, cols) of every frame, one-sided at the edges."""
    grad_r = np.empty_like(series)
    grad_c = np.empty_like(series)
    grad_r[:, 1:-1] = 0.5 * (series[:, 2:] - series[:, :-2])
    grad_r[:, 0] = series[:, 1] - series[:, 0]
    grad_r[:, -1] = series[:, -1] - series[:, -2]
    grad_c[:, :, 1:-1] = 0.5 * (series[:, :, 2:] - series[:, :, :-2])
    grad_c[:, :, 0] = series[:, :, 1] - series[:, :, 0]
    grad_c[:, :, -1] = series[:, :, -1] - series[:, :, -2]
    return grad_r, grad_c


def flow_register(fixed: np.ndarray, moving: np.ndarray, *, iterations: int = 5,
                  window_px: float = 3.0, smoothing_px: float = 1.0, damping: float = 0.05,
                  max_step_px: float = 1.0, robust: float = 0.0,
                  initial_px: np.ndarray | None = None) -> np.ndarray:
    """Register every frame of ``moving`` to the same frame of ``fixed`` (dense Gauss-Newton flow).

    Each iteration linearises the warped moving frame about the current field with the
    symmetric gradient ``g = (grad F + grad M) / 2`` and solves, for every pixel, the 2 x 2
    least-squares system of a Gaussian window (dense Lucas-Kanade, Lucas & Kanade 1981;
    Farneback-style windowing) ``(sum w g g^T + lambda I) du = -sum w g (M - F)``; ``lambda``
    (``damping`` times the mean squared gradient) keeps the update small where there is no
    structure. The accumulated field is then smoothed (elastic regularisation).

    Args:
        fixed, moving: float [time, rows, cols], intensities on a comparable scale.
        iterations: Gauss-Newton iterations.
        window_px: Gaussian sigma of the least-squares window, pixels.
        smoothing_px: Gaussian sigma applied to the field after each iteration, pixels.
        damping: Tikhonov weight relative to the mean squared gradient.
        max_step_px: largest update of one iteration, pixels (trust region).
        robust: if > 0, Cauchy weights ``1 / (1 + (d / (robust * s))^2)`` on the intensity
            difference ``d`` (``s`` = median absolute difference of the frame) down-weight
            pixels whose mismatch no displacement explains (contrast change).
        initial_px: optional starting field [2, time, rows, cols].

    Returns:
        float32 [2, time, rows, cols] backward displacement: ``warp_series(moving, u) ~ fixed``.
    """
    fixed = np.asarray(fixed, dtype=np.float32)
    moving = np.asarray(moving, dtype=np.float32)
    if fixed.shape != moving.shape or fixed.ndim != 3:
        raise MotionCorrectionError(
            f"fixed and moving must be equal-shaped [time, rows, cols], found {fixed.shape} and {moving.shape}")
    field = (np.zeros((2,) + fixed.shape, dtype=np.float32) if initial_px is None
             else np.array(initial_px, dtype=np.float32))
    fixed_grad_r, fixed_grad_c = _gradient(fixed)
    for _ in range(iterations):
        warped = warp_series(moving, field) if field.any() else moving
        difference = warped - fixed
        moving_grad_r, moving_grad_c = _gradient(warped)
        grad_r = 0.5 * (fixed_grad_r + moving_grad_r)
        grad_c = 0.5 * (fixed_grad_c + moving_grad_c)
        if robust > 0:
            spread = np.median(np.abs(difference), axis=(1, 2), keepdims=True) + 1e-6
            weight = 1.0 / (1.0 + (difference / (robust * spread)) ** 2)
            grad_r_w = grad_r * weight
            grad_c_w = grad_c * weight
        else:
            grad_r_w, grad_c_w = grad_r, grad_c
        products = np.stack([grad_r_w * grad_r, grad_r_w * grad_c, grad_c_w * grad_c,
                             grad_r_w * difference, grad_c_w * difference])
        products = _smooth_plane(products, window_px)
        a11, a12, a22, b1, b2 = products
        load = damping * float(np.mean(a11 + a22)) + 1e-12
        a11 = a11 + load
        a22 = a22 + load
        determinant = a11 * a22 - a12 * a12
        step_r = (a22 * b1 - a12 * b2) / determinant
        step_c = (a11 * b2 - a12 * b1) / determinant
        # trust region: a Gauss-Newton step is only valid within about a pixel
        limit = np.minimum(1.0, max_step_px / np.maximum(np.sqrt(step_r**2 + step_c**2), 1e-12))
        field[0] -= step_r * limit
        field[1] -= step_c * limit
        field = _smooth_field(field, smoothing_px)
    return field


def _downsample(series: np.ndarray) -> np.ndarray:
    """2 x 2 block average of every frame (odd trailing row/column dropped)."""
    n_frames, n_rows, n_cols = series.shape
    cropped = series[:, : n_rows // 2 * 2, : n_cols // 2 * 2]
    return cropped.reshape(n_frames, n_rows // 2, 2, n_cols // 2, 2).mean(axis=(2, 4))


def _interpolation_matrix(n_fine: int, n_coarse: int) -> np.ndarray:
    """float32 [n_fine, n_coarse] linear interpolation from a 2 x 2 block-average grid.

    The centre of coarse pixel i lies at fine coordinate 2 i + 0.5; edges are held constant.
    """
    position = np.clip((np.arange(n_fine, dtype=np.float64) - 0.5) / 2, 0, n_coarse - 1)
    lower = np.minimum(np.floor(position).astype(int), max(n_coarse - 2, 0))
    weight = position - lower
    matrix = np.zeros((n_fine, n_coarse), dtype=np.float32)
    matrix[np.arange(n_fine), lower] = 1 - weight
    if n_coarse > 1:
        matrix[np.arange(n_fine), lower + 1] += weight
    return matrix


def _upsample_field(field: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Field of a 2 x 2 block-averaged grid brought back to ``shape`` (values doubled)."""
    rows = _interpolation_matrix(shape[0], field.shape[2])
    cols = _interpolation_matrix(shape[1], field.shape[3])
    n_components, n_frames, n_rows, n_cols = field.shape
    # two plain 2-D matrix products (BLAS) instead of a broadcast batch of small ones
    along_cols = field.reshape(-1, n_cols) @ (2.0 * cols.T)  # [(2 T r), C]
    along_cols = along_cols.reshape(n_components * n_frames, n_rows, shape[1]).transpose(1, 0, 2)
    out = rows @ along_cols.reshape(n_rows, -1)  # [R, (2 T C)]
    return np.ascontiguousarray(
        out.reshape(shape[0], n_components, n_frames, shape[1]).transpose(1, 2, 0, 3), dtype=np.float32)


def register_multiresolution(fixed: np.ndarray, moving: np.ndarray, *, levels: int = 3,
                             iterations: int = 4, finest_iterations: int = 1, window_px: float = 3.0,
                             smoothing_px: float = 1.0, robust: float = 0.0) -> np.ndarray:
    """Coarse-to-fine :func:`flow_register` over a 2 x 2 block-average pyramid.

    ``iterations`` per level except the finest (full resolution), which gets
    ``finest_iterations``; window and smoothing widths are in pixels of each level.
    """
    pyramid = [(np.asarray(fixed, dtype=np.float32), np.asarray(moving, dtype=np.float32))]
    while len(pyramid) < levels and min(pyramid[-1][0].shape[1:]) >= 32:
        pyramid.append((_downsample(pyramid[-1][0]), _downsample(pyramid[-1][1])))
    field = None
    for depth in range(len(pyramid) - 1, -1, -1):
        level_fixed, level_moving = pyramid[depth]
        if field is not None:
            field = _upsample_field(field, level_fixed.shape[1:])
        count = finest_iterations if depth == 0 else iterations
        if count > 0:
            field = flow_register(level_fixed, level_moving, iterations=count, window_px=window_px,
                                  smoothing_px=smoothing_px, robust=robust, initial_px=field)
    if field is None:
        field = np.zeros((2,) + pyramid[0][0].shape, dtype=np.float32)
    return field


def kl_synthetic_frames(series: np.ndarray, n_components: int) -> np.ndarray:
    """Low-rank Karhunen-Loeve approximation of a series (same shape, float32).

    The series is treated as a [time, pixels] matrix; the temporal mean plus the
    ``n_components`` leading eigenvectors of its [time, time] covariance are kept.
    """
    n_frames = series.shape[0]
    matrix = series.reshape(n_frames, -1).astype(np.float64)
    mean = matrix.mean(axis=0, keepdims=True)
    centred = matrix - mean
    covariance = centred @ centred.T
    _, vectors = np.linalg.eigh(covariance)
    leading = vectors[:, -n_components:] if n_components > 0 else vectors[:, :0]
    synthetic = mean + leading @ (leading.T @ centred)
    return synthetic.reshape(series.shape).astype(np.float32)


def _normalised_gradients(series: np.ndarray, smoothing_px: float,
                           edge_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Normalised gradient field ``grad I / sqrt(|grad I|^2 + eps^2)`` of every frame.

    Haber & Modersitzki (2006): the direction of an edge, not its strength or polarity, so a
    frame can be compared with a reference of another contrast. ``eps`` is ``edge_fraction``
    times the 90th percentile of the frame's gradient magnitude: weaker (noise) gradients
    shrink towards zero length, edges above it count about equally whatever their contrast.

    Args:
        series: float32 [time, rows, cols].
        smoothing_px: Gaussian sigma applied before the gradient, pixels (noise).
        edge_fraction: ``eps`` relative to the strong edges of the frame.

    Returns:
        (row, col) components, each float32 [time, rows, cols].
    """
    smoothed = ndimage.gaussian_filter(series, (0, smoothing_px, smoothing_px)) if smoothing_px > 0 else series
    grad_r, grad_c = _gradient(np.ascontiguousarray(smoothed, dtype=np.float32))
    magnitude2 = grad_r**2 + grad_c**2
    eps2 = edge_fraction**2 * np.percentile(magnitude2.reshape(len(series), -1), 90, axis=1)[:, None, None]
    norm = np.sqrt(magnitude2 + eps2 + 1e-30)
    return grad_r / norm, grad_c / norm


def contrast_invariant_translation(frames: np.ndarray, reference: np.ndarray, window: np.ndarray, *,
                                   max_shift_px: int = 3, smoothing_px: float = 1.0,
                                   edge_fraction: float = 0.1) -> np.ndarray:
    """Translation of every frame onto a reference of another contrast (normalised gradient fields).

    Maximises, for every frame F, ``J(t) = sum_x w(x) (n_F(x + t) . n_R(x))^2`` over integer
    shifts ``|t| <= max_shift_px`` (normalised gradients n, :func:`_normalised_gradients`; the
    squared dot product ignores the polarity of an edge, so a dark pre-contrast heart and a
    bright enhanced one share their outline), then refines each axis by a parabola through the
    maximum and its two neighbours. Expanding the dot product, ``J`` is a sum of three
    cross-correlations (``n_r^2``, ``n_c^2``, ``2 n_r n_c``), computed for all shifts at once by
    FFT (circular: ``window`` must fall to about zero ``max_shift_px`` from the border).

    Args:
        frames: float [time, rows, cols].
        reference: float [rows, cols].
        window: float [rows, cols] weights of the reference pixels (the region to align).
        max_shift_px: largest shift searched, pixels.
        smoothing_px, edge_fraction: see :func:`_normalised_gradients`.

    Returns:
        float64 [time, 2] (row, col) shift t with ``frames[k](x + t) ~ reference(x)``, pixels:
        add it to a backward displacement to align the frame.
    """
    frames = np.asarray(frames, dtype=np.float32)
    if frames.ndim != 3 or reference.shape != frames.shape[1:] or window.shape != frames.shape[1:]:
        raise MotionCorrectionError(f"frames [time, rows, cols] and reference, window [rows, cols] expected, "
                                    f"found {frames.shape}, {reference.shape}, {window.shape}")
    if min(frames.shape[1:]) < 2 * max_shift_px + 3:
        raise MotionCorrectionError(f"frames of {frames.shape[1:]} pixels too small for a {max_shift_px}-pixel search")
    frame_r, frame_c = _normalised_gradients(frames, smoothing_px, edge_fraction)
    ref_r, ref_c = _normalised_gradients(np.asarray(reference, dtype=np.float32)[None], smoothing_px, edge_fraction)
    weight = np.asarray(window, dtype=np.float32)[None]
    shape = frames.shape[1:]
    spectrum = np.zeros((frames.shape[0], shape[0], shape[1] // 2 + 1), dtype=np.complex64)
    products = ((frame_r * frame_r, ref_r * ref_r, 1.0), (frame_c * frame_c, ref_c * ref_c, 1.0),
                (frame_r * frame_c, ref_r * ref_c, 2.0))
    for frame_part, ref_part, factor in products:
        # sum_x a(x + t) b(x) has the spectrum A conj(B)
        spectrum += fft.rfft2(frame_part) * np.conj(fft.rfft2(factor * weight * ref_part))
    score = fft.irfft2(spectrum, s=shape)
    shifts = np.arange(-max_shift_px, max_shift_px + 1)
    score = score[:, shifts[:, None] % shape[0], shifts[None, :] % shape[1]]  # [time, 2 m + 1, 2 m + 1]
    n_frames, size = score.shape[0], score.shape[1]
    best = np.argmax(score.reshape(n_frames, -1), axis=1)
    row = np.clip(best // size, 1, size - 2)
    col = np.clip(best % size, 1, size - 2)
    frame = np.arange(n_frames)

    def vertex(minus: np.ndarray, centre: np.ndarray, plus: np.ndarray) -> np.ndarray:
        curvature = minus - 2 * centre + plus
        offset = np.where(curvature < 0, 0.5 * (minus - plus) / np.where(curvature < 0, curvature, -1.0), 0.0)
        return np.clip(offset, -0.5, 0.5)

    centre = score[frame, row, col]
    row_shift = shifts[row] + vertex(score[frame, row - 1, col], centre, score[frame, row + 1, col])
    col_shift = shifts[col] + vertex(score[frame, row, col - 1], centre, score[frame, row, col + 1])
    return np.stack([row_shift, col_shift], axis=1).astype(np.float64)


def locate_heart(series: np.ndarray, prior_px: float) -> tuple[float, float]:
    """(row, col) of the heart in a perfusion series, pixels.

    The bolus changes the signal of the blood pools and myocardium more than anything else
    in the field of view: the maximum of the temporal standard deviation, smoothed over
    ``prior_px / 5`` (a heart-sized blob beats a thin moving edge) and weighted by a Gaussian
    of sigma ``prior_px`` around the image centre (prescribed slices put the heart near it).
    Measured on 66 simulated slices (22 studies x 3, with breathing): without the weight the
    spleen or the descending aorta won on about half of the apical slices; with it (sigma
    30-40 px) 64-65 of 66 came within 12 px of the heart's centroid, median 3-4 px.

    Args:
        series: float [time, rows, cols] saturation-recovery frames.
        prior_px: sigma of the centre weight, pixels.
    """
    n_rows, n_cols = series.shape[1:]
    spread = ndimage.gaussian_filter(np.std(series, axis=0), prior_px / 5)
    rows, cols = np.indices((n_rows, n_cols), dtype=np.float32)
    spread *= np.exp(-0.5 * ((rows - (n_rows - 1) / 2) ** 2 + (cols - (n_cols - 1) / 2) ** 2) / prior_px**2)
    row, col = np.unravel_index(int(np.argmax(spread)), spread.shape)
    return float(row), float(col)


def _heart_translation(series: np.ndarray, field: np.ndarray, window_px: float,
                       centre: tuple[float, float]) -> np.ndarray:
    """Per-frame translation [time, 2] that aligns the heart region of the registered series
    to its temporal median by edge direction (:func:`contrast_invariant_translation`).

    The region is a Gaussian window of sigma ``window_px`` at ``centre`` (row, col), evaluated
    on a box of 6 sigma around it (inside the image); only that box is warped.
    """
    n_rows, n_cols = series.shape[1:]
    box_rows, box_cols = (min(n, 2 * int(round(3 * window_px))) for n in (n_rows, n_cols))
    top = int(np.clip(round(centre[0]) - box_rows // 2, 0, n_rows - box_rows))
    left = int(np.clip(round(centre[1]) - box_cols // 2, 0, n_cols - box_cols))
    box = (slice(None), slice(top, top + box_rows), slice(left, left + box_cols))
    # the warp clips sampling positions to the box: wrong only within the field's size of its
    # border, where the window is about zero
    registered = warp_series(series[box], np.ascontiguousarray(field[(slice(None),) + box]))
    rows, cols = np.indices((box_rows, box_cols), dtype=np.float32)
    window = np.exp(-0.5 * ((rows - (centre[0] - top)) ** 2 + (cols - (centre[1] - left)) ** 2) / window_px**2)
    return contrast_invariant_translation(registered, np.median(registered, axis=0), window)


def _correct_block(series: np.ndarray, reference_passes: int, kl_passes: int, n_components: int,
                   robust: float, registration: dict[str, float | int]) -> np.ndarray:
    """Field registering one block of frames of the same kind; see :func:`motion_correct_series`."""
    corrected = series
    field = np.zeros((2,) + series.shape, dtype=np.float32)
    coarse = dict(registration, window_px=2 * float(registration["window_px"]), robust=robust,
                  iterations=int(registration["iterations"]) + 1)
    for index in range(reference_passes):
        reference = np.broadcast_to(np.median(corrected, axis=0), series.shape)
        field = register_multiresolution(np.ascontiguousarray(reference), series, **coarse)
        corrected = warp_series(series, field)
        logger.debug("robust reference pass %d: max displacement %.2f px", index + 1,
                     float(np.sqrt(field[0] ** 2 + field[1] ** 2).max()))
    components = min(n_components, series.shape[0] - 1)
    for index in range(kl_passes):
        synthetic = kl_synthetic_frames(corrected, components)
        field = register_multiresolution(synthetic, series, **registration)
        corrected = warp_series(series, field)
        logger.debug("KL pass %d: max displacement %.2f px", index + 1,
                     float(np.sqrt(field[0] ** 2 + field[1] ** 2).max()))
    return field


def heart_motion_rms_px(displacement_px: np.ndarray, weight: np.ndarray) -> float:
    """RMS over frames of the heart-weighted displacement about its temporal mean, pixels.

    ``sqrt(mean_t sum_x w(x) |u_t(x) - mean_t' u_t'(x)|^2)`` with ``sum w = 1``: the quantity
    the residual-motion target is stated in (RMS over frames and heart pixels, a common offset
    of the whole series not counted), measured on an estimated field instead of the truth.

    Args:
        displacement_px: float [2, time, rows, cols] (row, col) field, pixels.
        weight: float [rows, cols] non-negative weights of the heart pixels (normalised here).
    """
    field = np.asarray(displacement_px, dtype=np.float32)
    if field.ndim != 4 or field.shape[0] != 2 or np.shape(weight) != field.shape[2:]:
        raise MotionCorrectionError(f"field [2, time, rows, cols] and weight [rows, cols] expected, "
                                    f"found {field.shape} and {np.shape(weight)}")
    weight = np.asarray(weight, dtype=np.float32)
    total = float(weight.sum())
    if not total > 0:
        raise MotionCorrectionError("weight sums to zero")
    weight = weight / total
    return _motion_about_mean(field, weight, np.einsum("ftrc,rc->t", field**2, weight))


def _motion_about_mean(field: np.ndarray, weight: np.ndarray, frame_squares: np.ndarray) -> float:
    """:func:`heart_motion_rms_px` from the per-frame weighted squares ``sum_x w |u_t|^2`` [time]
    (already computed for the still-frame guard): ``mean_t |u_t - mean u|^2 = mean_t |u_t|^2 -
    |mean u|^2`` pixel by pixel, so only the temporal mean field is new work."""
    mean_field = field.mean(axis=1)
    spread = float(np.mean(frame_squares, dtype=np.float64)) - float(np.einsum("krc,rc->", mean_field**2, weight))
    return float(np.sqrt(max(spread, 0.0)))


def _estimate_field(series: np.ndarray, n_pd_frames: int, *, reference_passes: int, kl_passes: int,
                    n_components: int, robust: float, half_resolution: bool, levels: int, iterations: int,
                    window_px: float, smoothing_px: float, crop_fraction: float,
                    heart_window_px: float) -> tuple[np.ndarray, np.ndarray]:
    """Stages 1-3 of :func:`motion_correct_series` on a checked series.

    Returns:
        (field, weight): float32 [2, time, rows, cols] backward displacement in pixels before
        any still-frame decision, and float32 [rows, cols] weights summing to 1 over the heart
        (a Gaussian of 2/3 ``heart_window_px`` at the located heart; uniform when stage 3 is off).
    """
    registration: dict[str, float | int] = dict(levels=levels, iterations=iterations,
                                                finest_iterations=iterations,
                                                window_px=window_px, smoothing_px=smoothing_px)
    if not 0.1 <= crop_fraction <= 1.0:
        raise MotionCorrectionError(f"crop_fraction must be in [0.1, 1], found {crop_fraction}")
    n_rows, n_cols = series.shape[1:]
    crop_rows, crop_cols = (max(2 * int(round(n * crop_fraction / 2)), min(n, 32)) for n in (n_rows, n_cols))
    top, left = (n_rows - crop_rows) // 2 // 2 * 2, (n_cols - crop_cols) // 2 // 2 * 2
    cropped = series[:, top:top + crop_rows, left:left + crop_cols]
    half_resolution = half_resolution and min(cropped.shape[1:]) >= 32
    grid = _downsample(cropped) if half_resolution else cropped
    estimated = np.zeros((2,) + grid.shape, dtype=np.float32)
    blocks = [(slice(n_pd_frames, None), n_components)]
    if n_pd_frames >= 2:
        blocks.append((slice(0, n_pd_frames), 0))
    for frames, components in blocks:
        block = grid[frames]
        scale = float(np.percentile(block, 99))
        if not scale > 0:
            raise MotionCorrectionError("series has no signal (99th percentile <= 0)")
        estimated[:, frames] = _correct_block(block / scale, reference_passes, kl_passes if components else 0,
                                              components, robust, registration)
    estimated_grid = estimated
    if half_resolution:
        estimated = _upsample_field(estimated, cropped.shape[1:])
    pad = ((0, 0), (0, 0), (top, n_rows - top - cropped.shape[1]), (left, n_cols - left - cropped.shape[2]))
    field = np.pad(estimated, pad, mode="edge")
    # the still-frame test weighs the field by the heart when it is located: a frame is moved
    # only if its heart moves (a whole-field RMS let contrast-driven sub-pixel fields in the
    # heart through on motion-free series); the test's window is 2/3 of the alignment window,
    # the heart proper rather than its surroundings (on motion-free simulated series the
    # spurious fields are largest around the heart)
    weight = np.ones((n_rows, n_cols), dtype=np.float32)
    if heart_window_px > 0 and min(n_rows, n_cols) >= 5 * heart_window_px:
        # located on the estimation grid (registered SR frames, cropped and halved): cheap
        scale_px = grid.shape[1] / cropped.shape[1]
        grid_row, grid_col = locate_heart(warp_series(grid[n_pd_frames:], estimated_grid[:, n_pd_frames:]),
                                          2 * heart_window_px * scale_px)
        centre = (top + (grid_row + 0.5) / scale_px - 0.5, left + (grid_col + 0.5) / scale_px - 0.5)
        translation = _heart_translation(series[n_pd_frames:], field[:, n_pd_frames:], heart_window_px, centre)
        field[:, n_pd_frames:] += translation.T[:, :, None, None].astype(np.float32)
        logger.debug("heart at (%.0f, %.0f) px, translation RMS %.2f px, max %.2f px", centre[0], centre[1],
                     float(np.sqrt(2 * np.mean(translation**2))), float(np.abs(translation).max()))
        rows, cols = np.indices((n_rows, n_cols), dtype=np.float32)
        weight = np.exp(-0.5 * ((rows - centre[0]) ** 2 + (cols - centre[1]) ** 2) / (2 * heart_window_px / 3) ** 2)
    return field, weight / weight.sum()


def motion_correct_series(series: np.ndarray, *, n_pd_frames: int = 0, reference_passes: int = 2,
                          kl_passes: int = 1, n_components: int = 3, robust: float = 4.0,
                          half_resolution: bool = True, levels: int = 2, iterations: int = 3,
                          window_px: float = 4.0, smoothing_px: float = 2.0,
                          min_displacement_px: float = 0.4, still_series_px: float = 0.35,
                          crop_fraction: float = 0.7, heart_window_px: float = 15.0,
                          output_order: int = 1) -> MotionCorrectionResult:
    """Non-rigid registration of a dynamic series through the contrast change.

    Three stages, measured on the simulator (docs/preprocessing.md):

    1. ``reference_passes`` robust passes: every frame is registered to the temporal median of
       the series corrected so far, with Cauchy-weighted residuals (the pixels whose contrast
       changes - blood pools and myocardium during the bolus - are down-weighted, so structures
       of constant contrast around the heart drive the smooth field) and a window twice as
       wide. This removes most of the respiratory motion, which the KL frames alone cannot:
       on a moving series the leading KL components model the motion as well.
    2. ``kl_passes`` passes of the synthetic-frame method (Xue et al., MRM 2020): the frames are
       registered to a same-contrast synthetic frame from the KL (PCA) approximation with
       ``n_components`` components of the pre-aligned series.
    3. Heart translation (``heart_window_px`` > 0): the heart is located
       (:func:`locate_heart`) and every SR frame of the registered series is shifted so that
       the edges of the heart region line up with the temporal median
       (:func:`contrast_invariant_translation`, normalised gradient fields: edge direction,
       not intensity). Stages 1-2 compare intensities, so a frame whose contrast
       is far from the reference keeps a bias: on deep breathing the pre-contrast frames came
       out shifted together by about 1 px, and no intensity pass sees an offset that a whole
       group of similar frames shares. The shift is added to the field (exact for the
       translation part; the field is nearly flat over the heart).

    Then two decisions keep a still series or frame as it came (a registration finds
    noise- and contrast-driven sub-pixel fields where nothing moves, and resampling a frame
    that did not move can only misplace its edges and blur it):

    - the whole series: if the estimated motion of the SR frames (:func:`heart_motion_rms_px`
      over the heart window, the RMS over frames and heart pixels that the 0.5 px residual
      target is stated in) is under ``still_series_px``, every SR frame is left untouched.
      What is left then is the series' own motion, which the estimate puts under the
      threshold; 0.35 px = 0.7 x the 0.5 px target leaves 30 % for an estimate that reads
      the motion low (deep inspirations came out about 10 % under-corrected). Measured
      (docs/preprocessing.md, 2026-11-26 evening): motion-free simulated series 0.07-0.27 px,
      the smallest simulated breathing (3 mm) 0.63-0.77 px.
    - each frame: frames whose field has a heart RMS under ``min_displacement_px`` are left
      untouched.

    Every pass registers the ORIGINAL frames (no accumulated interpolation blur). The leading
    ``n_pd_frames`` proton-density frames have a contrast of their own and are registered
    among themselves. With ``half_resolution`` the whole estimation runs on 2 x 2
    block-averaged frames (respiratory fields are smooth; 4 x fewer pixels) and only the final
    warp is done at full resolution.

    Args:
        series: float [time, rows, cols] magnitude frames (any positive scale).
        n_pd_frames: PD frames at the start of ``series``.
        reference_passes, kl_passes, n_components: see above.
        robust: Cauchy scale of the reference passes, in median absolute differences (a
            small value also rejects the edges of large displacements: measured best at 4).
        half_resolution: estimate the field on the half-resolution grid.
        crop_fraction: the field is estimated on the central ``crop_fraction`` of the rows and
            columns (the heart is near the centre of a perfusion field of view; about half the
            pixels, half the time) and continued outwards with its edge values; 1 = whole image.
        min_displacement_px: frames whose field has a smaller RMS displacement (over the heart,
            a Gaussian of 2/3 ``heart_window_px``, when stage 3 runs, else over the image) are
            left untouched (zero field): on a still series the registration only finds noise-
            and contrast-driven sub-pixel jitter, and resampling would blur the frame for nothing.
        still_series_px: the SR frames are all left untouched when their estimated motion
            (:func:`heart_motion_rms_px`, pixels) is under it; 0 turns the decision off.
        levels, iterations, window_px, smoothing_px: registration settings on the estimation
            grid (every level gets ``iterations``), see :func:`register_multiresolution`.
        heart_window_px: Gaussian sigma (pixels of ``series``) of the heart region aligned by
            stage 3 (15 px = 28 mm at the simulator's 1.875 mm pixels); 0 turns stage 3 off.
            Stage 3 is skipped on images smaller than 5 sigma (the 48 x 64 AIF series).
        output_order: interpolation order of the final warp (:func:`warp_series`: 1 bilinear, 3
            cubic B-spline); the estimation passes always resample bilinearly.

    Returns:
        :class:`MotionCorrectionResult`.

    Raises:
        MotionCorrectionError: on a non-3-D or non-finite series or fewer than 2 SR frames.
    """
    series = np.asarray(series, dtype=np.float32)
    if series.ndim != 3:
        raise MotionCorrectionError(f"series must be [time, rows, cols], found shape {series.shape}")
    if output_order not in WARP_ORDERS:
        raise MotionCorrectionError(f"output_order must be one of {WARP_ORDERS}, got {output_order}")
    if not 0 <= n_pd_frames <= series.shape[0] - 2:
        raise MotionCorrectionError(
            f"need at least 2 saturation-recovery frames after {n_pd_frames} PD frames, "
            f"found {series.shape[0]} frames in all")
    if not np.all(np.isfinite(series)):
        raise MotionCorrectionError(f"series contains {int(np.sum(~np.isfinite(series)))} non-finite values")
    field, weight = _estimate_field(series, n_pd_frames, reference_passes=reference_passes, kl_passes=kl_passes,
                                    n_components=n_components, robust=robust, half_resolution=half_resolution,
                                    levels=levels, iterations=iterations, window_px=window_px,
                                    smoothing_px=smoothing_px, crop_fraction=crop_fraction,
                                    heart_window_px=heart_window_px)
    frame_squares = np.einsum("ftrc,rc->t", field**2, weight)
    heart_motion = _motion_about_mean(field[:, n_pd_frames:], weight, frame_squares[n_pd_frames:])
    still = np.sqrt(frame_squares) < min_displacement_px
    still_series = heart_motion < still_series_px
    if still_series:
        still[n_pd_frames:] = True
    field[:, still] = 0.0
    corrected = series.copy() if still.all() else warp_series(series, field, output_order)
    corrected[still] = series[still]
    logger.debug("motion correction: estimated heart motion %.2f px RMS%s; %d of %d frames left untouched "
                 "(below %.2f px)", heart_motion, " (still series)" if still_series else "", int(still.sum()),
                 still.size, min_displacement_px)
    return MotionCorrectionResult(corrected, field, heart_motion, bool(still_series))
