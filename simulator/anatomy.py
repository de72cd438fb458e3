"""Short-axis anatomy of the phantom: random parameters and their rendering on a pixel grid.

Coordinates: millimetres about the image centre, x to increasing column, y up (decreasing
row), so the image angle of a point is ``atan2(y, x)`` as in docs/conventions.md. The heart
has its own frame: ``u`` points from the LV centre towards the RV, ``v`` towards the
anterior wall (``u`` rotated 90 degrees clockwise as displayed).

Each tissue is rendered as a fraction map (partial volume from a one-pixel linear ramp across
every boundary); the fractions of a pixel sum to at most 1 (the rest is air). Labels are
the 0.5 iso-contours: 1 LV blood pool (papillary muscles and trabeculation included, as in
manual contours), 2 LV myocardium, 3 RV blood pool, 0 everything else (RV free wall, fat,
other organs).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from perfline.toolbox.rv_insertion import main_rv_mask
from perfline.toolbox.rv_insertion import rv_insertion_deg as _rv_insertion_from_labels

# tissue classes with their own signal curve; "myocardium" is the LV wall with per-pixel MBF
TISSUE_CLASSES: tuple[str, ...] = (
    "lv_blood", "myocardium", "rv_blood", "rv_wall", "papillary", "epicardial_fat", "aorta",
    "pulmonary_vessels", "lung", "liver", "marrow", "muscle", "subcutaneous_fat", "spleen",
)
LEVEL_POSITION = {"basal": 0.0, "mid": 0.5, "apical": 1.0}


@dataclass(frozen=True)
class HeartShape:
    """LV and RV geometry of one study at mid-ventricular level (mm, degrees)."""

    lv_center_xy_mm: tuple[float, float]
    rv_direction_deg: float          # image angle of the LV-centre -> RV direction
    endo_radius_mm: float
    wall_thickness_mm: float
    endo_ellipticity: float          # relative amplitude of the cos(2 theta) term
    endo_ellipse_phase_deg: float
    endo_harmonics: tuple[tuple[float, float], ...]   # (relative amplitude, phase deg) for k = 3, 4
    thickness_variation: float       # relative amplitude of cos(theta - phase)
    thickness_phase_deg: float
    rv_gap_mm: float                 # RV cavity width along u beyond the septum, mid level
    rv_u_fraction: float             # RV inner semi-axis along u / (epi radius + gap)
    rv_v_ratio: float                # RV inner semi-axis along v / epi radius
    rv_v_offset_mm: float            # RV centre shift along v (anterior positive)
    rv_wall_mm: float
    papillary_radius_mm: float
    papillary_angles_deg: tuple[float, float]   # heart-frame angles (RV at 0, anterior at 90)
    trabeculation: float             # fraction of myocardial tissue in the trabecular band
    trabeculation_frequency: int
    trabeculation_phase_deg: float
    epicardial_fat_mm: float
    epicardial_fat_phase_deg: float
    apical_scale: float              # LV radii at the apical level / mid level
    basal_scale: float


@dataclass(frozen=True)
class BodyShape:
    """Thorax and the organs around the heart (mm, degrees)."""

    center_xy_mm: tuple[float, float]
    semi_axes_mm: tuple[float, float]
    rotation_deg: float
    subcutaneous_fat_mm: float
    chest_muscle_mm: float
    liver_center_xy_mm: tuple[float, float]
    liver_semi_axes_mm: tuple[float, float]
    spine_center_xy_mm: tuple[float, float]
    spine_radius_mm: float
    aorta_offset_xy_mm: tuple[float, float]
    aorta_radius_mm: float
    spleen_center_xy_mm: tuple[float, float]
    spleen_semi_axes_mm: tuple[float, float]
    deformation: tuple[tuple[float, float, float, float, float], ...]  # (ampl_x, ampl_y, kx, ky, phase)
    texture_seed: int


@dataclass(frozen=True)
class AnatomyParameters:
    heart: HeartShape
    body: BodyShape


@dataclass(frozen=True)
class SliceAnatomy:
    """One rendered slice at its reference (end-expiration) position.

    Arrays are [rows, cols]; ``fractions`` maps every name of ``TISSUE_CLASSES`` to float32.
    ``transmural_depth`` is 0 at the endocardium and 1 at the epicardium (clipped, valid in
    the myocardium); ``heart_angle_deg`` is the angle about the LV centre in image convention.
    """

    level: str
    labels: np.ndarray
    fractions: dict[str, np.ndarray]
    texture: np.ndarray
    transmural_depth: np.ndarray
    lv_center_rc: tuple[float, float]
    rv_insertion_deg: float
    pixel_spacing_mm: float


def sample_anatomy(rng: np.random.Generator) -> AnatomyParameters:
    """Draw one study's anatomy. Wall thickness: 70 % normal (7-11 mm), 20 % hypertrophic
    (12-20 mm), 10 % thinned (5-7 mm)."""
    kind = rng.choice(3, p=[0.7, 0.2, 0.1])
    thickness = [rng.uniform(7.0, 11.0), rng.uniform(12.0, 20.0), rng.uniform(5.0, 7.0)][kind]
    endo = rng.uniform(16.0, 28.0) if kind != 1 else rng.uniform(12.0, 22.0)
    body_center = (rng.uniform(-15, 15), rng.uniform(-15, 10))
    semi_axes = (rng.uniform(140, 172), rng.uniform(95, 122))
    rotation = rng.uniform(-15, 15)
    heart = HeartShape(
        lv_center_xy_mm=(body_center[0] + rng.uniform(5, 45), body_center[1] + rng.uniform(-5, 30)),
        rv_direction_deg=180.0 + rng.uniform(-35, 35),
        endo_radius_mm=endo, wall_thickness_mm=thickness,
        endo_ellipticity=rng.uniform(0.0, 0.12), endo_ellipse_phase_deg=rng.uniform(0, 180),
        endo_harmonics=((rng.uniform(0, 0.04), rng.uniform(0, 360)), (rng.uniform(0, 0.03), rng.uniform(0, 360))),
        thickness_variation=rng.uniform(0.0, 0.2), thickness_phase_deg=rng.uniform(0, 360),
        rv_gap_mm=rng.uniform(8.0, 24.0), rv_u_fraction=rng.uniform(0.55, 0.72),
        rv_v_ratio=rng.uniform(0.85, 1.2), rv_v_offset_mm=rng.uniform(-3.0, 6.0),
        rv_wall_mm=rng.uniform(2.5, 5.0),
        papillary_radius_mm=rng.uniform(4.0, 7.5),
        papillary_angles_deg=(rng.uniform(120, 150), rng.uniform(-140, -100)),
        trabeculation=rng.uniform(0.1, 0.6), trabeculation_frequency=int(rng.integers(9, 20)),
        trabeculation_phase_deg=rng.uniform(0, 360),
        epicardial_fat_mm=rng.uniform(0.0, 5.0), epicardial_fat_phase_deg=rng.uniform(0, 360),
        apical_scale=rng.uniform(0.55, 0.75), basal_scale=rng.uniform(1.0, 1.15),
    )
    liver_center = (body_center[0] - semi_axes[0] * rng.uniform(0.35, 0.6),
                    body_center[1] - semi_axes[1] * rng.uniform(0.35, 0.75))
    spine_center = (body_center[0] + rng.uniform(-10, 25), body_center[1] - semi_axes[1] + rng.uniform(30, 45))
    deformation = tuple(
        (float(rng.uniform(-4, 4)), float(rng.uniform(-4, 4)), float(rng.uniform(-1, 1) * 2 * math.pi / 160),
         float(rng.uniform(-1, 1) * 2 * math.pi / 160), float(rng.uniform(0, 2 * math.pi)))
        for _ in range(3))
    body = BodyShape(
        center_xy_mm=body_center, semi_axes_mm=semi_axes, rotation_deg=rotation,
        subcutaneous_fat_mm=rng.uniform(5, 25), chest_muscle_mm=rng.uniform(8, 20),
        liver_center_xy_mm=liver_center,
        liver_semi_axes_mm=(semi_axes[0] * rng.uniform(0.45, 0.65), semi_axes[1] * rng.uniform(0.4, 0.6)),
        spine_center_xy_mm=spine_center, spine_radius_mm=rng.uniform(13, 18),
        aorta_offset_xy_mm=(rng.uniform(-35, -15), rng.uniform(18, 30)), aorta_radius_mm=rng.uniform(9, 13),
        spleen_center_xy_mm=(body_center[0] + semi_axes[0] * rng.uniform(0.4, 0.6),
                             body_center[1] - semi_axes[1] * rng.uniform(0.4, 0.6)),
        spleen_semi_axes_mm=(rng.uniform(25, 45), rng.uniform(20, 35)),
        deformation=deformation, texture_seed=int(rng.integers(0, 2**31 - 1)),
    )
    return AnatomyParameters(heart=heart, body=body)


def _ramp_inside(signed_distance_mm: np.ndarray, pixel_mm: float) -> np.ndarray:
    """Partial-volume fraction from a signed distance (negative inside), one-pixel ramp."""
    return np.clip(0.5 - signed_distance_mm / pixel_mm, 0.0, 1.0).astype(np.float32)


def _ellipse_distance(x: np.ndarray, y: np.ndarray, center: tuple[float, float], a: float, b: float,
                      rotation_deg: float = 0.0) -> np.ndarray:
    """Approximate signed distance (mm) to an ellipse: (q - 1) / |grad q|, negative inside."""
    c, s = math.cos(math.radians(rotation_deg)), math.sin(math.radians(rotation_deg))
    dx, dy = x - center[0], y - center[1]
    xr, yr = c * dx + s * dy, -s * dx + c * dy
    q = np.sqrt((xr / a) ** 2 + (yr / b) ** 2) + 1e-9
    grad = np.sqrt((xr / a**2) ** 2 + (yr / b**2) ** 2) / q + 1e-9
    return (q - 1.0) / grad


def smooth_texture(shape: tuple[int, int], seed: int, sigma_px: float) -> np.ndarray:
    """Gaussian-filtered white noise with unit standard deviation (float32 [rows, cols])."""
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal(shape)
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = np.fft.rfftfreq(shape[1])[None, :]
    filtered = np.fft.irfft2(np.fft.rfft2(noise) * np.exp(-2 * (math.pi * sigma_px) ** 2 * (fx**2 + fy**2)),
                             s=shape)
    return (filtered / (filtered.std() + 1e-12)).astype(np.float32)


@functools.lru_cache(maxsize=8)
def _deformed_grid(deformation: tuple, shape: tuple[int, int], pixel_spacing_mm: float,
                   window_center_xy_mm: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (mm) after the smooth random deformation of the scene (cached,
    shared by the slices of a study; read-only)."""
    rows, cols = shape
    y = window_center_xy_mm[1] - (np.arange(rows, dtype=np.float64)[:, None] - (rows - 1) / 2) * pixel_spacing_mm
    x = window_center_xy_mm[0] + (np.arange(cols, dtype=np.float64)[None, :] - (cols - 1) / 2) * pixel_spacing_mm
    x, y = np.broadcast_to(x, shape).copy(), np.broadcast_to(y, shape).copy()
    for ax, ay, kx, ky, phase in deformation:
        wave = np.sin(kx * x + ky * y + phase)
        x, y = x + ax * wave, y + ay * wave
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


