"""Shared machinery of the pixel-wise flow fitters (``fermi.py``, ``btex.py``).

Both fitters follow QPerf's scheme (REFERENCES.md section 4): a look-up table of model
curves on a parameter grid, a global search per pixel (one matrix product per block of
pixels), then a local refinement: a quadratic is fitted by least squares to the cost on the
3^D grid neighbourhood of the best entry and its vertex (clipped to the neighbourhood) gives
continuous parameters (Fermi). BTEX refines on the grid with Levenberg-Marquardt instead
(``grid_refine.py``). No per-pixel Python loop anywhere.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

import numpy as np

from perfline.toolbox.noise_bias import NoiseBias

logger = logging.getLogger(__name__)

PIXEL_BLOCK = 4096  # pixels per matrix product (bounds the memory of the cost matrices)


class MappingInputError(ValueError):
    """Series, AIF or mask do not fit together or contain nothing that can be fitted."""


@dataclass(frozen=True)
class FlowMaps:
    """Pixel-wise fit results, float32, NaN where no fit was possible.

    Every map has the spatial shape of the input (``[rows, cols]`` for a ``[time, rows, cols]``
    series, ``[N]`` for ``[N, time]`` curves).
    """

    mbf_ml_min_g: np.ndarray
    ps_ml_min_g: np.ndarray  # NaN for the Fermi model (no exchange parameter)
    vp: np.ndarray  # plasma volume fraction, ml/ml (NaN for Fermi)
    visf: np.ndarray  # interstitial volume fraction, ml/ml (NaN for Fermi)
    delay_s: np.ndarray
    fit_rmse: np.ndarray  # root-mean-square residual, mmol/L
    model: str
    # BTEX with spill-over regressors only: fraction of each regressor curve, [K, *spatial] (else None)
    spillover: np.ndarray | None = None
    # with a SIMEX correction (noise_bias.py): its ratio; ``mbf_ml_min_g`` is then already divided by
    # ``noise_bias.applied``
    noise_bias: NoiseBias | None = None

    def as_dict(self) -> dict[str, np.ndarray]:
        return {
            "mbf_ml_min_g": self.mbf_ml_min_g, "ps_ml_min_g": self.ps_ml_min_g, "vp": self.vp,
            "visf": self.visf, "delay_s": self.delay_s, "fit_rmse": self.fit_rmse,
        }


@dataclass(frozen=True)
class PreparedCurves:
    curves: np.ndarray  # [P, T] float64, only the pixels to fit
    index: np.ndarray  # flat indices of those pixels in the spatial shape
    spatial_shape: tuple[int, ...]


def prepare_curves(
    gd_series: np.ndarray, aif_plasma_mmol_l: np.ndarray, dt_s: float, mask: np.ndarray | None
) -> tuple[PreparedCurves, np.ndarray]:
    """Validate inputs; return the curves to fit (``[P, T]``) and the AIF as float64.

    ``gd_series`` is ``[time, rows, cols]`` or ``[N, time]`` (tissue Gd, mmol/L). Pixels with
    any non-finite sample or without enhancement (all samples <= 0) are left out (NaN maps).
    """
    series = np.asarray(gd_series, dtype=np.float64)
    aif = np.asarray(aif_plasma_mmol_l, dtype=np.float64)
    if aif.ndim != 1:
        raise MappingInputError(f"AIF must be a 1-D curve, got shape {aif.shape}")
    if not np.all(np.isfinite(aif)):
        raise MappingInputError("AIF contains NaN or infinite values")
    if aif.max() <= 0:
        raise MappingInputError("AIF has no positive value: no bolus to map with")
    if not (np.isfinite(dt_s) and dt_s > 0):
        raise MappingInputError(f"dt_s must be a positive number of seconds, got {dt_s}")
    if series.ndim == 3:
        if series.shape[0] != aif.size:
            raise MappingInputError(
                f"series has {series.shape[0]} frames ([time, rows, cols] = {series.shape}) "
                f"but the AIF has {aif.size} samples"
            )
        spatial = series.shape[1:]
        curves = series.reshape(series.shape[0], -1).T
    elif series.ndim == 2:
        if series.shape[1] != aif.size:
            raise MappingInputError(
                f"curves [N, time] = {series.shape} but the AIF has {aif.size} samples"
            )
        spatial = series.shape[:1]
        curves = series
    else:
        raise MappingInputError(f"series must be [time, rows, cols] or [N, time], got {series.shape}")
    if aif.size < 8:
        raise MappingInputError(f"need at least 8 time points, got {aif.size}")
    finite = np.all(np.isfinite(curves), axis=1)
    if not np.any(finite):
        raise MappingInputError("every pixel of the series contains NaN or infinite values")
    if not np.any(np.abs(curves[finite]) > 0):
        raise MappingInputError("the series is all zero: no enhancement to fit")
    keep = finite & (np.max(np.where(np.isfinite(curves), curves, 0.0), axis=1) > 0)
    if mask is not None:
        mask_flat = np.asarray(mask, dtype=bool).reshape(-1)
        if mask_flat.size != curves.shape[0]:
            raise MappingInputError(
                f"mask has {np.asarray(mask).shape} but the series spatial shape is {spatial}"
            )
        keep &= mask_flat
    index = np.flatnonzero(keep)
    logger.debug("fitting %d of %d pixels", index.size, curves.shape[0])
    return PreparedCurves(curves[index], index, tuple(spatial)), aif


def scatter_maps(prepared: PreparedCurves, model: str, **values: np.ndarray) -> FlowMaps:
    """Put per-fitted-pixel values back on the spatial grid (NaN elsewhere)."""
    size = int(np.prod(prepared.spatial_shape))
    out = {}
    for name in ("mbf_ml_min_g", "ps_ml_min_g", "vp", "visf", "delay_s", "fit_rmse"):
        full = np.full(size, np.nan, dtype=np.float32)
        if name in values:
            full[prepared.index] = values[name]
        out[name] = full.reshape(prepared.spatial_shape)
    spillover = values.get("spillover")
    if spillover is not None:
        full = np.full((spillover.shape[1], size), np.nan, dtype=np.float32)
        full[:, prepared.index] = spillover.T
        out["spillover"] = full.reshape(spillover.shape[1], *prepared.spatial_shape)
    return FlowMaps(model=model, **out)


def neighbourhood_offsets(n_dims: int) -> np.ndarray:
    """All offsets in {-1, 0, 1}^D, shape ``[3^D, D]``."""
    return np.array(list(itertools.product((-1, 0, 1), repeat=n_dims)), dtype=np.int64)


def _quadratic_design(offsets: np.ndarray) -> np.ndarray:
    n_dims = offsets.shape[1]
    columns = [np.ones(len(offsets))]
    columns += [offsets[:, i] for i in range(n_dims)]
    columns += [offsets[:, i] * offsets[:, j] for i in range(n_dims) for j in range(i, n_dims)]
    return np.stack(columns, axis=1).astype(np.float64)


def quadratic_vertex(costs: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Vertex of the least-squares quadratic through ``costs`` ``[P, 3^D]`` at ``offsets``.

    Returns offsets ``[P, D]`` in grid cells, clipped to [-1, 1]; where the fitted quadratic
    is not convex, falls back to independent parabolas per axis (also clipped).
    """
    n_dims = offsets.shape[1]
    design = _quadratic_design(offsets)
    coefficients = costs @ np.linalg.pinv(design).T  # [P, n_coef]
    gradient = coefficients[:, 1 : 1 + n_dims]
    hessian = np.zeros((costs.shape[0], n_dims, n_dims))
    position = 1 + n_dims
    for i in range(n_dims):
        for j in range(i, n_dims):
            value = coefficients[:, position]
            if i == j:
                hessian[:, i, i] = 2.0 * value
            else:
                hessian[:, i, j] = value
                hessian[:, j, i] = value
            position += 1
    eigen = np.linalg.eigvalsh(hessian)
    convex = eigen[:, 0] > 1e-12 * np.maximum(np.abs(eigen[:, -1]), 1e-30)
    vertex = np.zeros((costs.shape[0], n_dims))
    if np.any(convex):
        vertex[convex] = -np.linalg.solve(hessian[convex], gradient[convex][..., None])[..., 0]
    diag = np.diagonal(hessian, axis1=1, axis2=2)
    per_axis = np.where(diag > 0, -gradient / np.where(diag > 0, diag, 1.0), 0.0)
    vertex[~convex] = per_axis[~convex]
    return np.clip(vertex, -1.0, 1.0)


def grid_value(axis: np.ndarray, position: np.ndarray, log: bool) -> np.ndarray:
    """Parameter value at fractional grid ``position`` on ``axis`` (log-linear if ``log``)."""
    index = np.arange(axis.size, dtype=np.float64)
    if log:
        return np.exp(np.interp(position, index, np.log(axis)))
    return np.interp(position, index, axis)
