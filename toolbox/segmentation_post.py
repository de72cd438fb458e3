"""Post-processing of CNN class probabilities into one clean label map (QPerf's rule).

Per foreground class the probability threshold is raised from 0.5 until a single connected
component remains; if none of the thresholds gives exactly one, the largest component at 0.5
is kept (Xue et al. 2020 App. E3 / QPerf, REFERENCES.md §5). Thresholds >= 0.5 keep the
classes disjoint because the probabilities of a pixel sum to 1.

Labels: 0 background, 1 LV blood pool, 2 myocardium, 3 RV blood pool (docs/conventions.md).

Ring closing (optional, ``postprocess(..., close_ring=True)``): when the myocardium does not
enclose the LV blood pool, the myocardium probability is followed along rays from the blood
pool's centroid and each ray's wall is taken with a threshold relative to that ray's own
peak (:func:`close_ring_along_rays`), as QPerf's ring-based post-processing does; kept only if
the ring then closes.

Ring completion from the image (optional, ``postprocess(..., complete_ring=True,
series=...)``): when the ring is still open because on some rays the network sees no wall at
all, those rays' endo- and epicardium are found from the image's own enhancement curves
(blood pool vs myocardium, :func:`unmix_blood_and_tissue`) by dynamic programming along the
gap, with the network's wall as the thickness prior (:func:`complete_ring_from_image`); kept
only if the image shows a wall on the completed rays and the ring then closes
(docs/segmentation.md, "Ring completion from the image").
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
RING_RAYS = 360  # rays of ring closing and ring completion
# how ring completion draws the wall: "rays", each ray's run pixel by pixel (neighbouring
# completed rays drawn over each other's radial extent, the largest myocardium component kept);
# "band", one band between the inner and outer borders of consecutive rays, seen and completed,
# rasterised at <= 0.5 px (:func:`_band_between_rays`), every myocardium component on the band
# kept (docs/segmentation.md, "Ring completion, connected band")
RING_DRAWINGS = ("rays", "band")


@dataclass(frozen=True)
class PostProcessed:
    """Clean labels uint8 [rows, cols] plus what was (not) found."""

    labels: np.ndarray
    thresholds: dict[int, float]
    missing: tuple[str, ...] = field(default=())
    closed_ring: bool = False
    # rays (of RING_RAYS) whose wall was completed from the image (0: none)
    completed_rays: int = 0

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


@dataclass(frozen=True)
class _Rays:
    """Rays from the LV blood pool's centroid (one row per ray, one column per step).

    sample_r/sample_c: float [rays, steps] sample positions (pixels); pixel_r/pixel_c: their
    nearest pixels; inside: bool [rays, steps], a prefix of each row; start: int [rays], the
    first step beyond the ray's last blood-pool pixel; last_inside: int [rays], the last step
    inside the image."""

    sample_r: np.ndarray
    sample_c: np.ndarray
    pixel_r: np.ndarray
    pixel_c: np.ndarray
    inside: np.ndarray
    start: np.ndarray
    last_inside: np.ndarray

    @property
    def steps(self) -> np.ndarray:
        """int [1, steps]: the step index, to broadcast against [rays, steps]."""
        return np.arange(self.inside.shape[1])[None, :]

    @property
    def beyond_blood(self) -> np.ndarray:
        """bool [rays, steps]: inside the image and beyond the blood pool."""
        return (self.steps >= self.start[:, None]) & (self.steps <= self.last_inside[:, None])

    def sample(self, image: np.ndarray) -> np.ndarray:
        """Bilinear samples float [rays, steps] of image float [rows, cols] (0 outside)."""
        return ndimage.map_coordinates(np.asarray(image, dtype=np.float64),
                                       [self.sample_r, self.sample_c], order=1,
                                       mode="constant", cval=0.0, prefilter=False)


def _cast_rays(blood: np.ndarray, n_rays: int, step_px: float) -> _Rays | None:
    """Rays (equal angles, counter-clockwise from the +column axis) from the centroid of the
    bool mask ``blood`` [rows, cols] to beyond the image; None when a ray reaches the image
    edge inside the blood pool (no wall can be placed on it)."""
    center = np.array(ndimage.center_of_mass(blood))
    rows, cols = blood.shape
    angles = np.linspace(0.0, 2.0 * np.pi, int(n_rays), endpoint=False)
    radii = np.arange(0.0, float(np.hypot(rows, cols)), step_px)
    ray_r = center[0] - radii[None, :] * np.sin(angles)[:, None]
    ray_c = center[1] + radii[None, :] * np.cos(angles)[:, None]
    pixel_r, pixel_c = np.rint(ray_r).astype(int), np.rint(ray_c).astype(int)
    inside = (pixel_r >= 0) & (pixel_r < rows) & (pixel_c >= 0) & (pixel_c < cols)
    on_blood = np.zeros_like(inside)
    on_blood[inside] = blood[pixel_r[inside], pixel_c[inside]]
    step = np.arange(radii.size)[None, :]
    last_inside = inside.sum(axis=1) - 1  # a ray leaves the image once: a prefix is inside
    start = np.where(on_blood, step, -1).max(axis=1) + 1  # first step beyond the blood pool
    if (start > last_inside).any():
        return None
    return _Rays(ray_r, ray_c, pixel_r, pixel_c, inside, start, last_inside)


def _probability_runs(rays: _Rays, probability: np.ndarray, relative_threshold: float
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per ray: the probability peak beyond the blood pool and the run of steps [low, high)
    around it that stays above ``relative_threshold`` x that peak. Returns (peak value float
    [rays], low int [rays], high int [rays])."""
    values = rays.sample(probability)
    step, in_range = rays.steps, rays.beyond_blood
    profile = np.where(in_range, values, -np.inf)
    peak = np.argmax(profile, axis=1)
    peak_value = profile[np.arange(profile.shape[0]), peak]
    below = ~(in_range & (values > relative_threshold * peak_value[:, None]))
    low = np.where(below & (step < peak[:, None]), step, -1).max(axis=1) + 1
    high = np.where(below & (step > peak[:, None]), step, values.shape[1]).min(axis=1)
    return peak_value, low, high