@functools.lru_cache(maxsize=8)
def _body_shapes(body: BodyShape, shape: tuple[int, int], pixel_spacing_mm: float,
                 window_center_xy_mm: tuple[float, float]) -> dict[str, np.ndarray]:
    """Level-independent partial-volume shapes of the body (cached per study and grid)."""
    x, y = _deformed_grid(body.deformation, shape, pixel_spacing_mm, window_center_xy_mm)
    px = pixel_spacing_mm
    ax, ay = body.semi_axes_mm
    d_ribs = _ellipse_distance(x, y, body.center_xy_mm, ax - body.subcutaneous_fat_mm - body.chest_muscle_mm,
                               ay - body.subcutaneous_fat_mm - body.chest_muscle_mm, body.rotation_deg)
    spine = body.spine_center_xy_mm
    aorta_center = (spine[0] + body.aorta_offset_xy_mm[0], spine[1] + body.aorta_offset_xy_mm[1])
    vessels = smooth_texture(shape, body.texture_seed + 1, 1.2)
    out = {
        "body": _ramp_inside(_ellipse_distance(x, y, body.center_xy_mm, ax, ay, body.rotation_deg), px),
        "ribs": _ramp_inside(d_ribs, px),
        "fat_inner": _ramp_inside(_ellipse_distance(x, y, body.center_xy_mm, ax - body.subcutaneous_fat_mm,
                                                    ay - body.subcutaneous_fat_mm, body.rotation_deg), px),
        "aorta": _ramp_inside(np.hypot(x - aorta_center[0], y - aorta_center[1]) - body.aorta_radius_mm, px),
        "marrow": _ramp_inside(np.hypot(x - spine[0], y - spine[1]) - body.spine_radius_mm, px),
        "paraspinal": _ramp_inside(_ellipse_distance(x, y, (spine[0], spine[1] - 12), 55, 28), px),
        "vessels": np.clip((vessels - 2.0) * 1.5, 0.0, 0.6).astype(np.float32),
        "spleen": _ramp_inside(_ellipse_distance(x, y, body.spleen_center_xy_mm, *body.spleen_semi_axes_mm), px),
    }
    for value in out.values():
        value.flags.writeable = False
    return out


