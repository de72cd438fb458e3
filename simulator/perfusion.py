"""Per-pixel myocardial blood flow (MBF) of the phantom: normal flow, defects, diffuse reduction.

MBF is plasma flow Fp in ml/min/g (docs of :mod:`perfline.toolbox.flow_models`). Normal
values follow the healthy volunteers of Xue et al. MRM 2020 (stress 2.82 +/- 0.47, rest
0.68 +/- 0.16) and the issue's ranges (stress 2.5-3.5, rest 0.6-1.2 ml/min/g).

Defects follow the coronary territories of the AHA model (docs/conventions.md): a territory's
segments are found from the angle about the LV centre counted from the anterior RV insertion;
the defect edges are smooth (angular ramp of 15 degrees, transmural ramp of 15 % of the wall).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from perfline.toolbox.aha import TERRITORIES, pixel_angles_deg, segment_of_angle


@dataclass(frozen=True)
class Defect:
    territory: str                 # "LAD", "RCA" or "LCx"
    severity: float                # MBF in the defect core / normal MBF
    transmural_extent: float       # 1 = transmural, < 1 = subendocardial fraction of the wall
    angular_shrink_deg: float      # the defect covers the territory minus this margin on each side


@dataclass(frozen=True)
class PerfusionParameters:
    kind: str                      # "stress" | "rest"
    normal_mbf_ml_min_g: float
    diffuse_factor: float          # 1 = none, < 1 = diffuse (microvascular) reduction
    endo_epi_ratio: float          # MBF gradient across the wall (endocardium / epicardium)
    angular_variation: tuple[tuple[float, float], ...]  # (relative amplitude, phase deg), k = 1, 2
    defects: tuple[Defect, ...]


def sample_perfusion(rng: np.random.Generator, kind: str) -> PerfusionParameters:
    """Normal MBF: stress U(2.5, 3.5), rest U(0.6, 1.2). Defects: 45 % of stress studies,
    15 % of rest studies (one territory, sometimes two); diffuse reduction in 12 %."""
    stress = kind == "stress"
    normal = rng.uniform(2.5, 3.5) if stress else rng.uniform(0.6, 1.2)
    defects: list[Defect] = []
    if rng.random() < (0.45 if stress else 0.15):
        n_defects = 1 if rng.random() < 0.8 else 2
        for territory in rng.choice(list(TERRITORIES), size=n_defects, replace=False):
            subendocardial = rng.random() < 0.5
            defects.append(Defect(territory=str(territory),
                                  severity=rng.uniform(0.3, 0.7) if stress else rng.uniform(0.6, 0.85),
                                  transmural_extent=rng.uniform(0.35, 0.6) if subendocardial else 1.0,
                                  angular_shrink_deg=rng.uniform(0.0, 15.0)))
    diffuse = rng.uniform(0.5, 0.8) if rng.random() < 0.12 else 1.0
    return PerfusionParameters(kind=kind, normal_mbf_ml_min_g=normal, diffuse_factor=diffuse,
                               endo_epi_ratio=rng.uniform(1.0, 1.15),
                               angular_variation=((rng.uniform(0, 0.06), rng.uniform(0, 360)),
                                                  (rng.uniform(0, 0.04), rng.uniform(0, 360))),
                               defects=tuple(defects))


def _smooth_step(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def mbf_map(perfusion: PerfusionParameters, myocardium_fraction: np.ndarray, transmural_depth: np.ndarray,
            center_rc: tuple[float, float], rv_insertion_deg: float, level: str) -> np.ndarray:
    """MBF (ml/min/g) float32 [rows, cols] wherever ``myocardium_fraction > 0``, NaN elsewhere.

    ``transmural_depth`` runs 0 (endocardium) -> 1 (epicardium).
    """
    angles = pixel_angles_deg(myocardium_fraction.shape, center_rc)
    relative = (angles - rv_insertion_deg) % 360.0
    modulation = 1.0 + sum(a * np.cos(math.radians(1.0) * k * relative - math.radians(p))
                           for k, (a, p) in zip((1, 2), perfusion.angular_variation))
    # endo/epi gradient centred so that the wall average stays at the normal value
    gradient = 1.0 + (perfusion.endo_epi_ratio - 1.0) * (0.5 - transmural_depth)
    mbf = perfusion.normal_mbf_ml_min_g * perfusion.diffuse_factor * modulation * gradient
    for defect in perfusion.defects:
        # angular distance (deg) from the territory edge, positive inside
        inside = _distance_inside_deg(defect.territory, angles, rv_insertion_deg, level) - defect.angular_shrink_deg
        angular = _smooth_step(inside / 15.0 + 0.5)
        transmural = 1.0 if defect.transmural_extent >= 1.0 else _smooth_step(
            (defect.transmural_extent - transmural_depth) / 0.15 + 0.5)
        mbf = mbf * (1.0 - angular * transmural * (1.0 - defect.severity))
    return np.where(myocardium_fraction > 0, mbf, np.nan).astype(np.float32)


def _distance_inside_deg(territory: str, angles: np.ndarray, rv_insertion_deg: float, level: str) -> np.ndarray:
    """Angular distance (deg) of every pixel to the border of a territory's sectors at
    ``level``: positive inside, negative outside (from a 1-degree table of the circle)."""
    table = np.arange(360) + 0.5
    member = np.isin(segment_of_angle(table, rv_insertion_deg, level), TERRITORIES[territory])  # type: ignore[arg-type]
    if not member.any():
        return np.full(angles.shape, -180.0)
    if member.all():
        return np.full(angles.shape, 180.0)
    edges = table[member != np.roll(member, 1)] - 0.5
    difference = (angles[..., None] - edges + 180.0) % 360.0 - 180.0
    distance = np.min(np.abs(difference), axis=-1)
    return np.where(member[angles.astype(np.int64) % 360], distance, -distance)