def _labels_with_wall(labels: np.ndarray, rays: _Rays, run: np.ndarray) -> np.ndarray | None:
    """``labels`` with the pixels of ``run`` (bool [rays, steps]) not claimed by another class
    made myocardium, only the largest 8-connected myocardium component kept and enclosed
    unclaimed pixels made LV blood pool; None when the ring then does not close."""
    run = run & rays.inside
    wall = np.zeros(labels.shape, dtype=bool)
    wall[rays.pixel_r[run], rays.pixel_c[run]] = True
    return _labels_with_wall_mask(labels, wall, keep_on_wall=False)


def _labels_with_wall_mask(labels: np.ndarray, wall: np.ndarray, *, keep_on_wall: bool
                           ) -> np.ndarray | None:
    """``labels`` with the pixels of ``wall`` (bool [rows, cols]) not claimed by another class
    made myocardium; of the 8-connected myocardium components the largest is kept
    (``keep_on_wall`` False) or every one that touches ``wall`` (True: a drawn band is kept
    even where another class splits it); enclosed unclaimed pixels made LV blood pool. None
    when the ring then does not close."""
    closed = labels.copy()
    closed[wall & (closed == 0)] = MYOCARDIUM
    components, count = ndimage.label(closed == MYOCARDIUM, structure=_EIGHT_CONNECTED)
    if count > 1:
        if keep_on_wall:
            kept = np.zeros(count + 1, dtype=bool)
            kept[np.unique(components[wall & (closed == MYOCARDIUM)])] = True
            kept[0] = False
        else:
            kept = np.zeros(count + 1, dtype=bool)
            kept[1 + int(np.argmax(np.bincount(components.ravel())[1:]))] = True
        closed[(closed == MYOCARDIUM) & ~kept[components]] = 0
    enclosed = ndimage.binary_fill_holes(np.isin(closed, (LV_BLOOD, MYOCARDIUM)))
    closed[enclosed & (closed == 0)] = LV_BLOOD
    return closed if is_closed_ring(closed) else None


