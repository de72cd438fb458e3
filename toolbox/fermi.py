"""Pixel-wise Fermi-constrained deconvolution (Jerosch-Herold et al., Med Phys 1998).

Model (``flow_models.fermi_tissue_curves``): ``Q(t) = (MBF/60) Cp(t - d) (*) R(t; k, tau)``
with ``R(0) = 1``. The flow enters linearly, so for each entry of a (k, tau, delay) table the
best flow has a closed form and the profile cost is ``|y|^2 - max(y.b, 0)^2 / |b|^2``: one
matrix product per block of pixels finds the global minimum over the table; a quadratic fit
to the 27 neighbouring costs refines (log k, tau, delay) continuously; the flow is then
solved at the refined shape.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from perfline.toolbox import flow_models
from perfline.toolbox.flow_fit import (
    PIXEL_BLOCK,
    FlowMaps,
    grid_value,
    neighbourhood_offsets,
    prepare_curves,
    quadratic_vertex,
    scatter_maps,
)

logger = logging.getLogger(__name__)


class FermiSettings(BaseModel):
    """Search grid of the Fermi fit."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    k_min_per_s: float = Field(0.05, gt=0, description="smallest Fermi decay rate k, 1/s")
    k_max_per_s: float = Field(3.0, gt=0, description="largest Fermi decay rate k, 1/s")
    k_steps: int = Field(14, ge=3, description="log-spaced k values")
    tau_max_s: float = Field(12.0, gt=0, description="largest Fermi shoulder tau, s")
    tau_steps: int = Field(13, ge=3, description="tau values from 0")
    delay_max_s: float = Field(3.0, ge=0, description="largest bolus delay searched, s")
    delay_step_s: float = Field(0.5, gt=0, description="delay grid step, s")


@dataclass(frozen=True)
class _FermiTable:
    k: np.ndarray
    tau: np.ndarray
    delay: np.ndarray
    curves: np.ndarray  # [nk, ntau, nd, T], unit flow (MBF = 60 ml/min/g, i.e. F = 1/s)
    norms: np.ndarray  # [nk, ntau, nd] squared norms


def _build_table(aif: np.ndarray, dt_s: float, settings: FermiSettings) -> _FermiTable:
    k = np.geomspace(settings.k_min_per_s, settings.k_max_per_s, settings.k_steps)
    tau = np.linspace(0.0, settings.tau_max_s, settings.tau_steps)
    delay = np.arange(0.0, settings.delay_max_s + 1e-9, settings.delay_step_s)
    if delay.size < 3:
        delay = np.array([0.0, settings.delay_step_s, 2 * settings.delay_step_s])
    kk, tt = np.meshgrid(k, tau, indexing="ij")
    base = flow_models.fermi_tissue_curves(aif, dt_s, np.full(kk.size, 60.0), kk.ravel(), tt.ravel())
    shifted = np.stack([flow_models.shift_curves(base, d, dt_s) for d in delay], axis=1)
    curves = shifted.reshape(k.size, tau.size, delay.size, aif.size)
    return _FermiTable(k, tau, delay, curves, np.sum(curves**2, axis=-1))


def _profile_cost(y2: np.ndarray, dot: np.ndarray, norm: np.ndarray) -> np.ndarray:
    positive = np.maximum(dot, 0.0)
    return y2 - positive**2 / np.maximum(norm, 1e-30)