def level_of_slice(index: int, n_slices: int) -> str:
    """Slice level of slice ``index`` of ``n_slices`` spread from base to apex."""
    position = (index + 0.5) / n_slices
    return "basal" if position < 1 / 3 else ("mid" if position < 2 / 3 else "apical")


def render_slice(anatomy: AnatomyParameters, level: str, shape: tuple[int, int],
                 pixel_spacing_mm: float, window_center_xy_mm: tuple[float, float] = (0.0, 0.0),
                 include_body: bool = True) -> SliceAnatomy:
    """Rasterise one short-axis slice at ``level`` on a grid of ``shape`` square pixels.

    The grid is centred on ``window_center_xy_mm`` (the image centre by default; a small
    window around the heart renders the labels cheaply for statistics over many seeds).
    ``include_body=False`` leaves out everything but the heart and its fat (labels unchanged).
    """
    if level not in LEVEL_POSITION:
        raise ValueError(f"level must be one of {tuple(LEVEL_POSITION)}, got {level!r}")
    heart, body = anatomy.heart, anatomy.body
    rows, cols = shape
    x, y = _deformed_grid(body.deformation, shape, pixel_spacing_mm, window_center_xy_mm)
    position = LEVEL_POSITION[level]
    scale = {"basal": heart.basal_scale, "mid": 1.0, "apical": heart.apical_scale}[level]
    # slices through a tilted long axis: the LV centre drifts a little from base to apex
    cx = heart.lv_center_xy_mm[0] + 6.0 * (position - 0.5)
    cy = heart.lv_center_xy_mm[1] - 4.0 * (position - 0.5)
    phi = math.radians(heart.rv_direction_deg)
    dx, dy = x - cx, y - cy
    u = dx * math.cos(phi) + dy * math.sin(phi)
    v = dx * math.sin(phi) - dy * math.cos(phi)
    rho = np.hypot(u, v)
    theta = np.arctan2(v, u)
    endo_r = heart.endo_radius_mm * scale * (
        1.0 + heart.endo_ellipticity * np.cos(2 * (theta - math.radians(heart.endo_ellipse_phase_deg)))
        + sum(a * np.cos(k * theta - math.radians(p)) for k, (a, p) in zip((3, 4), heart.endo_harmonics)))
    thickness = heart.wall_thickness_mm * (0.85 if level == "apical" else 1.0) * (
        1.0 + heart.thickness_variation * np.cos(theta - math.radians(heart.thickness_phase_deg)))
    epi_r = endo_r + thickness
    px = pixel_spacing_mm
    f_endo = _ramp_inside(rho - endo_r, px)
    f_epi = _ramp_inside(rho - epi_r, px)

    # RV: an ellipse in the heart frame wrapped around the septum
    epi_mean = heart.endo_radius_mm * scale + heart.wall_thickness_mm
    rv_scale = 0.7 if level == "apical" else 1.0
    gap = heart.rv_gap_mm * rv_scale
    a_in = heart.rv_u_fraction * (epi_mean + gap)
    b_in = heart.rv_v_ratio * epi_mean * rv_scale
    rv_center_u = epi_mean + gap - a_in
    d_rv_in = _ellipse_distance(u, v, (rv_center_u, heart.rv_v_offset_mm), a_in, b_in)
    d_rv_out = _ellipse_distance(u, v, (rv_center_u, heart.rv_v_offset_mm), a_in + heart.rv_wall_mm,
                                 b_in + heart.rv_wall_mm)
    outside_lv = 1.0 - f_epi
    f_rv_blood = _ramp_inside(d_rv_in, px) * outside_lv
    f_rv_outer = _ramp_inside(d_rv_out, px) * outside_lv
    f_rv_wall = np.clip(f_rv_outer - f_rv_blood, 0.0, 1.0)

    # papillary muscles and trabeculation: myocardial tissue inside the LV blood pool
    f_muscle_in_pool = np.zeros(shape, dtype=np.float32)
    if level != "apical":
        for angle in heart.papillary_angles_deg:
            t = math.radians(angle)
            radius_here = heart.endo_radius_mm * scale - 0.9 * heart.papillary_radius_mm * scale
            pu, pv = radius_here * math.cos(t), radius_here * math.sin(t)
            f_muscle_in_pool = np.maximum(f_muscle_in_pool, _ramp_inside(
                np.hypot(u - pu, v - pv) - heart.papillary_radius_mm * scale, px))
    band = np.clip(1.0 - (endo_r - rho) / 3.0, 0.0, 1.0)
    pattern = 0.5 + 0.5 * np.cos(heart.trabeculation_frequency * theta + math.radians(heart.trabeculation_phase_deg)
                                 + 0.3 * rho)
    f_muscle_in_pool = np.maximum(f_muscle_in_pool, heart.trabeculation * band * pattern ** 2)
    f_papillary = f_endo * f_muscle_in_pool
    f_lv_blood = f_endo - f_papillary
    f_myo = np.clip(f_epi - f_endo, 0.0, 1.0)
    remaining = np.clip(1.0 - f_epi - f_rv_outer, 0.0, 1.0)

    # epicardial fat: a band of angularly varying thickness around LV and RV
    # patchy: concentrated on one side (e.g. the atrioventricular groove), thin elsewhere
    fat_t = heart.epicardial_fat_mm * (0.5 + 0.5 * np.cos(theta - math.radians(heart.epicardial_fat_phase_deg))) ** 3
    heart_distance = np.minimum(rho - epi_r, d_rv_out)
    f_fat = _ramp_inside(heart_distance - fat_t, px) * remaining
    remaining = remaining - f_fat

    fractions: dict[str, np.ndarray] = {}

    def take(name: str, fraction: np.ndarray) -> None:
        nonlocal remaining
        part = np.clip(fraction, 0.0, 1.0) * remaining
        fractions[name] = part.astype(np.float32)
        remaining = remaining - part

    if include_body:
        shapes = _body_shapes(body, shape, pixel_spacing_mm, window_center_xy_mm)
        take("aorta", shapes["aorta"])
        take("marrow", shapes["marrow"])
        take("muscle", shapes["paraspinal"])
        liver_grow = 0.7 + 0.6 * position  # more liver towards the apex
        take("liver", _ramp_inside(_ellipse_distance(x, y, body.liver_center_xy_mm, body.liver_semi_axes_mm[0] * liver_grow,
                                                     body.liver_semi_axes_mm[1] * liver_grow, 20.0), px)
             * shapes["ribs"])
        if level == "apical":
            take("spleen", shapes["spleen"] * shapes["ribs"])
        else:
            fractions["spleen"] = np.zeros(shape, dtype=np.float32)
        take("pulmonary_vessels", shapes["ribs"] * shapes["vessels"])
        take("lung", shapes["ribs"])
        chest_muscle = np.clip(shapes["fat_inner"] * remaining, 0, 1)
        fractions["muscle"] = fractions["muscle"] + chest_muscle
        remaining = remaining - chest_muscle
        take("subcutaneous_fat", shapes["body"])
    else:
        for name in ("aorta", "marrow", "muscle", "liver", "spleen", "pulmonary_vessels", "lung", "subcutaneous_fat"):
            fractions[name] = np.zeros(shape, dtype=np.float32)

    fractions.update(lv_blood=f_lv_blood.astype(np.float32), myocardium=f_myo.astype(np.float32),
                     rv_blood=f_rv_blood.astype(np.float32), rv_wall=f_rv_wall.astype(np.float32),
                     papillary=f_papillary.astype(np.float32), epicardial_fat=f_fat.astype(np.float32))

    labels = np.zeros(shape, dtype=np.uint8)
    labels[f_rv_blood >= 0.5] = 3
    labels[(f_epi >= 0.5) & (f_endo < 0.5)] = 2
    labels[f_endo >= 0.5] = 1
    # the thin RV wedges at the insertion points can break into pixel-sized islands: keep the
    # main cavity (islands become background, as a manual contour would leave them)
    labels[(labels == 3) & ~main_rv_mask(labels)] = 0
    rows_idx, cols_idx = np.nonzero(labels == 1)
    center_rc = (float(rows_idx.mean()), float(cols_idx.mean())) if rows_idx.size else (
        (rows - 1) / 2 - (cy - window_center_xy_mm[1]) / px, (cols - 1) / 2 + (cx - window_center_xy_mm[0]) / px)
    insertion = _rv_insertion_from_labels(labels, center_rc) if np.any(labels == 3) else float("nan")
    depth = np.clip((rho - endo_r) / thickness, 0.0, 1.0).astype(np.float32)
    texture = smooth_texture(shape, body.texture_seed + 7 + int(10 * position), 2.0)
    return SliceAnatomy(level=level, labels=labels, fractions=fractions, texture=texture, transmural_depth=depth,
                        lv_center_rc=center_rc, rv_insertion_deg=insertion, pixel_spacing_mm=pixel_spacing_mm)
