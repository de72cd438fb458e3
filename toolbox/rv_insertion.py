"""Anterior RV insertion direction from a label map (Xue et al. 2020; REFERENCES.md §6).

The paper takes, from the RV mask and the LV centre, the extreme RV pixel by angle. Here the
angles of all RV pixels about the LV centre form a circular arc; the largest empty angular gap
separates its two ends. Following docs/conventions.md, the anterior insertion is the end from
which the arc runs counter-clockwise (as displayed) across the septum to the inferior
insertion, i.e. the first RV angle after the gap going counter-clockwise.
Angles: degrees in [0, 360), ``atan2(-(r - r0), c - c0)``.

The RV is the largest **4-connected** component of label 3, the simulator's definition of its
truth (``simulator/anatomy.py`` keeps that component of the rendered RV); a CNN mask kept as one
8-connected component can carry a diagonal one-pixel chain along the LV epicardium that moves
the arc's end by 10-20 degrees (docs/report.md, "RV insertion").

For the report (``place_insertions``) the slices of one scan are placed together: each slice's
own anterior insertion (arc end, moved ``tip_correction_deg`` clockwise because a segmentation of
the blurred, motion-corrected series stops short of the thin RV wedge) is checked against what
the other slices predict (basal and mid share the insertion; the apical arc shares the mid-
direction of the basal / mid arcs and is ``apical_width_ratio`` as wide). A slice that disagrees
with the consistent majority, or whose RV was not found, takes the others' prediction; basal
and mid slices that disagree with no slice to decide take their weighted mean. Every such
slice is flagged.

``drop_rv_extension`` and ``extend_rv_tip`` need the slice's Gd series, so they run where the
series is, right after the CNN (``gadgets/segmentation.py``). The first (in the chain) removes RV
pixels that do not enhance like RV blood when they carry the anterior end more than 15 degrees
along a band of other tissue (fresh study 2**30 + 107: 21-41 degrees). The second grows the RV's
ends along the epicardium into the thin, blurred RV wedge the CNN leaves out (dev studies
2**30 + 201, + 228: 9-14 degrees short), after which the tip correction was 1.5 instead of 2
degrees (docs/integration.md, "Sector placement (session 6)": two decision runs), and 0.8 since
session 23 ("Session 23, second decision").
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from perfline.toolbox.aha import pixel_angles_deg

LV_BLOOD, MYOCARDIUM, RV_BLOOD = 1, 2, 3


class InsertionNotFoundError(ValueError):
    """The label map lacks the LV or the RV needed for the RV insertion."""


def lv_center_rc(labels: np.ndarray) -> tuple[float, float]:
    """Centroid (row, col), pixels, of the LV blood pool; of the myocardium if no blood pool."""
    labels = np.asarray(labels)
    for label in (LV_BLOOD, MYOCARDIUM):
        rows, cols = np.nonzero(labels == label)
        if rows.size:
            return float(rows.mean()), float(cols.mean())
    raise InsertionNotFoundError("no LV blood pool or myocardium (labels 1, 2) in the label map")


def largest_component(mask: np.ndarray) -> np.ndarray:
    """bool [rows, cols]: the largest 4-connected component of ``mask`` (ties: the first in
    row-major order); ``mask`` itself when it has at most one component."""
    mask = np.asarray(mask, dtype=bool)
    parts, count = ndimage.label(mask)
    if count <= 1:
        return mask
    return parts == 1 + int(np.argmax(np.bincount(parts.ravel())[1:]))


def lv_equivalent_radius_mm(labels: np.ndarray, pixel_spacing_mm: tuple[float, float]) -> float | None:
    """Radius (mm) of a disc with the area of the LV blood pool (label 1) of ``labels`` [rows, cols]
    on a grid of ``pixel_spacing_mm`` (row, col); None when there is no LV pixel."""
    area_mm2 = float(np.count_nonzero(np.asarray(labels) == LV_BLOOD)) * pixel_spacing_mm[0] * pixel_spacing_mm[1]
    return math.sqrt(area_mm2 / math.pi) if area_mm2 > 0 else None


def main_rv_mask(labels: np.ndarray) -> np.ndarray:
    """bool [rows, cols]: the largest 4-connected component of the RV blood pool (label 3).

    Ties go to the component found first in row-major order. All false when there is no RV.
    """
    return largest_component(np.asarray(labels) == RV_BLOOD)


@dataclass(frozen=True)
class RvArc:
    """The RV blood pool seen from the LV centre: its anterior and inferior ends, degrees [0, 360).

    The arc runs counter-clockwise (as displayed) from ``anterior_deg`` to ``inferior_deg``.
    """

    anterior_deg: float
    inferior_deg: float
    n_pixels: int

    @property
    def width_deg(self) -> float:
        """Angular width of the arc, degrees [0, 360)."""
        return (self.inferior_deg - self.anterior_deg) % 360.0

    @property
    def mid_deg(self) -> float:
        """Direction of the arc's middle (the RV direction), degrees [0, 360)."""
        return (self.anterior_deg + self.width_deg / 2.0) % 360.0