def _band_between_rays(rays: _Rays, inner: np.ndarray, outer: np.ndarray, step_px: float,
                       shape: tuple[int, int], *, spacing_px: float = 0.5) -> np.ndarray:
    """bool [rows, cols]: the band between consecutive rays' walls, one connected ring.

    Ray i's wall is its steps [inner[i], outer[i]) (int [rays], the ray's own samples at
    radius step x ``step_px`` from the centre). Between ray i and ray i+1 (circularly) the
    quadrilateral with corners at both rays' first and last wall samples is sampled on sub-rays
    at angles interpolated between the two rays, each from the interpolated inner to the
    interpolated outer radius, with at most ``spacing_px`` between neighbouring samples in
    both directions; each sample's nearest pixel is in the band. Samples closer than 1 px
    round to 8-neighbouring pixels, so the band has no 4-connected gap between rays where
    the walls step (a per-ray drawing can leave one when neighbouring rays' walls do not
    overlap in radius). Samples outside the image are dropped."""
    n_rays = inner.size
    center_r, center_c = float(rays.sample_r[0, 0]), float(rays.sample_c[0, 0])
    angles = np.linspace(0.0, 2.0 * np.pi, n_rays, endpoint=False)
    low_r = inner.astype(np.float64) * step_px
    high_r = np.maximum(outer - 1, inner).astype(np.float64) * step_px
    next_low, next_high = np.roll(low_r, -1), np.roll(high_r, -1)
    d_angle = 2.0 * np.pi / n_rays
    # sub-rays per pair: the radial step of either border and the arc length at the outer
    # radius both at most spacing_px apart
    jump = np.maximum(np.abs(next_low - low_r), np.abs(next_high - high_r))
    arc = np.maximum(high_r, next_high) * d_angle
    n_sub = np.maximum(1, np.ceil(np.maximum(jump, arc) / spacing_px)).astype(int)
    pair = np.repeat(np.arange(n_rays), n_sub)
    fraction = np.arange(pair.size) - np.repeat(np.cumsum(n_sub) - n_sub, n_sub)
    fraction = fraction / n_sub[pair]
    sub_low = low_r[pair] + fraction * (next_low[pair] - low_r[pair])
    sub_high = high_r[pair] + fraction * (next_high[pair] - high_r[pair])
    sub_angle = angles[pair] + fraction * d_angle
    n_samples = int(np.ceil((sub_high - sub_low).max() / spacing_px)) + 1
    radii = sub_low[:, None] + (sub_high - sub_low)[:, None] * np.linspace(0.0, 1.0,
                                                                          n_samples)[None, :]
    pixel_r = np.rint(center_r - radii * np.sin(sub_angle)[:, None]).astype(int)
    pixel_c = np.rint(center_c + radii * np.cos(sub_angle)[:, None]).astype(int)
    inside = (pixel_r >= 0) & (pixel_r < shape[0]) & (pixel_c >= 0) & (pixel_c < shape[1])
    band = np.zeros(shape, dtype=bool)
    band[pixel_r[inside], pixel_c[inside]] = True
    return band


def close_ring_along_rays(labels: np.ndarray, myocardium_probability: np.ndarray, *,
                          n_rays: int = 360, relative_threshold: float = 0.5,
                          min_peak: float = 0.1, step_px: float = 0.5) -> np.ndarray | None:
    """Labels uint8 [rows, cols] whose myocardium closes around the LV blood pool, or None.

    From the LV blood pool's centroid, ``n_rays`` rays (equal angles) sample
    ``myocardium_probability`` (float [rows, cols], 0-1; bilinear, every ``step_px`` pixels)
    beyond the last blood-pool pixel of the ray, to the image edge. On each ray the wall is the
    contiguous run around the ray's probability peak that stays above ``relative_threshold``
    x peak (an adaptive threshold: a faint but clear wall on one side counts as much as a
    strong one on the other). Run pixels not claimed by another class become myocardium; the
    largest 8-connected myocardium component is kept and enclosed unclaimed pixels become LV
    blood pool. None when a ray's peak is below ``min_peak`` (no wall there), a ray reaches
    the edge inside the blood pool, or the ring still does not close.
    """
    labels = np.asarray(labels)
    blood = labels == LV_BLOOD
    if not blood.any():
        return None
    rays = _cast_rays(blood, n_rays, step_px)
    if rays is None:
        return None
    peak_value, low, high = _probability_runs(rays, myocardium_probability, relative_threshold)
    if (peak_value < min_peak).any():
        return None
    run = (rays.steps >= low[:, None]) & (rays.steps < high[:, None])
    return _labels_with_wall(labels, rays, run)