def fit_fermi_curves(
    curves: np.ndarray, aif: np.ndarray, dt_s: float, settings: FermiSettings
) -> dict[str, np.ndarray]:
    """Fit ``[P, T]`` curves; returns mbf_ml_min_g, delay_s, k_per_s, tau_s, fit_rmse ``[P]``."""
    table = _build_table(aif, dt_s, settings)
    shape = table.norms.shape
    flat_curves = table.curves.reshape(-1, aif.size)
    flat_norms = table.norms.ravel()
    offsets = neighbourhood_offsets(3)
    n = curves.shape[0]
    result = {name: np.full(n, np.nan) for name in ("mbf_ml_min_g", "delay_s", "k_per_s", "tau_s", "fit_rmse")}
    # the best entry maximises the correlation with the unit-norm table curve (when positive)
    unit32 = (flat_curves / np.sqrt(np.maximum(flat_norms, 1e-30))[:, None]).T.astype(np.float32)
    for start in range(0, n, PIXEL_BLOCK):
        y = curves[start : start + PIXEL_BLOCK]
        y2 = np.sum(y**2, axis=1)
        correlation = y.astype(np.float32) @ unit32
        best = np.argmax(correlation, axis=1)
        rows = np.arange(y.shape[0])
        best_dot = correlation[rows, best].astype(np.float64) * np.sqrt(flat_norms[best])
        fittable = best_dot > 0
        grid_index = np.stack(np.unravel_index(best, shape), axis=1)  # [p, 3]
        # costs on the 3x3x3 neighbourhood (clamped at the table edges)
        neighbours = np.clip(grid_index[:, None, :] + offsets[None], 0, np.array(shape) - 1)
        flat_nb = np.ravel_multi_index(tuple(neighbours.transpose(2, 0, 1)), shape)
        # the neighbours' correlations are already in the search matrix
        nb_dot = np.take_along_axis(correlation, flat_nb, axis=1).astype(np.float64) * np.sqrt(flat_norms[flat_nb])
        nb_cost = _profile_cost(y2[:, None], nb_dot, flat_norms[flat_nb])
        position = grid_index + quadratic_vertex(nb_cost, offsets)
        k = grid_value(table.k, position[:, 0], log=True)
        tau = grid_value(table.tau, position[:, 1], log=False)
        delay = grid_value(table.delay, position[:, 2], log=False)
        basis = flow_models.fermi_tissue_curves(aif, dt_s, np.full(y.shape[0], 60.0), k, tau, delay)
        refined_dot = np.sum(y * basis, axis=1)
        refined_norm = np.sum(basis**2, axis=1)
        refined_cost = _profile_cost(y2, refined_dot, refined_norm)
        grid_cost = _profile_cost(y2, best_dot, flat_norms[best])
        use_grid = grid_cost < refined_cost
        amplitude = np.where(use_grid, np.maximum(best_dot, 0) / flat_norms[best],
                             np.maximum(refined_dot, 0) / np.maximum(refined_norm, 1e-30))
        cost = np.minimum(grid_cost, refined_cost)
        sl = slice(start, start + y.shape[0])
        result["mbf_ml_min_g"][sl] = np.where(fittable, 60.0 * amplitude, np.nan)
        result["k_per_s"][sl] = np.where(use_grid, table.k[grid_index[:, 0]], k)
        result["tau_s"][sl] = np.where(use_grid, table.tau[grid_index[:, 1]], tau)
        result["delay_s"][sl] = np.where(use_grid, table.delay[grid_index[:, 2]], delay)
        result["fit_rmse"][sl] = np.sqrt(np.maximum(cost, 0.0) / aif.size)
    for name in ("delay_s", "k_per_s", "tau_s", "fit_rmse"):
        result[name][~np.isfinite(result["mbf_ml_min_g"])] = np.nan
    return result


def map_fermi(
    gd_series: np.ndarray,
    aif_plasma_mmol_l: np.ndarray,
    dt_s: float,
    *,
    mask: np.ndarray | None = None,
    settings: FermiSettings | None = None,
) -> FlowMaps:
    """Pixel-wise Fermi MBF (ml/min/g) from tissue Gd ``[time, rows, cols]`` or ``[N, time]``.

    ``aif_plasma_mmol_l`` is the plasma AIF ``[time]`` (``blood_to_plasma`` of the baseline-
    corrected blood curve) on the same uniform grid ``dt_s``. Pixels outside ``mask``, with
    NaNs or no enhancement give NaN. PS, Vp and Visf maps are NaN (not in this model).
    """
    settings = settings or FermiSettings()
    prepared, aif = prepare_curves(gd_series, aif_plasma_mmol_l, dt_s, mask)
    values = fit_fermi_curves(prepared.curves, aif, dt_s, settings) if prepared.index.size else {}
    values = {name: values[name] for name in ("mbf_ml_min_g", "delay_s", "fit_rmse") if name in values}
    return scatter_maps(prepared, "fermi", **values)