def rv_arc(labels: np.ndarray, center_rc: tuple[float, float] | None = None) -> RvArc:
    """Arc of the main RV component (:func:`main_rv_mask`) about the LV centre.

    Args:
        labels: uint8 [rows, cols] label map (3 = RV blood pool).
        center_rc: LV centre (row, col) in pixels; the LV blood-pool centroid if None.

    Raises:
        InsertionNotFoundError: no RV (or, with ``center_rc`` None, no LV) in the labels.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"expected labels [rows, cols], got shape {labels.shape}")
    rv = main_rv_mask(labels)
    if not rv.any():
        raise InsertionNotFoundError("no RV blood pool (label 3) in the label map")
    center = lv_center_rc(labels) if center_rc is None else center_rc
    angles = np.sort(pixel_angles_deg(labels.shape, center)[rv])
    gaps = np.diff(np.concatenate([angles, angles[:1] + 360.0]))
    widest = int(np.argmax(gaps))
    anterior = angles[(widest + 1) % angles.size]
    inferior = angles[widest]
    return RvArc(anterior_deg=float(anterior % 360.0), inferior_deg=float(inferior % 360.0),
                 n_pixels=int(rv.sum()))


def rv_arc_deg(labels: np.ndarray, center_rc: tuple[float, float] | None = None
               ) -> tuple[float, float]:
    """(anterior, inferior) ends of the RV arc seen from the LV centre, degrees in [0, 360).

    Args:
        labels: uint8 [rows, cols] label map (3 = RV blood pool).
        center_rc: LV centre (row, col) in pixels; the LV blood-pool centroid if None.
    """
    arc = rv_arc(labels, center_rc)
    return arc.anterior_deg, arc.inferior_deg


def rv_insertion_deg(labels: np.ndarray, center_rc: tuple[float, float] | None = None) -> float:
    """Anterior RV insertion direction, degrees in [0, 360) (docs/conventions.md)."""
    return rv_arc(labels, center_rc).anterior_deg


# ----------------------------------------------------------------------------- placement
def angle_difference_deg(a: float | np.ndarray, b: float | np.ndarray) -> float | np.ndarray:
    """Signed smallest difference a - b, degrees in [-180, 180) (elementwise for arrays)."""
    return (a - b + 180.0) % 360.0 - 180.0


def circular_mean_deg(angles: Sequence[float], weights: Sequence[float] | None = None) -> float:
    """Weighted circular mean, degrees [0, 360)."""
    radians = np.radians(np.asarray(angles, dtype=np.float64))
    w = np.ones(radians.size) if weights is None else np.asarray(weights, dtype=np.float64)
    return float(np.degrees(math.atan2(float(np.dot(w, np.sin(radians))), float(np.dot(w, np.cos(radians))))) % 360.0)


@dataclass(frozen=True)
class PlacementSettings:
    """Parameters of :func:`place_insertions` (set on simulated studies, docs/report.md).

    Attributes:
        tip_correction_deg: the own anterior insertion is the arc's anterior end moved this far
            clockwise (the segmentation stops short of the thin RV wedge at the insertion): 0.8
            since session 23 (the median placed error over 3600 held-out simulated slices was
            -0.73 deg with 1.5; decided on 600 new ones, docs/integration.md "Session 23, second
            decision"); 1.5 from session 6 (labels whose RV went through ``extend_rv_tip``, 348
            slices), 2 before it (docs/integration.md, "Sector placement (session 6)").
        max_basal_mid_deg: largest disagreement between two basal / mid slices' insertions that
            still counts as agreement (the phantom's truth: SD 2.3, at most 6 degrees).
        apical_tie_deg: when basal / mid slices disagree, an apical slice decides for the one
            whose insertion lies within this of its prediction, if the other's does not.
        max_apical_deg: an apical slice whose insertion lies farther than this from the
            prediction of the basal / mid slices takes that prediction (the phantom's truth
            alone scatters with SD 6.5, up to 22 degrees, around the prediction).
        apical_width_ratio: apical RV arc width / basal or mid arc width (phantom: 0.63 +/- 0.06).
    """

    tip_correction_deg: float = 0.8
    max_basal_mid_deg: float = 10.0
    apical_tie_deg: float = 15.0
    max_apical_deg: float = 30.0
    apical_width_ratio: float = 0.63


@dataclass(frozen=True)
class SliceRv:
    """What one slice offers for the placement: its RV arc (None: no RV), or only an insertion
    angle from upstream (``given_deg``, used when there is no arc); and its level."""

    level: str
    arc: RvArc | None = None
    given_deg: float = math.nan


@dataclass(frozen=True)
class PlacedInsertion:
    """Anterior RV insertion of one slice after the cross-slice check.

    ``own_deg`` is the slice's own estimate (NaN when it has none), ``insertion_deg`` the one
    used (NaN when no slice offers one), ``source`` one of "own", "other slices",
    "mean of slices", "none"; ``flag`` says why it is not the slice's own.
    """

    insertion_deg: float
    own_deg: float
    source: str
    flag: str | None = None


def _own_insertion(item: SliceRv, settings: PlacementSettings) -> float:
    if item.arc is not None:
        return (item.arc.anterior_deg - settings.tip_correction_deg) % 360.0
    return float(item.given_deg) if math.isfinite(item.given_deg) else math.nan


def _apical_to_basal(item: SliceRv, own: float, settings: PlacementSettings) -> float:
    """Basal / mid insertion predicted from an apical slice (same arc middle, wider arc)."""
    assert item.arc is not None
    offset = angle_difference_deg(own, item.arc.anterior_deg)  # keeps the tip correction
    return (item.arc.mid_deg - item.arc.width_deg / (2.0 * settings.apical_width_ratio) + offset) % 360.0


def _basal_to_apical(item: SliceRv, own: float, settings: PlacementSettings) -> float:
    """Apical insertion predicted from a basal / mid slice (same arc middle, narrower arc)."""
    assert item.arc is not None
    offset = angle_difference_deg(own, item.arc.anterior_deg)
    return (item.arc.mid_deg - settings.apical_width_ratio * item.arc.width_deg / 2.0 + offset) % 360.0


def _agreeing_groups(indices: list[int], own: list[float], tolerance: float) -> list[tuple[int, ...]]:
    """The largest subsets of ``indices`` whose insertions agree pairwise within ``tolerance``."""
    for size in range(len(indices), 0, -1):
        groups = [group for group in itertools.combinations(indices, size)
                  if all(abs(angle_difference_deg(own[i], own[j])) <= tolerance
                         for i, j in itertools.combinations(group, 2))]
        if groups:
            return groups
    return []


def place_insertions(slices: Sequence[SliceRv], settings: PlacementSettings | None = None
                     ) -> list[PlacedInsertion]:
    """Anterior RV insertion of every slice of one scan, checked across its slices.

    Basal and mid slices share the insertion (the phantom's truth: SD 2.3 degrees between
    them). Among them the largest group agreeing pairwise within ``max_basal_mid_deg`` keeps
    its own values; the others take the group's circular mean. When groups tie (two slices
    that disagree), an apical slice decides: its prediction of the basal / mid insertion (its arc
    middle minus half its width / ``apical_width_ratio``) within ``apical_tie_deg`` of exactly one
    group; otherwise every tied slice takes the mean of the tied slices. An apical slice keeps
    its own insertion unless it lies more than ``max_apical_deg`` from the prediction of the
    basal / mid slices (their arc middle minus ``apical_width_ratio`` times half their width).
    A slice without an RV takes the prediction of the others. Every replaced value is flagged.

    Args:
        slices: one entry per slice of the scan, any order; ``level`` "basal", "mid" or "apical".
        settings: tolerances and corrections (defaults: :class:`PlacementSettings`).

    Returns:
        One :class:`PlacedInsertion` per input slice, in input order.
    """
    settings = settings or PlacementSettings()
    own = [_own_insertion(item, settings) for item in slices]
    apical = [i for i, item in enumerate(slices) if item.level == "apical" and math.isfinite(own[i])]
    basal_mid = [i for i, item in enumerate(slices) if item.level != "apical" and math.isfinite(own[i])]
    value: dict[int, float] = {}
    flags: dict[int, str] = {}
    sources: dict[int, str] = {}

    # basal / mid: the largest agreeing group, an apical slice breaking ties
    groups = _agreeing_groups(basal_mid, own, settings.max_basal_mid_deg)
    apical_votes = [_apical_to_basal(slices[i], own[i], settings) for i in apical if slices[i].arc is not None]
    if len(groups) > 1 and apical_votes:
        vote = circular_mean_deg(apical_votes)
        near = [g for g in groups
                if abs(angle_difference_deg(circular_mean_deg([own[i] for i in g]), vote)) <= settings.apical_tie_deg]
        if len(near) == 1:
            groups = near
    kept = set.intersection(*(set(g) for g in groups)) if groups else set()
    for i in basal_mid:
        if i in kept:
            value[i], sources[i] = own[i], "own"
        elif len(groups) == 1:
            value[i] = circular_mean_deg([own[j] for j in groups[0]])
            sources[i] = "other slices"
            flags[i] = (f"RV insertion {own[i]:.0f} deg disagrees with the other basal / mid slice(s): "
                        f"{value[i]:.0f} deg from them is used")
        else:
            tied = sorted(set.union(*(set(g) for g in groups)))
            value[i] = circular_mean_deg([own[j] for j in tied])
            sources[i] = "mean of slices"
            flags[i] = (f"RV insertion {own[i]:.0f} deg disagrees with another basal / mid slice and no slice "
                        f"decides: their mean {value[i]:.0f} deg is used")
    consensus = [i for i in basal_mid if sources.get(i) == "own"] or basal_mid

    # apical: kept unless far from what the basal / mid arcs predict
    apical_predictions = [_basal_to_apical(slices[i], own[i], settings) for i in consensus
                          if slices[i].arc is not None]
    apical_prediction = circular_mean_deg(apical_predictions) if apical_predictions else math.nan
    for i in apical:
        if math.isfinite(apical_prediction) and \
                abs(angle_difference_deg(own[i], apical_prediction)) > settings.max_apical_deg:
            value[i], sources[i] = apical_prediction, "other slices"
            flags[i] = (f"RV insertion {own[i]:.0f} deg is more than {settings.max_apical_deg:g} deg from the "
                        f"{apical_prediction:.0f} deg the basal / mid slices predict: that is used")
        else:
            value[i], sources[i] = own[i], "own"

    # slices without an RV
    basal_mid_values = [value[i] for i in basal_mid]
    for i, item in enumerate(slices):
        if i in value:
            continue
        if item.level == "apical":
            fill = apical_prediction if math.isfinite(apical_prediction) else \
                (circular_mean_deg([value[j] for j in apical]) if apical else math.nan)
        elif basal_mid_values:
            fill = circular_mean_deg(basal_mid_values)
        else:
            fill = circular_mean_deg(apical_votes) if apical_votes else math.nan
        if math.isfinite(fill):
            value[i], sources[i] = fill, "other slices"
            flags[i] = f"RV not found: insertion {fill:.0f} deg from the other slices"
        else:
            value[i], sources[i] = math.nan, "none"
    return [PlacedInsertion(value[i], own[i], sources[i], flags.get(i)) for i in range(len(slices))]


# ------------------------------------------------------------------------ RV mask check
FOUR_CONNECTED = ndimage.generate_binary_structure(2, 1)
EIGHT_CONNECTED = ndimage.generate_binary_structure(2, 2)


@dataclass(frozen=True)
class RvFirstPass:
    """The first pass of the main RV component in a slice's series.

    ``rv`` is the main RV component, ``core`` the part used as reference (the component eroded by
    2 pixels, or 1, or all of it when too small), ``peak_fraction`` float [rows, cols]: every
    pixel's mean enhancement over the 5 frames around the core's peak / the core's (its median
    curve's) mean enhancement there. Enhancement = value - median of the first frames.
    """

    rv: np.ndarray
    core: np.ndarray
    peak_fraction: np.ndarray


def rv_first_pass(labels: np.ndarray, series: np.ndarray, *, baseline_frames: int = 3) -> RvFirstPass | None:
    """:class:`RvFirstPass` of ``labels`` [rows, cols] in ``series`` [time, rows, cols] (Gd, mmol/L, or
    signal); None when there is no RV, too few frames, or the core does not enhance."""
    series = np.asarray(series)
    labels = np.asarray(labels)
    if series.ndim != 3 or series.shape[1:] != labels.shape:
        raise ValueError(f"expected series [time, {labels.shape[0]}, {labels.shape[1]}], got {series.shape}")
    rv = main_rv_mask(labels)
    if not rv.any() or series.shape[0] <= baseline_frames:
        return None
    core = rv
    for iterations in (2, 1):
        eroded = ndimage.binary_erosion(rv, iterations=iterations)
        if eroded.sum() >= 3:
            core = eroded
            break
    core_curves = series[:, core].astype(np.float64)
    baseline = baseline_window(np.median(core_curves, axis=1), baseline_frames)
    reference = np.median(core_curves - np.median(core_curves[baseline], axis=0), axis=1)
    peak = int(np.argmax(reference))
    window = slice(max(peak - 2, 0), peak + 3)
    reference_peak = float(reference[window].mean())
    if not reference_peak > 0:
        return None
    enhancement = series[window].mean(axis=0, dtype=np.float64) - np.median(series[baseline], axis=0)
    return RvFirstPass(rv=rv, core=core, peak_fraction=enhancement / reference_peak)


def baseline_window(curve: np.ndarray, n_frames: int, *, tolerance: float = 0.1) -> slice:
    """The frames whose values are the RV's baseline: the first ``n_frames``, unless the RV's
    bolus has already arrived there.

    The RV blood enhances 2-7 s before the LV; when the contrast reaches the RV within the first
    seconds of the series (held-out rest 2**30+2067: RV foot 2.5 s, the series' first frame 3.5 s,
    the RV core at the Gd table's ceiling in its first 6 frames), the first frames are its first
    pass and an enhancement measured from them is negative. Then the ``n_frames`` consecutive
    frames with the lowest mean of ``curve`` are taken (the trough after the first pass; the RV
    blood never returns below its pre-contrast level). The first frames are kept whenever their
    mean lies within ``tolerance`` of the curve's range above that lowest window.

    Args:
        curve: float [time], the RV core's median curve (Gd or signal).
        n_frames: baseline length (frames).
    """
    curve = np.asarray(curve, dtype=np.float64)
    n_frames = max(1, min(int(n_frames), curve.size))
    means = np.convolve(curve, np.ones(n_frames) / n_frames, mode="valid")  # means[i]: frames i .. i + n - 1
    lowest = int(np.argmin(means))
    spread = float(curve.max() - curve.min())
    if means[0] <= means[lowest] + tolerance * spread:
        return slice(0, n_frames)
    return slice(lowest, lowest + n_frames)


def enhancing_rv_mask(labels: np.ndarray, series: np.ndarray, *, min_peak_fraction: float = 0.25,
                      baseline_frames: int = 3, first_pass: RvFirstPass | None = None) -> np.ndarray:
    """bool [rows, cols]: the main RV component without the pixels that do not enhance like RV blood.

    The RV blood pool's first pass is the earliest and one of the highest enhancements of the
    slice; tissue the segmentation merged into the RV (a bright band of fat or vessel along the
    LV epicardium) reaches a small fraction of it. Reference: :func:`rv_first_pass` (the median
    curve of the RV core); a pixel stays when its mean enhancement over the 5 frames around the
    core's peak is at least ``min_peak_fraction`` of the core's. The core always stays; the
    largest 4-connected component of what stays is returned.

    Args:
        labels: uint8 [rows, cols] (3 = RV blood pool).
        series: float [time, rows, cols] Gd (mmol/L) or signal of the same slice.
        min_peak_fraction: the fraction of the core's enhancement a pixel must reach.
        baseline_frames: the first frames, whose per-pixel median is the pre-contrast baseline.
        first_pass: :func:`rv_first_pass` of these labels and series when already computed.
    """
    first_pass = first_pass or rv_first_pass(labels, series, baseline_frames=baseline_frames)
    if first_pass is None:
        return main_rv_mask(labels)
    keep = first_pass.rv & (first_pass.peak_fraction >= min_peak_fraction)
    keep |= first_pass.core
    return largest_component(keep)


def extend_rv_tip(labels: np.ndarray, series: np.ndarray, center_rc: tuple[float, float], *,
                  min_peak_fraction: float = 0.15, max_steps: int = 6, baseline_frames: int = 3,
                  first_pass: RvFirstPass | None = None) -> tuple[np.ndarray, int]:
    """Labels with the main RV grown along the LV epicardium into pixels that enhance with the RV.

    At each insertion the RV ends in a wedge along the epicardium that thins to one pixel; the
    simulator's truth (RV blood fraction >= 0.5) keeps that wedge, but in the reconstructed,
    motion-corrected series it is blurred to 10-30 % of the RV core's first-pass enhancement,
    and the CNN labels it background or outer myocardium: its RV stops up to 14 degrees short
    of the insertion (more than 5 degrees on about 4 % of the dev slices; docs/integration.md,
    "Sector placement (session 6)"). Candidates are the
    epicardial band: the outermost myocardium (label 2 pixels 4-adjacent to a pixel that is
    neither myocardium nor LV blood) beyond the ends of the RV's arc about the LV centre (the
    myocardium along the septal contact stays myocardium) and background pixels 8-adjacent to
    the myocardium. A
    candidate whose mean enhancement over the 5 frames around the RV core's peak
    (:func:`rv_first_pass`) reaches ``min_peak_fraction`` of the core's joins the RV when it is
    4-connected to it through such candidates, at most ``max_steps`` pixels from it. The LV
    blood pool never changes; myocardial pixels that join become RV (label 3).

    Args:
        labels: uint8 [rows, cols] (1 LV blood, 2 myocardium, 3 RV blood).
        series: float [time, rows, cols] Gd (mmol/L) of the same slice.
        center_rc: LV centre (row, col), pixels.
        min_peak_fraction: fraction of the core's peak enhancement a candidate must reach.
        max_steps: largest 4-connected distance (pixels) a joined pixel may lie from the RV.
        baseline_frames: first frames whose per-pixel median is the pre-contrast baseline.
        first_pass: :func:`rv_first_pass` of these labels and series when already computed.

    Returns:
        (labels, added): the labels with the grown RV (a copy; the input when nothing joins)
        and the number of pixels that joined.
    """
    labels = np.asarray(labels)
    first_pass = first_pass or rv_first_pass(labels, series, baseline_frames=baseline_frames)
    if first_pass is None:
        return labels, 0
    myocardium = labels == MYOCARDIUM
    outside = ~myocardium & (labels != LV_BLOOD)
    outer_myocardium = myocardium & ndimage.binary_dilation(outside, structure=FOUR_CONNECTED)
    next_to_myocardium = (labels == 0) & ndimage.binary_dilation(myocardium, structure=EIGHT_CONNECTED)
    arc = rv_arc(labels, center_rc)
    beyond_arc = (pixel_angles_deg(labels.shape, center_rc) - arc.anterior_deg) % 360.0 > arc.width_deg
    candidates = ((outer_myocardium & beyond_arc) | next_to_myocardium) & (first_pass.peak_fraction >= min_peak_fraction)
    grown = first_pass.rv.copy()
    for _ in range(max_steps):
        joining = ndimage.binary_dilation(grown, structure=FOUR_CONNECTED) & candidates & ~grown
        if not joining.any():
            break
        grown |= joining
    added = grown & ~first_pass.rv
    if not added.any():
        return labels, 0
    result = labels.copy()
    result[added] = RV_BLOOD
    return result, int(added.sum())


def refine_rv_mask(labels: np.ndarray, series: np.ndarray, center_rc: tuple[float, float]
                   ) -> tuple[np.ndarray, float, int]:
    """The chain's RV check on a Gd slice: :func:`drop_rv_extension`, then :func:`extend_rv_tip`
    only when nothing was trimmed (growing at 15 % of the RV core's enhancement right after a
    trim at 25 % would put part of a trimmed, weakly enhancing band back).

    Args:
        labels: uint8 [rows, cols]; series: float [time, rows, cols] Gd (mmol/L) of the slice;
        center_rc: LV centre (row, col), pixels.

    Returns:
        (labels, trimmed_deg, added_px): the refined labels, the trim's shift of the anterior
        end (degrees, 0 when not trimmed) and the number of pixels the tip growth added.
    """
    labels = np.asarray(labels)
    first_pass = rv_first_pass(labels, series) if (labels == RV_BLOOD).any() else None
    labels, shift = drop_rv_extension(labels, series, center_rc, first_pass=first_pass)
    if shift:
        return labels, shift, 0
    labels, added = extend_rv_tip(labels, series, center_rc, first_pass=first_pass)  # labels unchanged
    return labels, 0.0, added


def drop_rv_extension(labels: np.ndarray, series: np.ndarray, center_rc: tuple[float, float], *,
                      min_shift_deg: float = 15.0, min_peak_fraction: float = 0.25,
                      first_pass: RvFirstPass | None = None) -> tuple[np.ndarray, float]:
    """Labels without a non-enhancing RV extension that moves the anterior insertion.

    When the anterior end of :func:`enhancing_rv_mask`'s arc lies more than ``min_shift_deg``
    counter-clockwise of the main component's (the segmentation's RV runs on along a band that
    does not enhance like RV blood), the RV pixels outside the enhancing mask become background.
    Otherwise the labels are returned unchanged: the pruning also trims the thin, partial-volume
    RV wedge of a correct mask by up to about 12 degrees (simulated studies, docs/report.md).

    Args:
        labels: uint8 [rows, cols]; series: float [time, rows, cols] of the same slice;
        center_rc: LV centre (row, col), pixels; first_pass: :func:`rv_first_pass` of these labels
        and series when already computed.

    Returns:
        (labels, shift_deg): the (possibly) corrected labels and how far the anterior end moved
        counter-clockwise (0 when unchanged).
    """
    labels = np.asarray(labels)
    if not (labels == RV_BLOOD).any():
        return labels, 0.0
    enhancing = enhancing_rv_mask(labels, series, min_peak_fraction=min_peak_fraction, first_pass=first_pass)
    before = rv_arc(labels, center_rc)
    pruned = np.where((labels == RV_BLOOD) & ~enhancing, 0, labels).astype(labels.dtype)
    shift = angle_difference_deg(rv_arc(pruned, center_rc).anterior_deg, before.anterior_deg)
    if shift <= min_shift_deg:
        return labels, 0.0
    return pruned, float(shift)