@dataclass(frozen=True)
class RingCompletion:
    """An open ring completed from the image: labels uint8 [rows, cols] (closed ring) and the
    number of rays (of ``n_rays``) whose wall came from the image, not the network."""

    labels: np.ndarray
    completed_rays: int
    n_rays: int


def unmix_blood_and_tissue(series: np.ndarray, blood: np.ndarray, tissue: np.ndarray
                           ) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-pixel amounts of the blood-pool and the myocardial enhancement curve.

    Each pixel's curve of ``series`` (float [time, rows, cols], Gd in mmol/L or signal
    intensity, from the first SR frame; the mean of the first 3 frames taken as its
    pre-contrast baseline) is fitted as alpha x b(t) + beta x m(t) by non-negative least
    squares, where b and m are the mean baseline-subtracted curves of the pixels in ``blood``
    and ``tissue`` (bool [rows, cols]: the image's own LV blood pool and the myocardium the
    network does see). Blood has alpha ~1, beta ~0; myocardium, whose first pass is lower and
    later than the blood's, alpha ~0, beta ~1; lung, air and the zero padding beyond a crop
    ~0, 0. The result is in units of the image's own references, so Gd and signal alike.

    Returns (alpha, beta), float [rows, cols] each, or None when the two reference curves
    cannot be told apart (correlation above 0.995) or either set is empty.
    """
    series = np.asarray(series, dtype=np.float64)
    if not blood.any() or not tissue.any():
        return None
    curves = series - series[: min(3, series.shape[0])].mean(axis=0)
    blood_curve = curves[:, blood].mean(axis=1)
    tissue_curve = curves[:, tissue].mean(axis=1)
    norms = np.array([np.linalg.norm(blood_curve), np.linalg.norm(tissue_curve)])
    if not (norms > 0).all() or abs(blood_curve @ tissue_curve) / norms.prod() > 0.995:
        return None
    pixels = curves.reshape(curves.shape[0], -1)
    basis = np.stack([blood_curve, tissue_curve], axis=1)  # [time, 2]
    alpha, beta = np.linalg.solve(basis.T @ basis, basis.T @ pixels)
    # the non-negative solution: where one amount is negative, the other curve alone
    alpha_only = np.maximum(blood_curve @ pixels / norms[0] ** 2, 0.0)
    beta_only = np.maximum(tissue_curve @ pixels / norms[1] ** 2, 0.0)
    no_blood, no_tissue = alpha < 0, (beta < 0) & (alpha >= 0)
    alpha, beta = (np.where(no_blood, 0.0, np.where(no_tissue, alpha_only, alpha)),
                   np.where(no_blood, beta_only, np.where(no_tissue, 0.0, beta)))
    shape = series.shape[1:]
    return alpha.reshape(shape), beta.reshape(shape)


_INFEASIBLE = 1e9


def _arc_path(unary: np.ndarray, *, smoothness: float, max_jump: int,
              anchors: tuple[float, float], first_states: tuple[float, float],
              last_states: tuple[float, float]) -> np.ndarray | None:
    """Dynamic programming along an arc of rays: the state per ray (int [rays]) minimising
    sum unary[ray, state] + ``smoothness`` x |state change| between neighbouring rays, the
    seen rays on either side included (their states ``anchors``), with changes of at most
    ``max_jump`` inside the arc and the first / last ray's state within the closed ranges
    ``first_states`` / ``last_states``. None when no path satisfies the constraints.
    unary: float [rays, states]. Cost O(rays x states x (2 max_jump + 1))."""
    n_states = unary.shape[1]
    states = np.arange(n_states)
    offsets = np.arange(-max_jump, max_jump + 1)  # from state = to state + offset

    def outside(bounds: tuple[float, float]) -> np.ndarray:
        return _INFEASIBLE * ((states < bounds[0]) | (states > bounds[1]))

    cost = unary[0] + smoothness * np.abs(states - anchors[0]) + outside(first_states)
    padded = np.full(n_states + 2 * max_jump, np.inf)
    back = []
    for ray_unary in unary[1:]:
        padded[max_jump:max_jump + n_states] = cost
        candidates = np.stack([padded[max_jump + offset:max_jump + offset + n_states]
                               + smoothness * abs(int(offset)) for offset in offsets])
        best = np.argmin(candidates, axis=0)
        back.append(states + offsets[best])
        cost = candidates[best, states] + ray_unary
    cost = cost + smoothness * np.abs(states - anchors[1]) + outside(last_states)
    if cost.min() >= _INFEASIBLE / 2:
        return None
    path = [int(np.argmin(cost))]
    for best in reversed(back):
        path.append(int(best[path[-1]]))
    return np.array(path[::-1])


def _missing_arcs(seen: np.ndarray) -> list[tuple[np.ndarray, int, int]]:
    """Contiguous arcs of rays not seen (bool [rays], circular, at least one seen): (ray
    indices, seen ray before, seen ray after)."""
    n_rays = seen.size
    order = (np.arange(n_rays) + int(np.argmax(seen))) % n_rays  # starts on a seen ray
    arcs, index = [], 0
    while index < n_rays:
        if seen[order[index]]:
            index += 1
            continue
        end = index
        while end < n_rays and not seen[order[end]]:
            end += 1
        arcs.append((order[index:end], int(order[index - 1]), int(order[end % n_rays])))
        index = end
    return arcs


def _not_completed(reason: str) -> None:
    logger.info("segmentation: ring not completed from the image: %s", reason)
    return None


def complete_ring_from_image(labels: np.ndarray, myocardium_probability: np.ndarray,
                             series: np.ndarray, *, n_rays: int = 360,
                             relative_threshold: float = 0.5, min_peak: float = 0.1,
                             step_px: float = 0.5, max_missing_fraction: float = 0.5,
                             blood_amount: float = 0.5, tissue_amount: float = 0.35,
                             wall_evidence: float = 0.5, rays_with_evidence: float = 0.9,
                             smoothness: float = 0.5, thickness_prior: float = 2.0,
                             max_jump_steps: int = 2, min_thickness_steps: int = 2,
                             anchor_slack_steps: int = 2, drawing: str = "rays"
                             ) -> RingCompletion | None:
    """Complete an open myocardial ring on the rays where the network sees no wall, from the
    image's own enhancement curves; None when the image does not show a wall there.

    Args:
        labels: uint8 [rows, cols] after the QPerf rule (and ray closing), ring open.
        myocardium_probability: float [rows, cols], 0-1, the network's.
        series: float [time, rows, cols] on the same grid (Gd mmol/L or signal intensity,
            from the first SR frame).

    Rays as in :func:`close_ring_along_rays` (``n_rays`` from the LV blood pool's centroid,
    ``step_px`` pixel steps). A ray is *seen* when its myocardium-probability peak beyond the
    blood pool is at least ``min_peak``; its wall is the network's run there (as in ray
    closing). The other rays (at most ``max_missing_fraction`` of all) form arcs, each filled
    by two dynamic programmes along the arc, anchored at the seen rays on either side
    (within ``anchor_slack_steps`` of their wall) with a cost ``smoothness`` per step of change
    between neighbouring rays and at most ``max_jump_steps`` change:

    1. endocardium: the step where the blood-pool curve ends. Per pixel the curve is unmixed
       (:func:`unmix_blood_and_tissue`) against the LV blood pool (eroded) and the network's
       confident myocardium (label 2 and probability > 0.5); a sample is blood-like when
       alpha >= ``blood_amount``. The border maximises the sum of (blood-like - 0.5) from the
       network's blood-pool edge to it: the pool the network left out is taken back when the
       image shows blood there.
    2. epicardium: the wall thickness t (steps) maximising the sum of (tissue-like - 0.5) over
       the wall plus ``thickness_prior`` x ((t - T) / T)^2, T the median thickness of the seen
       rays' walls (the network's own wall as the prior); tissue-like: beta >=
       ``tissue_amount`` and not blood-like; beyond the image edge nothing is tissue; at least
       ``min_thickness_steps``.

    Evidence criterion (no wall is invented): a completed ray has image evidence when at
    least ``wall_evidence`` of its wall's samples are tissue-like; the completion is kept only
    if at least ``rays_with_evidence`` of the completed rays have evidence and the ring then
    closes. ``drawing`` "rays": each ray's wall pixel by pixel, neighbouring completed rays'
    walls drawn over each other's radial extent, the largest myocardium component kept;
    "band": one band between consecutive rays' walls, seen and completed
    (:func:`_band_between_rays`), so a seen ray whose run lies off its neighbours' (a faint
    network blob at an arc's end) leaves no gap, and every myocardium component on the band
    kept. Closed rings must not be passed (the caller runs this only on an open ring);
    enclosed unclaimed pixels become LV blood pool.
    """
    if drawing not in RING_DRAWINGS:
        raise ValueError(f"unknown ring drawing {drawing!r}; expected one of {RING_DRAWINGS}")
    labels = np.asarray(labels)
    probability = np.asarray(myocardium_probability, dtype=np.float64)
    series = np.asarray(series)
    if series.ndim != 3 or series.shape[1:] != labels.shape:
        raise ValueError(f"expected series [time, {labels.shape[0]}, {labels.shape[1]}], got "
                         f"{series.shape}")
    blood = labels == LV_BLOOD
    if not blood.any() or not (labels == MYOCARDIUM).any():
        return _not_completed("no LV blood pool or no myocardium")
    rays = _cast_rays(blood, n_rays, step_px)
    if rays is None:
        return _not_completed("a ray from the LV centre reaches the image edge inside the LV "
                              "blood pool")
    peak_value, low, high = _probability_runs(rays, probability, relative_threshold)
    seen = peak_value >= min_peak
    if seen.all():
        return _not_completed("the network sees a wall on every ray")
    if seen.sum() < (1.0 - max_missing_fraction) * n_rays:
        return _not_completed(f"the network sees no wall on {int((~seen).sum())} of {n_rays} "
                              f"rays (at most {max_missing_fraction:.0%} are completed)")
    inner_blood = ndimage.binary_erosion(blood)
    amounts = unmix_blood_and_tissue(series, inner_blood if inner_blood.sum() >= 5 else blood,
                                     (labels == MYOCARDIUM) & (probability > 0.5))
    if amounts is None:
        return _not_completed("the blood-pool and myocardial curves cannot be told apart")
    blood_like = amounts[0] >= blood_amount
    tissue_like = (amounts[1] >= tissue_amount) & ~blood_like
    in_range = rays.beyond_blood
    blood_score = np.where(in_range, rays.sample(blood_like), 0.0)
    # only blood contiguous with the network's pool counts: the first sample on a ray that is not
    # blood-like (the septum) ends the LV pool, so an unlabelled RV beyond it is not taken as LV
    # blood (review 2026-11-27: otherwise the septum and the RV became LV blood pool and the RV free
    # wall myocardium, and the ring was flagged closed)
    contiguous = np.minimum.accumulate(np.where(rays.steps >= rays.start[:, None], blood_score >= 0.5, True),
                                       axis=1)
    blood_score = np.where(contiguous, blood_score, 0.0)
    tissue_score = np.where(in_range, rays.sample(tissue_like), 0.0)
    n_steps = in_range.shape[1]
    step = rays.steps
    # cumulative gains: gain[:, s] = sum over steps < s
    blood_gain = np.concatenate([np.zeros((n_rays, 1)),
                                 np.cumsum(np.where(in_range, blood_score - 0.5, 0.0), axis=1)],
                                axis=1)
    tissue_gain = np.concatenate([np.zeros((n_rays, 1)),
                                  np.cumsum(np.where(in_range, tissue_score - 0.5, -0.5),
                                            axis=1)], axis=1)
    endo_cost = -(blood_gain[:, :n_steps] - blood_gain[np.arange(n_rays), rays.start][:, None])
    endo_cost = np.where(in_range, endo_cost, _INFEASIBLE)
    prior = float(np.median((high - low)[seen]))
    thickness = np.arange(1, int(np.ceil(2.0 * prior)) + 2)
    thickness_cost = (thickness_prior * ((thickness - prior) / prior) ** 2
                      + _INFEASIBLE * (thickness < min_thickness_steps))
    endo, wall_end = low.copy(), high.copy()
    for arc, before, after in _missing_arcs(seen):
        arc_endo = _arc_path(endo_cost[arc], smoothness=smoothness, max_jump=max_jump_steps,
                             anchors=(low[before], low[after]),
                             first_states=(low[before] - anchor_slack_steps,
                                           high[before] + anchor_slack_steps),
                             last_states=(low[after] - anchor_slack_steps,
                                          high[after] + anchor_slack_steps))
        if arc_endo is None:
            return _not_completed(f"no endocardium along an arc of {arc.size} rays within "
                                  f"the smoothness limits")
        ends = np.minimum(arc_endo[:, None] + thickness[None, :], n_steps)
        gain = tissue_gain[arc[:, None], ends] - tissue_gain[arc, arc_endo][:, None]
        arc_thickness = _arc_path(-gain + thickness_cost[None, :], smoothness=smoothness,
                                  max_jump=max_jump_steps,
                                  anchors=(high[before] - low[before] - 1,
                                           high[after] - low[after] - 1),
                                  first_states=(0, thickness.size),
                                  last_states=(0, thickness.size))
        if arc_thickness is None:
            return _not_completed(f"no wall along an arc of {arc.size} rays within the "
                                  f"smoothness limits")
        endo[arc] = arc_endo
        wall_end[arc] = arc_endo + thickness[arc_thickness]
    missing = np.flatnonzero(~seen)
    # tissue_score is 0 beyond the image: a wall cut by the image edge counts there as none
    completed_wall = (step >= endo[missing, None]) & (step < wall_end[missing, None])
    evidence = ((tissue_score[missing] * completed_wall).sum(axis=1)
                / completed_wall.sum(axis=1))
    with_evidence = float(np.mean(evidence >= wall_evidence))
    if with_evidence < rays_with_evidence:
        return _not_completed(f"{missing.size} of {n_rays} rays without a wall seen by the "
                              f"network, {with_evidence:.0%} of them with image evidence of a "
                              f"wall ({rays_with_evidence:.0%} needed)")
    if drawing == "band":
        band = _band_between_rays(rays, endo, wall_end, step_px, labels.shape)
        closed = _labels_with_wall_mask(labels, band, keep_on_wall=True)
    else:
        # draw each completed ray over its neighbours' radial extent: no gap at a step
        lower = np.where(seen, endo, np.minimum(endo, np.minimum(np.roll(endo, 1),
                                                                np.roll(endo, -1))))
        upper = np.where(seen, wall_end, np.maximum(wall_end,
                                                    np.maximum(np.roll(wall_end, 1),
                                                               np.roll(wall_end, -1))))
        run = (step >= lower[:, None]) & (step < upper[:, None])
        closed = _labels_with_wall(labels, rays, run)
    if closed is None:
        return _not_completed(f"the ring completed on {missing.size} of {n_rays} rays does not "
                              f"close")
    return RingCompletion(labels=closed, completed_rays=int(missing.size), n_rays=int(n_rays))


def postprocess(probabilities: np.ndarray, *, close_ring: bool = False,
                ring_relative_threshold: float = 0.5,
                ring_min_peak: float = 0.1, complete_ring: bool = False,
                series: np.ndarray | None = None, ring_drawing: str = "rays") -> PostProcessed:
    """Clean label map from class probabilities float [classes, rows, cols] (classes 0-3).

    Each foreground class keeps one connected component; holes inside the myocardial ring that
    no class claims are given to the LV blood pool. ``close_ring``: an open ring is closed by
    :func:`close_ring_along_rays` (with ``ring_relative_threshold``, ``ring_min_peak``) when
    that succeeds; ``complete_ring`` with ``series`` (float [time, rows, cols] on the same
    grid): a ring still open is then completed from the image by
    :func:`complete_ring_from_image` when the image shows a wall where the network sees none
    (``completed_rays`` says on how many rays), its wall drawn as ``ring_drawing`` (one of
    :data:`RING_DRAWINGS`). Closed rings are never changed.
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
    closed_ring = is_closed_ring(labels)
    if close_ring and not closed_ring and (labels == MYOCARDIUM).any():
        closed = close_ring_along_rays(labels, probabilities[MYOCARDIUM], n_rays=RING_RAYS,
                                       relative_threshold=ring_relative_threshold,
                                       min_peak=ring_min_peak)
        if closed is not None:
            logger.info("segmentation: open myocardial ring closed along rays")
            labels, closed_ring = closed, True
    completed_rays = 0
    if (complete_ring and series is not None and not closed_ring
            and (labels == MYOCARDIUM).any()):
        completion = complete_ring_from_image(labels, probabilities[MYOCARDIUM], series,
                                              n_rays=RING_RAYS,
                                              relative_threshold=ring_relative_threshold,
                                              min_peak=ring_min_peak,
                                              drawing=ring_drawing)
        if completion is not None:
            logger.info("segmentation: open myocardial ring completed from the image on %d of "
                        "%d rays", completion.completed_rays, completion.n_rays)
            labels, closed_ring = completion.labels, True
            completed_rays = completion.completed_rays
    result = PostProcessed(labels=labels, thresholds=thresholds, missing=tuple(missing),
                           closed_ring=closed_ring, completed_rays=completed_rays)
    if missing:
        logger.info("segmentation: not found: %s", ", ".join(missing))
    return result


