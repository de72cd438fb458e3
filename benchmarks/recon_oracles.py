"""Lab oracles for the myocardial recon of the ``perfusion`` chain (benchmarks only, never the server).

Inside :func:`myocardial_recon_oracle` the chain's ``perfusion-recon`` gadget keeps reading the
scan's k-space, but each myocardial slice comes out of it as the oracle makes it:

- ``"coil-maps"``: TSENSE unfolding with the simulator's TRUE coil sensitivities (pre-whitened
  like the data) instead of the maps the gadget calibrates from the time average of the
  interleaved frames. Everything else is the gadget's (unfolding, regularisation, low-rank filter).
  The TRUE maps cover the air too: more unknowns than the gadget's masked maps, more noise.
- ``"coil-maps-masked"``: the same, zeroed where the gadget's own calibration masks its maps (its
  ``coil_mask_fraction`` of the low-resolution RSS maximum): only the maps' values change.
- ``"image"``: the simulator's image-domain series of the slice (``image_study.image_slice``:
  the moving magnitude frames with the coil shading, no k-space), i.e. a perfect recon. Noise-free
  studies only (the image path's noise is not the k-space path's).
- ``"image-unwarped"``: the same frames moved back by the simulator's TRUE motion field (cubic
  B-spline, prefiltered), i.e. a perfect recon and a perfect motion correction of the simulator's
  moving frames; run it with ``perfusion-moco enabled = false`` (a chain directory variant).

What these measure (docs/preprocessing.md, "Where the tissue curves' error comes from (session 19)"):
on 16 noise-free dev stress scans the chain's sector error drops from 8.29 % to 6.51 % with the
TRUE coil maps alone; the interleaved time average of a breathing body is not one image, and the
maps calibrated from it are 1-3 % wrong over the heart and up to 20-37 % at the body's moving edges.
Through the noisy chain (100 dev scans) the masked TRUE maps take the sector error 9.07 -> 8.48 %.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np

ORACLES = ("coil-maps", "coil-maps-masked", "image", "image-unwarped")
# keyword arguments of reconstruct_compact that only its own calibration uses
_CALIBRATION_ONLY = ("virtual_coils", "mask_fraction", "n_pd_frames", "calibration", "map_fit_order",
                     "fit_pd_frames")


def true_myocardial_sensitivities(study: Any, slice_index: int, whitening: np.ndarray | None) -> np.ndarray:
    """The simulator's coil sensitivities of a myocardial slice, complex64 [coils, rows, cols], times the
    gadget's noise pre-whitening matrix ``whitening`` [coils, coils] (None: as simulated)."""
    from perfline.simulator import study as simulated

    sens = simulated.coil_maps(study, "myocardium", slice_index, simulated.MYO_SHAPE, simulated.MYO_PIXEL_MM)
    if whitening is not None:
        sens = np.einsum("dc,cyx->dyx", np.asarray(whitening), sens)
    return np.ascontiguousarray(sens, dtype=np.complex64)


def image_domain_frames(study: Any, slice_index: int, *, unwarp: bool) -> np.ndarray:
    """Noise-free image-domain frames float32 [time, rows, cols] of a myocardial slice (PD frames first):
    moving as simulated, or moved back by the TRUE field (``unwarp``; cubic B-spline, clipped at 0)."""
    import scipy.ndimage as ndi

    from perfline.simulator import image_study
    from perfline.simulator import study as simulated

    sl = image_study.image_slice(study, slice_index, noise=False, motion=True)
    frames = sl.signal.astype(np.float64)
    if unwarp:
        field = simulated.motion_fields(study, "myocardium", slice_index, simulated.MYO_SHAPE, simulated.MYO_PIXEL_MM,
                                        sl.lv_center_rc).displacement()
        rows, cols = np.mgrid[0:frames.shape[1], 0:frames.shape[2]].astype(np.float64)
        # the simulator samples frame t at y + d_t(y) (pull-back); sampling it at y - d_t(y) undoes that
        # to first order in the field's gradient (smooth breathing fields)
        frames = np.stack([ndi.map_coordinates(frames[t], [rows - field[t, 0], cols - field[t, 1]], order=3,
                                               mode="nearest") for t in range(frames.shape[0])])
    return np.maximum(frames, 0.0).astype(np.float32)


@contextlib.contextmanager
def myocardial_recon_oracle(study: Any, oracle: str) -> Iterator[None]:
    """Within the block, ``perfusion-recon`` reconstructs the myocardial slices of ``study`` with ``oracle``
    (one of :data:`ORACLES`); the AIF series is untouched. Patches the gadget module for the block's
    duration (not thread-safe across concurrent chains; a lab tool)."""
    from perfline.gadgets import perfusion_recon
    from perfline.toolbox.interleaved_recon import calibrate

    if oracle not in ORACLES:
        raise ValueError(f"oracle must be one of {ORACLES}, got {oracle!r}")
    local = threading.local()  # the recon runs series in worker threads: the slice index travels with the thread
    original_slice = perfusion_recon.PerfusionRecon._slice
    original_recon = perfusion_recon.reconstruct_compact

    def slice_with_index(self, buffer, slice_index, *args, **kwargs):  # noqa: ANN001, ANN202
        local.slice_index = slice_index
        try:
            return original_slice(self, buffer, slice_index, *args, **kwargs)
        finally:
            local.slice_index = None

    def recon(compact, offsets, accel, **kwargs):  # noqa: ANN001, ANN202
        index = getattr(local, "slice_index", None)
        if index is None:  # the AIF series
            return original_recon(compact, offsets, accel, **kwargs)
        if oracle in ("coil-maps", "coil-maps-masked"):
            sens = true_myocardial_sensitivities(study, index, kwargs.get("whitening"))
            if oracle == "coil-maps-masked":
                calibration = calibrate(compact, offsets, accel, whitening=kwargs.get("whitening"),
                                        virtual_coils=kwargs.get("virtual_coils"),
                                        n_pd_frames=kwargs.get("n_pd_frames", 0),
                                        mask_fraction=kwargs.get("mask_fraction", 0.05))
                sens = sens * np.any(calibration.sensitivities != 0, axis=0)[None]
            kept = {key: value for key, value in kwargs.items() if key not in _CALIBRATION_ONLY}
            return original_recon(compact, offsets, accel, sensitivities=sens, **kept)
        frames = image_domain_frames(study, index, unwarp=oracle == "image-unwarped")
        expected = (compact.shape[0], compact.shape[2] * accel, compact.shape[3])
        if frames.shape != expected:
            raise ValueError(f"slice {index}: the image path has {frames.shape} frames, the k-space {expected}")
        return frames

    perfusion_recon.PerfusionRecon._slice = slice_with_index
    perfusion_recon.reconstruct_compact = recon
    try:
        yield
    finally:
        perfusion_recon.PerfusionRecon._slice = original_slice
        perfusion_recon.reconstruct_compact = original_recon
