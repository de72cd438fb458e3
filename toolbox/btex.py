"""Pixel-wise two-region BTEX fit: MBF (= Fp), PS, Vp, Visf and delay maps.

Follows QPerf's scheme (REFERENCES.md section 4; Xue et al., MRM 2020): a look-up table of
tissue curves over (Fp, PS, Vp, Visf, delay) for the AIF at hand, a global search per pixel,
then local refinement. Here:

1. The hat-weighted residue functions of the grid (``flow_models.hat_weights_btex``, exact
   closed-form Laplace solution) depend only on the time grid, so they are computed once per
   (frames, dt) and cached in memory; each AIF then costs one matrix product, and the delay
   axis is the same curves shifted by linear interpolation.
2. The table curves are compressed to their leading principal components (``n_components``:
   12, largest RMS representation error 4e-4 mmol/L); every cost below is computed on the
   pixel's coefficients.
3. Global search on every other grid point of each axis (one matrix product and argmin
   passes per block of pixels), then a Levenberg-Marquardt refinement of the five continuous
   grid coordinates with the model interpolated multilinearly in the table (analytic
   Jacobian of the interpolation; along the delay axis the interpolation is exact): the 3
   best entries get 2 iterations each, the best goes on, each run stops early once its steps
   fall below ``tolerance_cells`` (``grid_refine.refine_on_grid``: compiled with numba when
   installed). ``BtexSettings.thorough()`` is the slower reference search. The fit RMSE is
   measured on the full curves.
4. Maximum a posteriori, not plain least squares: PS, Vp and Visf get weak Gaussian priors
   at population values (``prior_*``), scaled by each pixel's noise (estimated from its
   second differences). Without them, plasma transit (Vp/Fp), delay and exchange trade off
   along a flat valley and the pixel-wise MBF scatters by 15-20 % at 0.02 mmol/L noise;
   ``prior_weight = 0`` gives the plain least-squares fit.
5. Optional blood spill-over terms (``spillover_curves``, e.g. the slice's RV blood-pool curve):
   nonnegative fractions of given curves added to every pixel's model. The unconstrained
   fractions are eliminated exactly by variable projection, so that the same search and
   refinement run on projected coefficients; nonnegativity by one refit without the pools that
   come out negative (approximate). ``_fit_with_spillover``; docs/mapping.md, "Blood spill-over
   in the tissue curves".
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import scipy.ndimage as ndi
from pydantic import BaseModel, ConfigDict, Field

from perfline.toolbox import flow_models
from perfline.toolbox.flow_fit import (
    PIXEL_BLOCK, FlowMaps, MappingInputError, grid_value, prepare_curves, scatter_maps,
)
from perfline.toolbox.grid_refine import (
    GridFit, interpolate_grid, refine_on_grid, thread_pool, warm_compiled_refinement,
)
from perfline.toolbox.noise_bias import NoiseBias, SimexOptions, simex_ratio

logger = logging.getLogger(__name__)


class BtexSettings(BaseModel):
    """Look-up table, search and prior settings of the BTEX fit (defaults: QPerf's ranges)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    fp_range_ml_min_g: tuple[float, float] = Field((0.1, 6.0), description="Fp grid, log-spaced")
    fp_steps: int = Field(40, ge=3)
    ps_range_ml_min_g: tuple[float, float] = Field((0.35, 4.0), description="PS grid, log-spaced")
    ps_steps: int = Field(12, ge=3)
    vp_range: tuple[float, float] = Field((0.04, 0.10), description="Vp grid, linear, ml/ml")
    vp_steps: int = Field(7, ge=3)
    visf_range: tuple[float, float] = Field((0.1, 0.475), description="Visf grid, linear, ml/ml")
    visf_steps: int = Field(6, ge=3)
    delay_max_s: float = Field(3.0, ge=0, description="largest bolus delay, s")
    delay_step_s: float = Field(0.25, gt=0, description="delay grid step, s")
    n_components: int = Field(12, ge=4, le=40, description="principal components of the table")
    iterations: int = Field(10, ge=0, description="Levenberg-Marquardt iterations")
    n_starts: int = Field(3, ge=1, description="best coarse entries refined per pixel")
    coarse_stride: tuple[int, int, int, int, int] = Field(
        (2, 2, 2, 2, 2), description="global search on every k-th grid point of (Fp, PS, Vp, Visf, delay)")
    start_iterations: int = Field(
        2, ge=0, description="with several starts: iterations of each before the best goes on")
    tolerance_cells: float = Field(
        0.02, ge=0, description="stop a pixel's refinement once a step moves it less (grid cells); 0: all iterations")
    prior_weight: float = Field(1.0, ge=0, description="scale of the priors (0: least squares)")
    prior_ps_ml_min_g: float = Field(1.3, gt=0, description="PS prior centre (MRM 2020 volunteers)")
    prior_ps_log_sd: float = Field(0.5, gt=0, description="PS prior SD of ln(PS)")
    prior_vp: float = Field(0.07, gt=0)
    prior_vp_sd: float = Field(0.02, gt=0)
    prior_visf: float = Field(0.25, gt=0)
    prior_visf_sd: float = Field(0.08, gt=0)

    def thorough(self) -> BtexSettings:
        """The same table and priors with the refinement of the first version (3 iterations per
        start instead of 2, no early stopping; with ``n_components=16`` the first version's
        search): the reference the defaults are checked against (tests/test_mapping.py,
        docs/mapping.md)."""
        return self.model_copy(update={"n_starts": 3, "coarse_stride": (2, 2, 2, 2, 2), "start_iterations": 3,
                                       "tolerance_cells": 0.0})

    def axes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        return (
            np.geomspace(*self.fp_range_ml_min_g, self.fp_steps),
            np.geomspace(*self.ps_range_ml_min_g, self.ps_steps),
            np.linspace(*self.vp_range, self.vp_steps),
            np.linspace(*self.visf_range, self.visf_steps),
        )

    def prior_in_cells(self) -> tuple[np.ndarray, np.ndarray]:
        """Prior centre (grid coordinate) and precision (1 / SD^2, per cell^2) per table axis.

        Axes: Fp, PS, Vp, Visf, delay; Fp and delay have no prior (precision 0).
        """
        fp, ps, vp, visf = self.axes()
        centre = np.zeros(5)
        precision = np.zeros(5)
        log_step = np.log(ps[1] / ps[0])
        centre[1] = np.log(self.prior_ps_ml_min_g / ps[0]) / log_step
        precision[1] = (log_step / self.prior_ps_log_sd) ** 2
        centre[2] = (self.prior_vp - vp[0]) / (vp[1] - vp[0])
        precision[2] = ((vp[1] - vp[0]) / self.prior_vp_sd) ** 2
        centre[3] = (self.prior_visf - visf[0]) / (visf[1] - visf[0])
        precision[3] = ((visf[1] - visf[0]) / self.prior_visf_sd) ** 2
        return centre, self.prior_weight * precision


CACHE_DIR_ENV = "PERFLINE_CACHE_DIR"
SMOOTHED_STEP = 3  # the smoothed series is fitted on every k-th row and column (sigma >= 1 px)
MIN_PREFIT_CORE = 12  # fewest core pixels for a core-only delay pre-fit (map_btex delay_prefit_erosion_px)
# structuring elements of the pre-fit core's erosion (map_btex delay_prefit_erosion_shape)
EROSION_SHAPES = {"cross": ndi.generate_binary_structure(2, 1), "square": np.ones((3, 3), dtype=bool)}
# SIMEX leaves flow values at the top of the Fp grid out of its medians, as the report does (5.9 of 6)
SIMEX_TOP_FRACTION = 0.98
COARSE_BLOCK_COSTS = PIXEL_BLOCK * 2048  # cost entries per block of the global search (32 MB)


def _cache_dir() -> Path | None:
    """Folder of the on-disk residue tables: $PERFLINE_CACHE_DIR, else ~/.cache/perfline ("" disables)."""
    configured = os.environ.get(CACHE_DIR_ENV)
    if configured is not None:
        return Path(configured) if configured else None
    return Path.home() / ".cache" / "perfline"


def _grid_key(n_samples: int, dt_s: float, settings: BtexSettings) -> str:
    grid = [settings.fp_range_ml_min_g, settings.fp_steps, settings.ps_range_ml_min_g, settings.ps_steps,
            settings.vp_range, settings.vp_steps, settings.visf_range, settings.visf_steps]
    digest = hashlib.sha256(json.dumps([n_samples, round(dt_s, 9), grid]).encode()).hexdigest()[:20]
    return f"btex_residues_{n_samples}_{digest}.npy"


@functools.lru_cache(maxsize=4)
def _padded_residue_table(n_padded: int, dt_s: float, settings: BtexSettings) -> np.ndarray:
    folder = _cache_dir()
    path = folder / _grid_key(n_padded, dt_s, settings) if folder is not None else None
    fp, ps, vp, visf = np.meshgrid(*settings.axes(), indexing="ij")
    shape = (*fp.shape, 2, n_padded)
    if path is not None and path.is_file():
        try:
            table = np.load(path, allow_pickle=False)  # plain array file: nothing is executed
            if table.shape == shape and table.dtype == np.float64:
                return table
            logger.warning("ignoring %s: shape %s / dtype %s, expected %s float64", path, table.shape,
                           table.dtype, shape)
        except (OSError, ValueError) as error:
            logger.warning("ignoring the unreadable BTEX table %s: %s", path, error)
    logger.info("building the BTEX residue table: %d curves of %d samples", fp.size, n_padded)
    weights = flow_models.hat_weights_btex(n_padded, dt_s, fp.ravel(), ps.ravel(), vp.ravel(), visf.ravel())
    table = weights.reshape(shape)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(f".{os.getpid()}.tmp")
            with open(partial, "wb") as handle:
                np.save(handle, table, allow_pickle=False)
            os.replace(partial, path)
        except OSError as error:
            logger.warning("could not store the BTEX table in %s: %s", path.parent, error)
    return table


def residue_table(n_samples: int, dt_s: float, settings: BtexSettings) -> np.ndarray:
    """Hat-weighted residues of the whole grid, ``[nfp, nps, nvp, nvisf, 2, T]`` (cached).

    Depends only on the grid fields of ``settings``. The residues come from a damped Laplace
    inversion whose FFT length is the power of two >= 2 T, and the first T samples of a table
    built for T' samples with the same FFT length are identical to a table built for T: so one
    table per power of two (64, 128, ...) serves every scan length, kept in memory and on disk
    (``$PERFLINE_CACHE_DIR``, default ``~/.cache/perfline``; building one costs about 10 s).
    """
    if n_samples < 1:
        raise flow_models.FlowModelError(f"the residue table needs at least one sample, got {n_samples}")
    n_padded = int(2 ** np.ceil(np.log2(n_samples)))
    grid = grid_settings(settings)  # search or prior settings must not make a second copy of the table
    # one builder per table: a fit that needs the table while a warm-up builds it waits for it
    with _table_lock(n_padded, float(dt_s), grid):
        table = _padded_residue_table(n_padded, float(dt_s), grid)
    return table[..., :n_samples]


GRID_FIELDS = ("fp_range_ml_min_g", "fp_steps", "ps_range_ml_min_g", "ps_steps", "vp_range", "vp_steps",
               "visf_range", "visf_steps")


def grid_settings(settings: BtexSettings) -> BtexSettings:
    """``settings`` with everything but the table grid at its default: the key of the residue tables."""
    return BtexSettings(**{name: getattr(settings, name) for name in GRID_FIELDS})


_TABLE_LOCKS: dict[tuple[int, float, BtexSettings], threading.Lock] = {}
_TABLE_LOCKS_GUARD = threading.Lock()

# AIF grid lengths warmed: 60 beats at 0.55-1.07 s on a 0.5 s grid give 66-128 samples (the
# 128 table). Longer rest scans need the 256 table (built on first use, then on disk): warming
# it too took CPU from the first scan on a 2-core machine (demo stress latency 20 s, not 11 s)
WARM_LENGTHS = (128,)


def _table_lock(n_padded: int, dt_s: float, settings: BtexSettings) -> threading.Lock:
    with _TABLE_LOCKS_GUARD:
        return _TABLE_LOCKS.setdefault((n_padded, dt_s, settings), threading.Lock())


def warm_residue_tables(dt_s: float, settings: BtexSettings, lengths: Sequence[int] = WARM_LENGTHS,
                        stop: threading.Event | None = None) -> dict[int, float]:
    """Load (disk cache) or build the residue tables of ``lengths`` samples at ``dt_s`` seconds.

    The residue tables depend only on the time grid and the grid fields of ``settings``, not on
    the AIF, so a server can prepare them before the first scan (the per-AIF table of
    :func:`build_aif_table` cannot be). Lengths are rounded up to powers of two. Stops between
    tables once ``stop`` is set. Returns seconds spent per padded length. Also compiles (or loads
    from numba's cache) the compiled refinement first, when numba is installed.
    """
    spent: dict[int, float] = {}
    compiled_s = warm_compiled_refinement() if stop is None or not stop.is_set() else 0.0
    if compiled_s > 0.5:
        logger.info("compiled BTEX refinement ready after %.1f s", compiled_s)
    for length in lengths:
        if stop is not None and stop.is_set():
            break
        started = time.perf_counter()
        n_padded = int(2 ** np.ceil(np.log2(max(int(length), 1))))
        residue_table(n_padded, dt_s, settings)
        spent[n_padded] = time.perf_counter() - started
    return spent


def _table_curves(aif: np.ndarray, dt_s: float, settings: BtexSettings) -> np.ndarray:
    """Tissue curves of the grid for this AIF at zero delay, ``[nfp, nps, nvp, nvisf, T]``."""
    weights = residue_table(aif.size, float(dt_s), settings)
    fp = settings.axes()[0]
    curves = flow_models.convolve_hat_weights(aif, weights)
    return curves * (fp[:, None, None, None, None] / 60.0)


def _table_curves_float32(aif: np.ndarray, dt_s: float, settings: BtexSettings, block: int = 64) -> np.ndarray:
    """:func:`_table_curves` in float32, float32 ``[nfp, nps, nvp, nvisf, T]``.

    The same sum (:func:`flow_models.convolve_hat_weights`) as float32 products, one Fp plane of
    the table at a time, and causal: output samples ``[b, b + block)`` need only the table's first
    ``b + block`` lags, so the lower-triangular Toeplitz product is done in column blocks (about
    0.6 of the full product's work at T = 480). Against the float64 sum the curves differ by about
    1e-6 of their maximum, the rounding of the float32 curves the fine table keeps anyway; it took
    about a tenth of the server's CPU per scan (``benchmarks/bench_latency.py`` under py-spy).
    """
    aif = np.asarray(aif, dtype=np.float64)
    n = aif.size
    weights = residue_table(n, float(dt_s), settings)  # [nfp, nps, nvp, nvisf, 2, n] float64 view
    fp = settings.axes()[0]
    toeplitz = flow_models.causal_toeplitz(aif).astype(np.float32)
    out = np.empty(weights.shape[:-2] + (n,), dtype=np.float32)
    for index in range(weights.shape[0]):
        plane = weights[index].reshape(-1, 2, n)
        main = np.ascontiguousarray(plane[:, 0, :], dtype=np.float32)
        curves = out[index].reshape(-1, n)
        for start in range(0, n, block):
            stop = min(n, start + block)
            np.matmul(main[:, :stop], toeplitz[:stop, start:stop], out=curves[:, start:stop])
        curves -= np.float32(aif[0]) * plane[:, 1, :].astype(np.float32)
        curves *= np.float32(fp[index] / 60.0)
    return out


def noise_sd(curves: np.ndarray) -> np.ndarray:
    """Robust white-noise SD of each curve ``[P, T]`` from its second differences."""
    second = np.abs(np.diff(np.asarray(curves, dtype=np.float32), n=2, axis=1))
    return np.median(second, axis=1).astype(np.float64) / 0.6745 / np.sqrt(6.0)


def _coarse_search(
    coefficients: np.ndarray, table: np.ndarray, n_starts: int, penalty: np.ndarray, variance: np.ndarray,
    delay_centre: np.ndarray | None = None, stride: Sequence[int] = (2, 2, 2, 2, 2),
) -> np.ndarray:
    """Best ``n_starts`` entries on every ``stride``-th grid point per axis (default every
    other), grid coordinates ``[P, S, D]``.

    Cost per pixel and entry: ``|y - l|^2 + variance * penalty`` (``penalty`` on the grid),
    up to the pixel's constant ``|y|^2``: one matrix product of ``[y, 1, variance]`` with
    ``[-2 l, |l|^2, penalty]`` per block of pixels, then ``n_starts`` argmin passes (much
    cheaper than a partial sort). With per-pixel delay centres (grid coordinates of the last
    axis) each pixel is searched only at the coarse delay nearest its centre (the refinement
    then moves the delay).
    """
    stride = np.asarray(stride, dtype=np.int64)
    step = tuple(slice(None, None, int(k)) for k in stride)
    coarse = table[step]
    coarse_penalty = penalty[step]
    n_delays = coarse.shape[-2]
    if delay_centre is None:
        groups = {None: np.arange(coefficients.shape[0])}
    else:
        nearest = np.clip(np.rint(np.asarray(delay_centre) / stride[-1]), 0, n_delays - 1).astype(np.int64)
        groups = {int(g): np.flatnonzero(nearest == g) for g in np.unique(nearest)}
    best = np.empty((coefficients.shape[0], n_starts, table.ndim - 1), dtype=np.int64)
    tasks = []
    for group, pixels in groups.items():
        sub = coarse if group is None else coarse[..., group : group + 1, :]
        flat = sub.reshape(-1, table.shape[-1]).astype(np.float64)
        flat_penalty = (coarse_penalty if group is None else coarse_penalty[..., group : group + 1]).ravel()
        entries = np.concatenate([-2.0 * flat, np.sum(flat**2, axis=1)[:, None], flat_penalty[:, None]], axis=1)
        entries = np.ascontiguousarray(entries.T, dtype=np.float32)  # [R + 2, E]
        block = max(64, COARSE_BLOCK_COSTS // max(flat.shape[0], 1))
        tasks += [(group, sub.shape[:-1], entries, pixels[start : start + block])
                  for start in range(0, pixels.size, block)]

    def search(task: tuple) -> None:  # writes disjoint rows of ``best``
        group, sub_shape, entries, chosen = task
        augmented = np.concatenate(
            [coefficients[chosen], np.ones((chosen.size, 1)), variance[chosen, None]], axis=1
        ).astype(np.float32)
        cost = augmented @ entries  # [B, E]
        index = np.empty((chosen.size, n_starts), dtype=np.int64)
        rows = np.arange(chosen.size)
        for k in range(n_starts):
            index[:, k] = np.argmin(cost, axis=1)
            if k + 1 < n_starts:
                cost[rows, index[:, k]] = np.inf
        grid_index = np.stack(np.unravel_index(index, sub_shape), axis=-1)
        if group is not None:
            grid_index[..., -1] = group
        best[chosen] = stride * grid_index

    # the blocks run on the refinement's thread pool (numpy releases the GIL in the product
    # and the argmin passes)
    if len(tasks) > 1:
        list(thread_pool().map(search, tasks))
    else:
        for task in tasks:
            search(task)
    return best


@dataclass(frozen=True)
class AifTable:
    """The table for one AIF: PCA coefficients ``[nfp, nps, nvp, nvisf, ndelay, R]`` (float32),
    the basis ``[T, R]``, the delays (s) and the prior penalty on the grid."""

    coefficients: np.ndarray
    basis: np.ndarray
    delays: np.ndarray
    penalty: np.ndarray


def fine_grid(grid_s: np.ndarray, upsample: int) -> np.ndarray:
    """Times (s) float64 ``[upsample * T]`` of the fine grid of a uniform grid ``grid_s`` ``[T]``:
    ``grid_s[0] + k dt / upsample`` (the grid of :func:`aif_on_fine_grid`, :func:`fine_table_curves`
    and :func:`tissue_sampling`)."""
    grid_s = np.asarray(grid_s, dtype=np.float64)
    return grid_s[0] + float(grid_s[1] - grid_s[0]) / upsample * np.arange(upsample * grid_s.size)


def _prior_penalty(grid_shape: tuple[int, ...], settings: BtexSettings) -> np.ndarray:
    """The Gaussian prior's penalty on every table cell ``grid_shape`` (grid axes then delays)."""
    centre, precision = settings.prior_in_cells()
    # a sum of one broadcast term per axis (no full-size coordinate grids): per cell the same
    # float64 operations in the same order as over meshgrid coordinates, about 10 times faster
    penalty = np.zeros(grid_shape, dtype=np.float64)
    for axis, (size, c, p) in enumerate(zip(grid_shape, centre, precision)):
        shape = [1] * len(grid_shape)
        shape[axis] = size
        penalty += (p * (np.arange(size, dtype=np.float64) - c) ** 2).reshape(shape)
    return penalty


def aif_on_fine_grid(sample_time_s: np.ndarray, plasma_mmol_l: np.ndarray, grid_s: np.ndarray,
                     upsample: int = 4, *, smoothing: Literal["none", "gcv"] = "none") -> np.ndarray:
    """Plasma AIF (mmol/L) ``[upsample * T]`` at ``grid_s[0] + k dt / upsample`` from its samples.

    ``sample_time_s`` / ``plasma_mmol_l`` ``[S]``: the AIF at its acquisition times (once per
    heartbeat, s), ``grid_s`` ``[T]`` the uniform grid of the fit (step dt). A cubic spline
    (not-a-knot) through the samples, held at the end values outside them and clipped at 0: the
    blood curve is smooth, and linear interpolation of heartbeat samples cuts its peak, which the
    BTEX fit reads as higher flow at stress (docs/mapping.md, "High flow").

    ``smoothing = "gcv"``: a cubic smoothing spline instead of the interpolating one, its
    smoothness chosen by generalised cross-validation (Craven & Wahba, Numer. Math. 1979;31:377;
    ``scipy.interpolate.make_smoothing_spline``), needs >= 5 samples. An interpolating spline
    passes through every noisy sample, and the tallest of the noisy samples of the first pass
    becomes the AIF's peak: on 34 dev chain AIFs (docs/mapping.md, "Session 11"; the noisiest
    from 8-pixel pools, 16 % frame-to-frame scatter) the peak read +2.4 % high and the first-pass
    RMS error was 4.0 % of the peak; with the GCV spline -0.1 % and 3.4 %. Noise-free samples come
    back within 0.5 % of the peak (GCV then chooses almost no smoothing).
    """
    import scipy.interpolate

    sample_time_s = np.asarray(sample_time_s, dtype=np.float64)
    plasma = np.asarray(plasma_mmol_l, dtype=np.float64)
    grid_s = np.asarray(grid_s, dtype=np.float64)
    if upsample < 1 or grid_s.size < 2:
        raise ValueError(f"need upsample >= 1 and a grid of >= 2 points, got {upsample} and {grid_s.size}")
    if smoothing not in ("none", "gcv"):
        raise ValueError(f"smoothing must be 'none' or 'gcv', got {smoothing!r}")
    fine = fine_grid(grid_s, upsample)
    if smoothing == "gcv":
        if sample_time_s.size < 5:
            raise ValueError(f"a GCV smoothing spline needs at least 5 AIF samples, got {sample_time_s.size}")
        spline = scipy.interpolate.make_smoothing_spline(sample_time_s, plasma)
    else:
        spline = scipy.interpolate.CubicSpline(sample_time_s, plasma, extrapolate=False)
    values = spline(np.clip(fine, sample_time_s[0], sample_time_s[-1]))
    return np.maximum(values, 0.0)


def build_aif_table(aif: np.ndarray, dt_s: float, settings: BtexSettings, *, upsample: int = 1) -> AifTable:
    """Tissue curves of the whole grid for this AIF, every delay, compressed (see module doc).

    ``upsample = 1``: ``aif`` ``[T]`` on the fit's grid (step ``dt_s``), taken as linear between
    its samples (hat weights). ``upsample = k > 1``: ``aif`` ``[k T]`` on a k times finer grid
    (:func:`aif_on_fine_grid`); the convolution and the delay shifts run on that grid and the
    curves are taken at every k-th sample, i.e. the table is on the same ``[T]`` grid as the
    tissue curves. With a 0.5 s grid the hat-weight model of a linearly interpolated AIF differs
    from the continuous model by ~0.1-0.3 % of the tissue peak at stress, enough to move a flat
    Fp / Vp / delay valley by +15 to +40 % at Fp 3-3.5 (docs/mapping.md, "High flow").
    """
    if upsample < 1 or aif.size % upsample:
        raise ValueError(f"upsample must be >= 1 and divide the AIF length {aif.size}, got {upsample}")
    fine_dt = dt_s / upsample
    n_grid = aif.size // upsample
    base = _table_curves(aif, fine_dt, settings)  # [nfp, nps, nvp, nvisf, k T]
    delays = np.arange(0.0, settings.delay_max_s + 1e-9, settings.delay_step_s)
    flat = base.reshape(-1, aif.size)
    shifted = np.stack([flow_models.shift_curves(flat, d, fine_dt)[:, ::upsample] for d in delays], axis=1)
    # principal components of the table curves (uncentred), via the T x T Gram matrix of a
    # regular subsample (every 7th curve: all shapes and delays are represented)
    stacked = shifted.reshape(-1, n_grid)
    sample = np.ascontiguousarray(stacked[::7])
    _, vectors = np.linalg.eigh(sample.T @ sample)
    basis = vectors[:, ::-1][:, : settings.n_components]  # [T, R]
    table = (stacked @ basis).reshape(*base.shape[:-1], delays.size, basis.shape[1]).astype(np.float32)
    return AifTable(table, basis, delays, _prior_penalty(table.shape[:-1], settings))


def fine_table_curves(aif_fine: np.ndarray, fine_dt_s: float, settings: BtexSettings) -> np.ndarray:
    """Tissue curves of the whole grid at zero delay on a fine grid, float32 ``[nfp, nps, nvp, nvisf, K]``.

    ``aif_fine`` ``[K]``: the plasma AIF (mmol/L) on a grid of step ``fine_dt_s`` (s) from the fit
    grid's first point (:func:`aif_on_fine_grid`), zero before it. The convolution is the
    hat-weight one of :func:`build_aif_table`, on the fine grid: a cubic AIF between heartbeat
    samples convolved at ``dt / 4`` is within 0.4-1.3e-4 mmol/L of the continuous model, the
    linear AIF at ``dt`` 11-33e-4 (docs/mapping.md, "High flow"). Shared by every slice of a scan;
    :func:`sampled_aif_table` takes it to each slice's sampling.
    """
    return _table_curves_float32(np.asarray(aif_fine, dtype=np.float64), fine_dt_s, settings)


def sampled_aif_table(curves_fine: np.ndarray, fine_dt_s: float, sampling: np.ndarray,
                      settings: BtexSettings) -> AifTable:
    """The table of :func:`build_aif_table` for curves that were SAMPLED like the tissue data.

    Args:
        curves_fine: float32 ``[nfp, nps, nvp, nvisf, K]`` from :func:`fine_table_curves`.
        fine_dt_s: step of the fine grid (s).
        sampling: float ``[T, K]`` linear map from a curve on the fine grid to the tissue samples
            on the fit grid: e.g. taken at the slice's acquisition times and then linearly
            interpolated onto the uniform grid as ``temporal-resample`` does
            (``resample.interpolation_matrix`` twice); every ``k``-th fine sample for a curve
            acquired on the grid itself.
        settings: the grid, delays, components and priors.

    Each delay is a shift on the fine grid (linear interpolation, zero before the start), then
    the sampling; the table holds the principal-component coefficients only (the shifted, sampled
    curves of the whole table are never formed: the basis comes from a regular subsample, then
    one product ``[curves, K] @ [K, delays * R]``). Modelling the tissue's sampling removes the
    blur of linear interpolation between heartbeats that otherwise reads high flow low once the
    AIF is modelled finely (docs/mapping.md, "The per-slice sampled table").
    """
    sampling = np.asarray(sampling, dtype=np.float64)
    n_fine = curves_fine.shape[-1]
    if sampling.ndim != 2 or sampling.shape[1] != n_fine:
        raise ValueError(f"sampling must be [T, {n_fine}] (fine curves have {n_fine} samples), got {sampling.shape}")
    delays = np.arange(0.0, settings.delay_max_s + 1e-9, settings.delay_step_s)
    operators = [_shifted_sampling(sampling, d / fine_dt_s) for d in delays]  # [T, K] each
    flat = curves_fine.reshape(-1, n_fine)
    # basis: each delay on its own regular subsample of the curves (about 9,000 sampled curves in all)
    stride = max(1, (7 * delays.size) // 2)
    sample = np.concatenate([(flat[j % stride :: stride] @ op.T.astype(np.float32)).astype(np.float64)
                             for j, op in enumerate(operators)])
    _, vectors = np.linalg.eigh(sample.T @ sample)
    basis = vectors[:, ::-1][:, : settings.n_components]  # [T, R]
    projection = np.concatenate([op.T @ basis for op in operators], axis=1).astype(np.float32)  # [K, D R]
    table = (flat @ projection).reshape(*curves_fine.shape[:-1], delays.size, basis.shape[1])
    return AifTable(np.ascontiguousarray(table, dtype=np.float32), basis, delays,
                    _prior_penalty(table.shape[:-1], settings))


def _shifted_sampling(sampling: np.ndarray, shift_samples: float) -> np.ndarray:
    """``sampling @ D``, D the delay by ``shift_samples`` fine samples (linear interpolation, zero
    before the start, ``flow_models.shift_curves``): a delayed curve is ``(1 - f) c[i - m] + f c[i - m - 1]``
    (``m + f`` the shift), so column ``k`` of the product is ``(1 - f) S[:, k + m] + f S[:, k + m + 1]``."""
    whole, frac = divmod(float(shift_samples), 1.0)
    if frac > 1.0 - 1e-9:
        whole, frac = whole + 1.0, 0.0
    whole = int(whole)
    n = sampling.shape[1]
    padded = np.concatenate([sampling, np.zeros((sampling.shape[0], whole + 2))], axis=1)
    return (1.0 - frac) * padded[:, whole : whole + n] + frac * padded[:, whole + 1 : whole + 1 + n]


def tissue_sampling(grid_s: np.ndarray, acquired_s: np.ndarray | None, upsample: int) -> np.ndarray:
    """The ``sampling`` matrix of :func:`sampled_aif_table`, float64 ``[T, upsample * T]``.

    ``grid_s`` ``[T]``: the uniform fit grid (s); ``acquired_s`` ``[F]``: the slice's acquisition
    times (s) before ``temporal-resample``, or None for a curve acquired on the grid. A fine-grid
    curve (step ``dt / upsample`` from ``grid_s[0]``, zero before) is taken at the acquisition
    times and linearly interpolated onto the grid (as ``resample.resample_series``); acquisition
    times past the fine grid's end hold its last value (a slowly varying tail).
    """
    from perfline.toolbox.resample import interpolation_matrix

    grid_s = np.asarray(grid_s, dtype=np.float64)
    fine_t = fine_grid(grid_s, upsample)
    if acquired_s is None:
        return interpolation_matrix(fine_t, grid_s)
    acquired_s = np.asarray(acquired_s, dtype=np.float64)
    return interpolation_matrix(acquired_s, grid_s) @ interpolation_matrix(fine_t, acquired_s, left=0.0)


def fit_btex_curves(
    curves: np.ndarray, aif: np.ndarray, dt_s: float, settings: BtexSettings,
    *, delay_prior_s: np.ndarray | None = None, delay_prior_sd_s: float = 0.25,
    aif_table: AifTable | None = None, spillover_curves: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Fit ``[P, T]`` tissue curves; returns mbf/ps/vp/visf/delay/fit_rmse arrays ``[P]``.

    ``delay_prior_s`` ([P], s) adds a Gaussian prior on each pixel's delay (SD
    ``delay_prior_sd_s``), e.g. from a fit of the spatially smoothed series. ``aif_table``
    (from ``build_aif_table`` with the same AIF and settings) avoids rebuilding it.
    ``spillover_curves`` ``[K, T]`` (mmol/L, e.g. :func:`blood_pool_curves`): each pixel's model is
    the BTEX curve plus ``sum_k s_k b_k(t)`` with fractions ``s_k >= 0`` (blood spill-over,
    :func:`_fit_with_spillover`); the fractions come back as ``"spillover"`` ``[P, K]``.
    """
    prepared = aif_table if aif_table is not None else build_aif_table(aif, dt_s, settings)
    spillover = None if spillover_curves is None else SpilloverModel.of(prepared, spillover_curves)
    return _fit_values(curves, prepared, settings, delay_prior_s, delay_prior_sd_s, spillover)


def _fit_values(curves: np.ndarray, prepared: AifTable, settings: BtexSettings, delay_prior_s: np.ndarray | None,
                delay_prior_sd_s: float, spillover: SpilloverModel | None,
                spillover_active: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """:func:`fit_btex_curves` on a prepared table (and spill-over model; ``spillover_active`` ``[P, K]``:
    which regressors may act on each curve, default all)."""
    names = ("mbf_ml_min_g", "ps_ml_min_g", "vp", "visf", "delay_s", "fit_rmse")
    result = {name: np.full(curves.shape[0], np.nan) for name in names}
    fittable, position, rmse, fractions = _fit_positions(curves, prepared, settings, delay_prior_s, delay_prior_sd_s,
                                                         spillover, spillover_active)
    axes = (*settings.axes(), prepared.delays)
    values = [grid_value(axis, position[:, i], log=i < 2) for i, axis in enumerate(axes)]
    for name, value in zip(names[:5], values):
        result[name][fittable] = value
    result["fit_rmse"][fittable] = rmse
    if fractions is not None:
        result["spillover"] = np.full((curves.shape[0], fractions.shape[1]), np.nan)
        result["spillover"][fittable] = fractions
    return result


@dataclass
class SpilloverModel:
    """The spill-over regressors of one table: ``full_basis`` ``[T, R + K']`` (the table's basis
    extended by the regressors' part outside it), ``gram`` ``[R + K', K]`` (the regressors in that
    basis) and, per active set of regressors, the orthonormal complement of their columns and the
    table projected onto it in ``projected``: a mutable cache, filled on first use by
    :meth:`complement` and shared by the smoothed pre-fit and the pixel fit of one slice (which is
    why the model is not frozen; build one per table with :meth:`of`)."""

    table: AifTable
    full_basis: np.ndarray
    gram: np.ndarray
    projected: dict[tuple[bool, ...], tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    @classmethod
    def of(cls, table: AifTable, spillover_curves: np.ndarray) -> SpilloverModel:
        basis = table.basis.astype(np.float64)
        regressors = np.atleast_2d(np.asarray(spillover_curves, dtype=np.float64))  # [K, T]
        if regressors.ndim != 2 or regressors.shape[1] != basis.shape[0]:
            raise MappingInputError(f"spillover_curves must be [K, {basis.shape[0]}] (the table's time samples), "
                                    f"got {regressors.shape}")
        if not np.all(np.isfinite(regressors)):
            bad = np.flatnonzero(~np.all(np.isfinite(regressors), axis=1)).tolist()
            raise MappingInputError(f"spillover_curves must be finite, found NaN or inf in regressor(s) {bad}")
        outside = regressors.T - basis @ (basis.T @ regressors.T)  # [T, K]
        # an orthonormal basis of the span of the outside parts: the SVD keeps every direction some
        # regressor needs (unpivoted QR can drop a column a later regressor needs when one outside
        # part is ~0, and the dropped column is then not orthogonal to the rest)
        u, singular, _ = np.linalg.svd(outside, full_matrices=False)
        keep = singular > 1e-6 * max(float(np.linalg.norm(regressors)), 1e-12)
        full_basis = np.concatenate([basis, u[:, keep]], axis=1)
        return cls(table, full_basis, full_basis.T @ regressors.T)

    def complement(self, active: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(orthonormal complement ``[R + K', W]`` of the active regressors, the table's coefficients
        on it ``[*grid, W]`` float32); with no active regressor the table itself (the regressors'
        outside parts are a constant of the cost)."""
        key = tuple(bool(a) for a in active)
        if key not in self.projected:
            n_components = self.table.basis.shape[1]
            width = self.full_basis.shape[1]
            pools = np.flatnonzero(active)
            if pools.size:
                u, singular, _ = np.linalg.svd(self.gram[:, pools], full_matrices=True)
                complement = u[:, int(np.sum(singular > 1e-9 * singular.max())):]
                table = self.table.coefficients
                # the table has no part outside its basis: only the first R rows of the complement act
                projected = (table.reshape(-1, n_components) @ complement[:n_components].astype(np.float32))
                projected = np.ascontiguousarray(projected.reshape(*table.shape[:-1], complement.shape[1]))
            else:
                complement = np.eye(width)[:, :n_components]
                projected = self.table.coefficients
            self.projected[key] = (complement, projected)
        return self.projected[key]


def _search_and_refine(coefficients: np.ndarray, table: np.ndarray, penalty: np.ndarray, variance: np.ndarray,
                       pixel_centre: np.ndarray, precision: np.ndarray, delay_centre: np.ndarray | None,
                       settings: BtexSettings) -> GridFit:
    """Global search then refinement of coefficients ``[P, R]`` on ``table`` ``[*grid, R]``."""
    starts = _coarse_search(coefficients, table, settings.n_starts, penalty, variance, delay_centre,
                            settings.coarse_stride).astype(np.float64)
    n_fit, n_starts, _ = starts.shape
    fit = refine_on_grid(coefficients, table, starts if n_starts > 1 else starts[:, 0], settings.iterations,
                         pixel_centre, precision, variance, settings.tolerance_cells,
                         first_iterations=settings.start_iterations)
    if fit.iterations.size:
        logger.debug("BTEX refinement: %d pixels, %d starts each, %.1f iterations per pixel on average",
                     n_fit, n_starts, fit.iterations.mean())
    return fit


def _fit_positions(
    curves: np.ndarray, prepared: AifTable, settings: BtexSettings, delay_prior_s: np.ndarray | None,
    delay_prior_sd_s: float, spillover: SpilloverModel | None = None, spillover_active: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """The fit of :func:`fit_btex_curves` in grid coordinates: (fitted mask [P], coordinates
    [F, 5] of the fitted pixels, their RMSE on the full curves [F], mmol/L, spill-over fractions
    [F, K] or None without ``spillover_curves``)."""
    fittable = np.max(curves, axis=1) > 0
    y = curves[fittable]
    sd = noise_sd(y)
    variance = np.maximum(sd, 0.25 * np.median(sd) + 1e-12) ** 2
    centre, precision = settings.prior_in_cells()
    pixel_centre = np.broadcast_to(centre, (y.shape[0], centre.size)).copy()
    if delay_prior_s is not None:
        pixel_centre[:, 4] = np.asarray(delay_prior_s, dtype=np.float64)[fittable] / settings.delay_step_s
        precision = precision.copy()
        precision[4] = (settings.delay_step_s / delay_prior_sd_s) ** 2
    delay_centre = pixel_centre[:, 4] if delay_prior_s is not None else None
    if spillover is not None:
        active = None if spillover_active is None else np.asarray(spillover_active, dtype=bool)[fittable]
        position, rmse, fractions = _fit_with_spillover(y, spillover, settings, variance, pixel_centre, precision,
                                                        delay_centre, active)
        return fittable, position, rmse, fractions
    table, basis = prepared.coefficients, prepared.basis
    coefficients = (y @ basis).astype(np.float32)
    fit = _search_and_refine(coefficients, table, prepared.penalty, variance, pixel_centre, precision, delay_centre,
                             settings)
    # residual on the full curves: the part outside the basis plus the misfit inside it
    projected = y @ basis
    outside = np.maximum(np.sum(y**2, axis=1) - np.sum(projected**2, axis=1), 0.0)
    inside = np.sum((projected - fit.value.astype(np.float64)) ** 2, axis=1)
    return fittable, fit.position, np.sqrt((outside + inside) / y.shape[1]), None


def _fit_with_spillover(
    y: np.ndarray, spillover: SpilloverModel, settings: BtexSettings, variance: np.ndarray, pixel_centre: np.ndarray,
    precision: np.ndarray, delay_centre: np.ndarray | None, active: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """BTEX fit of ``y`` ``[F, T]`` with nonnegative spill-over of the regressors of ``spillover``
    (``active`` ``[F, K]``: the regressors allowed per curve, default all).

    Model: ``y(t) = BTEX(t; Fp, PS, Vp, Visf, delay) + sum_k s_k b_k(t)``, ``s_k >= 0``. Blood of
    the LV / RV pools blurred into the myocardium by the images' point-spread function (or mixed
    into border pixels) is neither delayed nor dispersed like the Vp term of the LV AIF (the RV's
    arrives seconds before it), and BTEX matches it only with a faster transit, i.e. a higher Fp
    (docs/mapping.md, "Blood spill-over"). The linear fractions are eliminated exactly (variable
    projection): the table basis is extended by the part of the ``b_k`` outside it (the table
    curves are taken to lie in their basis, as everywhere in this module: PCA error 4e-4 mmol/L),
    and for an active set ``S`` of pools ``min_s |y - l - B_S s|^2 = |Q_S^T (y - l)|^2``, ``Q_S``
    an orthonormal basis of the complement of ``B_S``: the usual search and refinement on
    coefficients and table multiplied by ``Q_S`` (as many components as without spill-over when
    every pool is active). This is exact for the unconstrained fractions; nonnegativity by one
    refit without the pools that come out negative (approximate): pixels whose fractions at the
    fitted point include a negative one are fitted again without those pools (at most K + 1
    passes; a dropped pool is not re-admitted, so the result need not be the constrained
    optimum). Returns positions ``[F, 5]``, RMSE on the full curves ``[F]`` (mmol/L) and the
    fractions ``[F, K]`` (0 for pools not in the final set).
    """
    table = spillover.table
    n_pools, n_components = spillover.gram.shape[1], table.basis.shape[1]
    coefficients = y @ spillover.full_basis  # [F, R + K']
    position = np.zeros((y.shape[0], 5))
    fractions = np.zeros((y.shape[0], n_pools))
    model = np.zeros_like(coefficients)
    active = np.ones((y.shape[0], n_pools), dtype=bool) if active is None else active.copy()
    todo = np.arange(y.shape[0])
    for _ in range(n_pools + 1):
        if not todo.size:
            break
        patterns, group = np.unique(active[todo], axis=0, return_inverse=True)
        again = []
        for g, pattern in enumerate(patterns):
            pixels = todo[group.ravel() == g]
            complement, projected = spillover.complement(pattern)
            fit = _search_and_refine((coefficients[pixels] @ complement).astype(np.float32), projected,
                                     table.penalty, variance[pixels], pixel_centre[pixels], precision,
                                     None if delay_centre is None else delay_centre[pixels], settings)
            position[pixels] = fit.position
            model[pixels, :n_components] = interpolate_grid(table.coefficients, fit.position)[0]
            fractions[pixels] = 0.0
            pools = np.flatnonzero(pattern)
            if pools.size:
                solved, *_ = np.linalg.lstsq(spillover.gram[:, pools], (coefficients[pixels] - model[pixels]).T,
                                             rcond=None)
                fractions[np.ix_(pixels, pools)] = solved.T
                negative = np.any(solved.T < 0.0, axis=1)
                active[pixels[negative]] &= fractions[pixels[negative]] > 0.0
                again.append(pixels[negative])
        todo = np.concatenate(again) if again else np.zeros(0, dtype=np.int64)
    fractions = np.maximum(fractions, 0.0)
    beyond = np.maximum(np.sum(y**2, axis=1) - np.sum(coefficients**2, axis=1), 0.0)
    misfit = np.sum((coefficients - model - fractions @ spillover.gram.T) ** 2, axis=1)
    return position, np.sqrt((beyond + misfit) / y.shape[1]), fractions


def _smoothed_curves(prepared, sigma_px: float, subset: np.ndarray) -> np.ndarray:
    """Gaussian-smoothed curves ``[n, T]`` (float32) of the fitted pixels selected by
    ``subset`` (normalised convolution over all fitted pixels)."""
    size = int(np.prod(prepared.spatial_shape))
    n_time = prepared.curves.shape[1]
    image = np.zeros((n_time, size), dtype=np.float32)
    image[:, prepared.index] = prepared.curves.T
    support = np.zeros(size, dtype=np.float32)
    support[prepared.index] = 1.0
    shape = prepared.spatial_shape
    image = ndi.gaussian_filter(image.reshape(n_time, *shape), (0, sigma_px, sigma_px), mode="nearest")
    weight = ndi.gaussian_filter(support.reshape(shape), sigma_px, mode="nearest")
    wanted = prepared.index[subset]
    smoothed = image.reshape(n_time, size)[:, wanted] / np.maximum(weight.ravel()[wanted], 1e-6)
    return smoothed.T


def _core_of(prepared, erosion_px: int, shape: str = "cross") -> np.ndarray:
    """bool [P]: which fitted pixels lie at least ``erosion_px`` pixels inside the fitted region
    (``shape``: through edge neighbours, "cross", or all 8 neighbours, "square")."""
    region = np.zeros(prepared.spatial_shape, dtype=bool)
    rows, cols = np.unravel_index(prepared.index, prepared.spatial_shape)
    region[rows, cols] = True
    core = ndi.binary_erosion(region, EROSION_SHAPES[shape], iterations=erosion_px)
    return core[rows, cols]


def _nearest_fill(prepared, subset: np.ndarray, values: np.ndarray) -> np.ndarray:
    """[P] values of the fitted pixels: ``values`` on ``subset``, elsewhere the nearest subset pixel's."""
    image = np.zeros(prepared.spatial_shape)
    known = np.zeros(prepared.spatial_shape, dtype=bool)
    sub_rows, sub_cols = np.unravel_index(prepared.index[subset], prepared.spatial_shape)
    image[sub_rows, sub_cols] = values
    known[sub_rows, sub_cols] = True
    _, nearest = ndi.distance_transform_edt(~known, return_indices=True)
    rows, cols = np.unravel_index(prepared.index, prepared.spatial_shape)
    return image[nearest[0], nearest[1]][rows, cols]


def _smoothed_delay(prepared, settings: BtexSettings, sigma_px: float, aif_table: AifTable,
                    spillover: SpilloverModel | None = None, spillover_active: np.ndarray | None = None,
                    erosion_px: int = 0, erosion_shape: str = "cross") -> np.ndarray:
    """Delay (s) of every fitted pixel from a fit of the smoothed series.

    The smoothed series varies slowly, so only every ``SMOOTHED_STEP``-th (3rd) row and column
    is fitted; the other pixels get the bilinear interpolation of their fitted neighbours (a
    normalised convolution with a tent kernel, which respects the edge of the fitted region).
    ``erosion_px > 0``: the same on the pixels at least that far inside the fitted region (its
    core, eroded with ``erosion_shape``), every other pixel taking its nearest core pixel's delay
    (:func:`map_btex`).
    """
    if erosion_px > 0:
        core = _core_of(prepared, erosion_px, erosion_shape)
        if np.count_nonzero(core) >= MIN_PREFIT_CORE:
            inner = dataclasses.replace(prepared, index=prepared.index[core], curves=prepared.curves[core])
            delay = _smoothed_delay(inner, settings, sigma_px, aif_table, spillover,
                                    None if spillover_active is None else spillover_active[core])
            return _nearest_fill(prepared, core, delay)
        logger.debug("delay pre-fit: %d core pixels (< %d), pre-fit on every pixel", np.count_nonzero(core),
                     MIN_PREFIT_CORE)
    rows, cols = np.unravel_index(prepared.index, prepared.spatial_shape)
    step = SMOOTHED_STEP if sigma_px >= 1.0 else 1
    on_grid = (rows % step == 0) & (cols % step == 0)
    if not np.any(on_grid):
        on_grid[:] = True
    smoothed = _smoothed_curves(prepared, sigma_px, on_grid)
    fittable, position, _, _ = _fit_positions(smoothed, aif_table, settings, None, 0.25, spillover,
                                              None if spillover_active is None else spillover_active[on_grid])
    fit_rows, fit_cols = rows[on_grid][fittable], cols[on_grid][fittable]
    tent = 1.0 - np.abs(np.arange(1 - step, step)) / step  # linear interpolation between fitted rows
    kernel = np.outer(tent, tent)
    weights = np.zeros(prepared.spatial_shape)
    weights[fit_rows, fit_cols] = 1.0
    values = np.zeros(prepared.spatial_shape)
    values[fit_rows, fit_cols] = position[:, 4]
    spread_weights = ndi.convolve(weights, kernel, mode="constant")
    filled = ndi.convolve(values, kernel, mode="constant") / np.where(spread_weights > 0, spread_weights, 1.0)
    missing = spread_weights <= 0
    if np.any(missing[rows, cols]):
        # pixels with no fitted neighbour within one step (isolated bits of the mask): nearest
        _, nearest = ndi.distance_transform_edt(weights == 0, return_indices=True)
        filled = np.where(missing, values[nearest[0], nearest[1]], filled)
    return filled[rows, cols] * settings.delay_step_s


def blood_pool_curves(gd_series: np.ndarray, labels: np.ndarray, pool_labels: Sequence[int], *,
                      erosion_px: int = 1, min_pixels: int = 5) -> tuple[np.ndarray, tuple[int, ...]]:
    """Mean Gd curve of each blood pool of a slice: the regressors of the spill-over fit.

    ``gd_series`` ``[time, rows, cols]`` (mmol/L, baseline-subtracted as the tissue curves that are
    fitted); ``labels`` ``[rows, cols]`` (docs/conventions.md: 1 LV blood pool, 3 RV); each pool of
    ``pool_labels`` is eroded by ``erosion_px`` pixels (its own border is partial volume) and kept if
    at least ``min_pixels`` remain. The curves come from the same images as the tissue, so they carry
    exactly the slice's sampling, blur and motion correction. Returns (curves ``[K, time]``, the
    labels kept).
    """
    series = np.asarray(gd_series, dtype=np.float64)
    labels = np.asarray(labels)
    if series.ndim != 3 or labels.shape != series.shape[1:]:
        raise MappingInputError(f"need a [time, rows, cols] series and [rows, cols] labels, got {series.shape} "
                                f"and {labels.shape}")
    curves, kept = [], []
    for label in pool_labels:
        pool = labels == label
        if erosion_px > 0:
            pool = ndi.binary_erosion(pool, iterations=erosion_px)
        if pool.sum() >= min_pixels:
            curve = series[:, pool].mean(axis=1)
            if np.all(np.isfinite(curve)) and curve.max() > 0:
                curves.append(curve)
                kept.append(int(label))
    return np.asarray(curves, dtype=np.float64).reshape(len(curves), series.shape[0]), tuple(kept)


def spillover_reach(labels: np.ndarray, pools: Sequence[int], reach_px: float) -> np.ndarray | None:
    """Where each spill-over regressor may act: bool ``[K, rows, cols]``, the pixels within ``reach_px``
    (Euclidean distance, px) of pool ``pools[k]``'s label in ``labels`` ``[rows, cols]``.

    None when every pixel may take every term (``reach_px <= 0``) or when there is no pool (``pools``
    empty, e.g. :func:`blood_pool_curves` kept none: then there is no spill-over term at all). A pool
    label absent from ``labels`` gives an all-False row (its term acts nowhere).
    """
    if reach_px <= 0 or not len(pools):
        return None
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise MappingInputError(f"spillover_reach needs labels [rows, cols], got shape {labels.shape}")
    # (an absent label must be handled here: the distance transform of an image without a zero is not 'far')
    return np.stack([ndi.distance_transform_edt(labels != pool) <= reach_px if np.any(labels == pool)
                     else np.zeros(labels.shape, dtype=bool) for pool in pools])


def map_btex(
    gd_series: np.ndarray,
    aif_plasma_mmol_l: np.ndarray,
    dt_s: float,
    *,
    mask: np.ndarray | None = None,
    settings: BtexSettings | None = None,
    delay_smoothing_px: float = 1.5,
    delay_prior_sd_s: float = 0.25,
    delay_prefit_erosion_px: int = 0,
    delay_prefit_erosion_shape: str = "cross",
    aif_table: AifTable | None = None,
    spillover_curves: np.ndarray | None = None,
    spillover_masks: np.ndarray | None = None,
    simex: SimexOptions | None = None,
) -> FlowMaps:
    """Pixel-wise BTEX maps from tissue Gd ``[time, rows, cols]`` or ``[N, time]`` (mmol/L).

    ``aif_plasma_mmol_l`` is the plasma AIF ``[time]`` on the same uniform grid ``dt_s``.
    Returns MBF (= Fp, ml/min/g), PS (ml/min/g), Vp, Visf (ml/ml), delay (s) and fit RMSE
    (mmol/L), NaN outside ``mask``, for pixels with NaNs or with no enhancement.

    For an image series the bolus delay, which varies smoothly in space, is first fitted on
    the series smoothed with a Gaussian of ``delay_smoothing_px`` pixels; the pixel-wise fit
    then has a Gaussian prior (SD ``delay_prior_sd_s``, default 0.25 s) at that delay. This
    removes most of the delay / transit / flow trade-off of single noisy pixels. The smoothed
    fit's delay is not each pixel's own (a blend of neighbours): on the phantom it sits 0.03-0.6 s
    (median about 0.25 s) before the delay of the pixels' noise-free curves, and under noise a
    tight prior pulls the pixels there, to a lower flow, most at stress (docs/mapping.md, "The
    delay prior pulls stress flow down"). Most of that offset is the border: the smoothing carries
    the blood partial volume of the mask's edge pixels (whose curves rise with the blood, before the
    tissue) into every pixel within a few pixels of it. ``delay_prefit_erosion_px = k > 0`` smooths
    and fits only the pixels at least ``k`` pixels inside the mask (its core) and gives every other
    pixel the prior of its nearest core pixel (all pixels where the core has fewer than
    ``MIN_PREFIT_CORE`` pixels; docs/mapping.md "Session 27"). ``delay_prefit_erosion_shape``: "cross"
    erodes through edge neighbours only (a pixel that touches the edge at a corner stays in the core),
    "square" through the 8 neighbours (the core's pixels are then at least ``k`` pixels from the edge in
    every direction; the corner pixels next to the LV blood carry about 2.5 % blood, docs/mapping.md
    "Session 28"). ``delay_smoothing_px = 0`` (or ``[N, time]`` input)
    fits every pixel's delay freely. ``aif_table`` (from :func:`build_aif_table` of the
    same plasma AIF, ``dt_s`` and settings) skips building it again, e.g. for every slice of a scan.
    ``spillover_curves`` ``[K, time]`` (mmol/L, baseline-subtracted like the series, e.g. the
    slice's LV and RV blood-pool curves from :func:`blood_pool_curves`): every pixel's model gets
    nonnegative fractions of them (blood spill-over, :func:`_fit_positions`); the maps then carry
    ``spillover`` ``[K, rows, cols]``. ``spillover_masks`` (bool, ``[K, rows, cols]`` or ``[K, N]``):
    where each regressor may act (e.g. within a few pixels of its pool), default everywhere.
    ``simex``: correct the MBF map for the fit's noise bias (:func:`noise_bias.simex_ratio`: the
    ``simex.pixels`` refitted with antithetic pairs of white noise of the curves' median noise SD
    added, each with its own delay prior and spill-over terms as measured; the MBF map divided by
    the clipped ratio of the medians, ``FlowMaps.noise_bias``). PS, Vp and Visf are not corrected.
    """
    settings = settings or BtexSettings()
    if not (np.isfinite(delay_prior_sd_s) and delay_prior_sd_s > 0):
        raise MappingInputError(f"delay_prior_sd_s must be a positive number of seconds, got {delay_prior_sd_s}")
    if int(delay_prefit_erosion_px) != delay_prefit_erosion_px or delay_prefit_erosion_px < 0:
        raise MappingInputError(f"delay_prefit_erosion_px must be a whole number of pixels >= 0, got "
                                f"{delay_prefit_erosion_px}")
    if delay_prefit_erosion_shape not in EROSION_SHAPES:
        raise MappingInputError(f"delay_prefit_erosion_shape must be one of {tuple(EROSION_SHAPES)}, got "
                                f"{delay_prefit_erosion_shape!r}")
    prepared, aif = prepare_curves(gd_series, aif_plasma_mmol_l, dt_s, mask)
    if not prepared.index.size:
        return scatter_maps(prepared, "btex")
    if aif_table is None:
        aif_table = build_aif_table(aif, dt_s, settings)
    spillover = active = None
    if spillover_curves is not None and np.size(spillover_curves):
        spillover = SpilloverModel.of(aif_table, spillover_curves)
        if spillover_masks is not None:
            masks = np.asarray(spillover_masks, dtype=bool).reshape(spillover.gram.shape[1], -1)
            if masks.shape[1] != int(np.prod(prepared.spatial_shape)):
                raise MappingInputError(f"spillover_masks must be [K, *{prepared.spatial_shape}], got "
                                        f"{np.shape(spillover_masks)}")
            active = masks[:, prepared.index].T  # [P, K]
    delay_prior = None
    if delay_smoothing_px > 0 and len(prepared.spatial_shape) == 2:
        delay_prior = _smoothed_delay(prepared, settings, delay_smoothing_px, aif_table, spillover, active,
                                      erosion_px=int(delay_prefit_erosion_px),
                                      erosion_shape=delay_prefit_erosion_shape)
    values = _fit_values(prepared.curves, aif_table, settings, delay_prior, delay_prior_sd_s, spillover, active)
    if simex is None:
        return scatter_maps(prepared, "btex", **values)
    bias = _simex(prepared, values["mbf_ml_min_g"], simex, aif_table, settings, delay_prior, delay_prior_sd_s,
                  spillover, active)
    values["mbf_ml_min_g"] = values["mbf_ml_min_g"] / bias.applied
    return dataclasses.replace(scatter_maps(prepared, "btex", **values), noise_bias=bias)


def _simex(prepared, mbf: np.ndarray, simex: SimexOptions, aif_table: AifTable, settings: BtexSettings,
           delay_prior: np.ndarray | None, delay_prior_sd_s: float, spillover: SpilloverModel | None,
           active: np.ndarray | None) -> NoiseBias:
    """The SIMEX ratio of the fitted pixels in ``simex.pixels`` (``mbf`` [P]: their measured fit)."""
    chosen = np.arange(prepared.index.size)
    if simex.pixels is not None:
        pixels = np.asarray(simex.pixels, dtype=bool).reshape(-1)
        if pixels.size != int(np.prod(prepared.spatial_shape)):
            raise MappingInputError(f"simex.pixels must have the spatial shape {prepared.spatial_shape}, got "
                                    f"{np.shape(simex.pixels)}")
        chosen = np.flatnonzero(pixels[prepared.index])

    def refit(noisy: np.ndarray, which: np.ndarray) -> np.ndarray:
        rows = chosen[which]
        return _fit_values(noisy, aif_table, settings, None if delay_prior is None else delay_prior[rows],
                           delay_prior_sd_s, spillover, None if active is None else active[rows])["mbf_ml_min_g"]

    sd = float(np.median(noise_sd(prepared.curves)))
    bias = simex_ratio(prepared.curves[chosen], mbf[chosen], refit, sd, np.random.default_rng(simex.seed),
                       pairs=simex.pairs, max_pixels=simex.max_pixels,
                       upper_limit=SIMEX_TOP_FRACTION * settings.fp_range_ml_min_g[1])
    logger.debug("SIMEX: %d pixels, %d pair(s), noise SD %.4f mmol/L, ratio %.3f (applied %.3f)", bias.n_pixels,
                 bias.pairs, bias.noise_sd_mmol_l, bias.ratio, bias.applied)
    return bias