# colours of the contours on the Gd images (the usual CMR viewer convention: LV endocardium
# red, LV epicardium green, RV yellow); the MBF maps keep the report's white borders
ENDO_RGB: tuple[float, float, float] = (1.0, 0.0, 0.0)
EPI_RGB: tuple[float, float, float] = (0.0, 1.0, 0.0)
RV_RGB: tuple[float, float, float] = (1.0, 1.0, 0.0)


def mask_outline_xy(mask: np.ndarray) -> np.ndarray:
    """Closed outline float64 [points, 2] (x = column, y = row, pixels) of the largest part of
    a bool mask [rows, cols]: the 0.5 iso-line of the mask (marching squares, ``contourpy``),
    half-way between member and non-member pixel centres; first point = last point.
    Raises ValueError for an empty mask."""
    import contourpy

    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2 or not mask.any():
        raise ValueError(f"expected a non-empty mask [rows, cols], got shape {mask.shape} with "
                         f"{int(mask.sum())} pixels")
    padded = np.pad(mask, 1).astype(np.float64)  # zero border: every outline closes
    lines = contourpy.contour_generator(z=padded, line_type=contourpy.LineType.Separate).lines(0.5)
    longest = max(lines, key=len)
    return np.asarray(longest, dtype=np.float64) - 1.0


