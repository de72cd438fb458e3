"""Ground-truth HDF5 of a simulated study: layout, writer and reader.

Layout (stable; all arrays on the reconstructed myocardial grid, 1.875 mm square pixels):

- file attributes: ``seed`` (int), ``kind`` ("stress"/"rest"), ``field_strength_t``,
  ``hematocrit``, ``pixel_spacing_mm``, ``flow_model``, ``n_pd_frames``, ``n_frames`` (SR), ``n_slices``,
  ``acceleration``, ``n_coils``, ``snr_blood_peak``, ``noise_sigma`` (SD of the combined image),
  ``aif_noise_sigma`` (the same for the AIF image, since session 31),
  ``format_version`` (1) and ``parameters_json`` (every random parameter of the study).
- ``/aif/time_s`` float64 [T], ``/aif/gd`` float32 [T]: LV blood Gd (mmol/L, whole blood)
  at the AIF k-space-centre times, PD frames included (T = PD + SR frames).
- ``/timing/trigger_s`` float64 [T], ``/timing/missed_trigger`` bool [T].
- ``/slices/<k>/`` for k = 0 .. S-1 (base to apex):
  ``labels`` uint8 [rows, cols] (0 background, 1 LV blood pool, 2 myocardium, 3 RV blood pool),
  ``mbf`` float32 [rows, cols] (ml/min/g, NaN outside the myocardium label),
  ``aha_segments`` uint8 [rows, cols] (0 or AHA 1-16),
  ``gd`` float32 [T, rows, cols] (partial-volume-weighted tissue Gd, mmol/L, reference position),
  ``time_s`` float64 [T] (k-space-centre times of this slice),
  ``motion`` float32 [T, 2, rows, cols] (pull-back displacement in pixels, (row, col):
  frame t shows at pixel p what the reference shows at p + motion[t, :, p]);
  attributes ``level`` ("basal"/"mid"/"apical"), ``rv_insertion_deg`` (anterior RV insertion,
  docs/conventions.md: degrees counter-clockwise as displayed from the +column direction,
  about ``lv_center_rc``), ``lv_center_rc`` (row, col).
- ``/segment_mbf`` float32 [16]: mean MBF of the myocardium-label pixels of AHA segments 1-16
  (NaN for a segment with no pixel, e.g. fewer than 3 slices).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import h5py
import numpy as np

from perfline.simulator import study as st

FORMAT_VERSION = 1


class TruthFormatError(ValueError):
    """A truth file that does not follow the documented layout."""


def _jsonable(value):  # noqa: ANN001, ANN202 - recursive converter
    if dataclasses.is_dataclass(value):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return value.item()
    return value


def parameters_json(study: st.StudyParameters) -> str:
    return json.dumps(_jsonable(study), sort_keys=True)


def segment_mbf(phantoms: list[st.SlicePhantom]) -> np.ndarray:
    """Mean MBF per AHA segment 1-16 over all slices, float32 [16] (NaN where absent)."""
    sums, counts = np.zeros(17), np.zeros(17)
    for phantom in phantoms:
        inside = phantom.aha_segments > 0
        seg = phantom.aha_segments[inside].astype(np.int64)
        sums += np.bincount(seg, weights=phantom.mbf[inside].astype(np.float64), minlength=17)
        counts += np.bincount(seg, minlength=17)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = sums / counts
    return np.where(counts > 0, mean, np.nan)[1:].astype(np.float32)


def write_truth(study: st.StudyParameters, path: str, phantoms: list[st.SlicePhantom] | None = None) -> None:
    """Write the ground truth of ``study`` (phantoms are rendered if not given)."""
    phantoms = phantoms if phantoms is not None else [st.slice_phantom(study, k) for k in range(study.n_slices)]
    aif_time, aif_gd = st.aif_gd_truth(study)
    with h5py.File(path, "w") as f:
        attrs = {"seed": study.seed, "kind": study.kind, "field_strength_t": study.field_strength_t,
                 "hematocrit": study.bolus.hematocrit, "pixel_spacing_mm": st.MYO_PIXEL_MM,
                 "flow_model": study.flow_model, "n_pd_frames": study.n_pd_frames, "n_frames": study.n_frames,
                 "n_slices": study.n_slices,
                 "acceleration": study.acceleration, "n_coils": study.n_coils,
                 "snr_blood_peak": study.snr_blood_peak, "noise_sigma": st.noise_sigma(study),
                 "aif_noise_sigma": st.aif_noise_sigma(study),
                 "format_version": FORMAT_VERSION, "parameters_json": parameters_json(study)}
        f.attrs.update(attrs)
        f.create_dataset("aif/time_s", data=aif_time.astype(np.float64))
        f.create_dataset("aif/gd", data=aif_gd.astype(np.float32))
        f.create_dataset("timing/trigger_s", data=study.timing.trigger_s)
        f.create_dataset("timing/missed_trigger", data=study.timing.missed_trigger)
        for phantom in phantoms:
            g = f.create_group(f"slices/{phantom.index}")
            g.create_dataset("labels", data=phantom.anatomy.labels, compression="gzip", compression_opts=1)
            g.create_dataset("mbf", data=phantom.mbf, compression="gzip", compression_opts=1)
            g.create_dataset("aha_segments", data=phantom.aha_segments, compression="gzip", compression_opts=1)
            g.create_dataset("gd", data=phantom.gd, compression="gzip", compression_opts=1, shuffle=True)
            g.create_dataset("time_s", data=phantom.time_s)
            field = st.motion_fields(study, "myocardium", phantom.index, st.MYO_SHAPE, st.MYO_PIXEL_MM,
                                     phantom.anatomy.lv_center_rc)
            g.create_dataset("motion", data=field.displacement(), compression="gzip", compression_opts=1, shuffle=True)
            g.attrs.update({"level": phantom.level, "rv_insertion_deg": float(phantom.anatomy.rv_insertion_deg),
                            "lv_center_rc": np.asarray(phantom.anatomy.lv_center_rc, dtype=np.float64)})
        f.create_dataset("segment_mbf", data=segment_mbf(phantoms))


@dataclass(frozen=True)
class TruthSlice:
    labels: np.ndarray
    mbf: np.ndarray
    aha_segments: np.ndarray
    gd: np.ndarray
    time_s: np.ndarray
    motion: np.ndarray
    level: str
    rv_insertion_deg: float
    lv_center_rc: tuple[float, float]


@dataclass(frozen=True)
class Truth:
    attrs: dict
    aif_time_s: np.ndarray
    aif_gd: np.ndarray
    slices: list[TruthSlice]
    segment_mbf: np.ndarray


def read_truth(path: str, *, load_series: bool = True) -> Truth:
    """Read a truth file; ``load_series=False`` skips the large ``gd`` and ``motion`` arrays."""
    with h5py.File(path, "r") as f:
        missing = [key for key in ("aif/time_s", "aif/gd", "slices", "segment_mbf") if key not in f]
        if missing:
            raise TruthFormatError(f"{path}: expected groups/datasets {missing} of the truth layout")
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
        slices = []
        for k in sorted(f["slices"], key=int):
            g = f["slices"][k]
            slices.append(TruthSlice(
                labels=g["labels"][()], mbf=g["mbf"][()], aha_segments=g["aha_segments"][()],
                gd=g["gd"][()] if load_series else np.empty(0, np.float32), time_s=g["time_s"][()],
                motion=g["motion"][()] if load_series else np.empty(0, np.float32),
                level=str(g.attrs["level"]), rv_insertion_deg=float(g.attrs["rv_insertion_deg"]),
                lv_center_rc=tuple(float(v) for v in g.attrs["lv_center_rc"])))
        return Truth(attrs=attrs, aif_time_s=f["aif/time_s"][()], aif_gd=f["aif/gd"][()], slices=slices,
                     segment_mbf=f["segment_mbf"][()])