def segmentation_contours(labels: np.ndarray, lv_center_rc: tuple[float, float], *,
                          step_deg: float = 3.0, thickness: float = 1.0) -> list:
    """Endo, epi and RV contours of a label map (docs/conventions.md labels) for image meta.

    Endo and epi are the report's radial borders (``perfline.toolbox.sector_contours.
    border_contours``: rays every ``step_deg`` from ``lv_center_rc`` (row, col); first / last
    myocardial pixel), so the Gd images and the MBF maps carry the same borders; RV is the
    outline of the RV blood pool (:func:`mask_outline_xy`). Contours labelled "endo", "epi",
    "rv", points (x = column, y = row) in pixels of ``labels``' grid, closed.

    Returns :class:`perfline.toolbox.sector_contours.Contour` objects; a class that is missing
    is left out. Raises ``ContourError`` when the myocardium gives no endo/epi border.
    """
    from perfline.toolbox.sector_contours import Contour, border_contours

    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"expected labels [rows, cols], got shape {labels.shape}")
    colours = {"endo": ENDO_RGB, "epi": EPI_RGB}
    contours = [Contour(c.label, c.points_xy, colours[c.label], thickness)
                for c in border_contours(labels == MYOCARDIUM, lv_center_rc, step_deg=step_deg,
                                         thickness=thickness)]
    if (labels == RV_BLOOD).any():
        contours.append(Contour("rv", mask_outline_xy(labels == RV_BLOOD), RV_RGB, thickness))
    return contours
