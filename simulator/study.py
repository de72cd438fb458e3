"""One simulated perfusion study: every random parameter from a seed, and per-slice arrays.

:func:`sample_study` draws all parameters (recorded in :class:`StudyParameters`, so a study
regenerates bit for bit from its seed and options); :func:`slice_phantom` renders one slice's
truth and noise-free series at the reference (end-expiration) position; :func:`aif_phantom`
renders the dual-echo AIF series. The image-domain API (:mod:`perfline.simulator.image_study`)
and the k-space writer (:mod:`perfline.simulator.mrd`) build on these.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from perfline.simulator import anatomy as anat
from perfline.simulator import dynamics, motion, perfusion, signal
from perfline.toolbox.aha import aha_segment_map
from perfline.toolbox.bloch import SequenceParameters, saturation_time_ms

MYO_SHAPE = (144, 192)          # rows (E1) x cols (E0)
MYO_FOV_MM = (360.0, 270.0)     # x (readout), y (phase)
MYO_PIXEL_MM = 1.875
AIF_SHAPE = (48, 64)
AIF_PIXEL_MM = 5.625
MYO_SLICE_THICKNESS_MM = 8.0
AIF_SLICE_THICKNESS_MM = 10.0
MYO_SAMPLE_TIME_US = 5.0        # readout dwell time: 1042 Hz per pixel over 192 samples
AIF_SAMPLE_TIME_US = 10.0       # 1563 Hz per pixel over 64 samples (two echoes in a 2.4 ms TR)
N_PD_FRAMES = 3
AIF_ECHO_TIMES_MS = (0.76, 1.76)
BLOCK_GAP_MS = 5.0              # dead time between the images of one heartbeat
FIRST_BLOCK_MS = 10.0           # trigger delay of the first image (the AIF)


class SimulationSettingsError(ValueError):
    """Invalid simulator option."""


@dataclass(frozen=True)
class StudyParameters:
    """Every random and fixed parameter of one study."""

    seed: int
    kind: str
    field_strength_t: float
    n_slices: int
    n_frames: int                # saturation-recovery frames (PD frames come in addition)
    n_pd_frames: int
    acceleration: int
    n_coils: int
    flow_model: str
    anatomy: anat.AnatomyParameters
    perfusion: perfusion.PerfusionParameters
    bolus: dynamics.BolusParameters
    tissue: dynamics.TissueParameters
    breathing: motion.BreathingParameters
    timing: dynamics.Timing
    snr_blood_peak: float        # LV blood peak SR signal / noise SD in the combined image
    blood_inflow_fraction: float  # unsaturated inflowing blood in the myocardial slices (not the AIF)
    noise_seed: int
    motion_seed: int
    coil_seed: int

    @property
    def n_total_frames(self) -> int:
        return self.n_pd_frames + self.n_frames

    @property
    def myocardial_sequence(self) -> SequenceParameters:
        return SequenceParameters.myocardial(self.field_strength_t, acceleration=self.acceleration)

    @property
    def aif_sequence(self) -> SequenceParameters:
        return SequenceParameters.aif(self.field_strength_t, acceleration=aif_acceleration(self.acceleration))

    @property
    def levels(self) -> tuple[str, ...]:
        return tuple(anat.level_of_slice(k, self.n_slices) for k in range(self.n_slices))


def aif_acceleration(myocardial_acceleration: int) -> int:
    return 1 if myocardial_acceleration == 1 else 2


def sample_study(seed: int, *, kind: str | None = None, field_strength_t: float | None = None,
                 n_slices: int = 3, n_frames: int = 60, n_coils: int = 16, acceleration: int = 3,
                 flow_model: str = "btex") -> StudyParameters:
    """Draw a study. ``kind``/``field_strength_t`` None means random (50/50)."""
    if kind not in (None, "stress", "rest"):
        raise SimulationSettingsError(f"kind must be 'stress', 'rest' or None, got {kind!r}")
    if field_strength_t is not None and not any(abs(field_strength_t - f) < 1e-6 for f in (1.5, 3.0)):
        raise SimulationSettingsError(f"field_strength_t must be 1.5, 3.0 or None, got {field_strength_t}")
    if not 1 <= n_slices <= 8:
        raise SimulationSettingsError(f"n_slices must be 1-8, got {n_slices}")
    if not 10 <= n_frames <= 200:
        raise SimulationSettingsError(f"n_frames must be 10-200, got {n_frames}")
    if not 1 <= n_coils <= 64:
        raise SimulationSettingsError(f"n_coils must be 1-64, got {n_coils}")
    if acceleration not in (1, 3):
        raise SimulationSettingsError(f"acceleration must be 1 or 3, got {acceleration}")
    if flow_model not in ("btex", "fermi"):
        raise SimulationSettingsError(f"flow_model must be 'btex' or 'fermi', got {flow_model!r}")
    streams = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(8)]
    choice = streams[0]
    kind = kind or ("stress" if choice.random() < 0.5 else "rest")
    field = float(field_strength_t) if field_strength_t is not None else (1.5 if choice.random() < 0.5 else 3.0)
    timing = dynamics.sample_timing(streams[1], N_PD_FRAMES + n_frames, kind)
    first_sr_time = float(timing.trigger_s[N_PD_FRAMES])
    return StudyParameters(
        seed=int(seed), kind=kind, field_strength_t=field, n_slices=n_slices, n_frames=n_frames,
        n_pd_frames=N_PD_FRAMES, acceleration=acceleration, n_coils=n_coils, flow_model=flow_model,
        anatomy=anat.sample_anatomy(streams[2]), perfusion=perfusion.sample_perfusion(streams[3], kind),
        bolus=dynamics.sample_bolus(streams[4], kind, first_sr_time),
        tissue=dynamics.sample_tissue(streams[4], flow_model),  # type: ignore[arg-type]
        breathing=motion.sample_breathing(streams[5], kind), timing=timing,
        snr_blood_peak=float(streams[6].uniform(25.0, 80.0)),
        blood_inflow_fraction=float(streams[6].uniform(0.02, 0.10)),
        noise_seed=int(streams[7].integers(2**63)), motion_seed=int(streams[7].integers(2**63)),
        coil_seed=int(streams[7].integers(2**63)),
    )


def image_durations_ms(study: StudyParameters) -> tuple[float, float]:
    """Duration (ms) of the AIF image and of one myocardial image (TD + played lines * TR)."""
    aif, myo = study.aif_sequence, study.myocardial_sequence
    aif_ms = aif.saturation_delay_ms + math.ceil(aif.n_phase_encodes / aif.acceleration) * aif.tr_ms
    myo_ms = myo.saturation_delay_ms + math.ceil(myo.n_phase_encodes / myo.acceleration) * myo.tr_ms
    return aif_ms, myo_ms


def image_start_s(study: StudyParameters, series: str, slice_index: int = 0) -> np.ndarray:
    """Start (saturation pulse) time of every frame's image, s from the first R wave [T]."""
    aif_ms, myo_ms = image_durations_ms(study)
    if series == "aif":
        offset_ms = FIRST_BLOCK_MS
    else:
        offset_ms = FIRST_BLOCK_MS + aif_ms + BLOCK_GAP_MS + slice_index * (myo_ms + BLOCK_GAP_MS)
    return study.timing.trigger_s + offset_ms / 1000.0


def frame_times_s(study: StudyParameters, series: str, slice_index: int = 0) -> np.ndarray:
    """k-space-centre time (s) of every frame of a series [T] (PD frames first)."""
    seq = study.aif_sequence if series == "aif" else study.myocardial_sequence
    return image_start_s(study, series, slice_index) + saturation_time_ms(seq) / 1000.0


@dataclass(frozen=True)
class ContrastModel:
    fine_time_s: np.ndarray
    class_curves: dict[str, np.ndarray]      # Gd [T_fine] per tissue class except the LV wall
    myocardium: dynamics.MyocardialCurves


@functools.lru_cache(maxsize=8)
def _contrast_model_cached(study: StudyParameters) -> ContrastModel:
    end = float(study.timing.trigger_s[-1] + study.timing.rr_s[-1]) + 1.0
    fine = dynamics.fine_grid(end)
    lv = dynamics.blood_curves(fine, study.bolus)["lv"]
    myocardium = dynamics.MyocardialCurves(study.tissue, lv, study.bolus.hematocrit)
    curves = dynamics.tissue_curves_fine(fine, study.bolus, myocardium, study.perfusion.normal_mbf_ml_min_g)
    return ContrastModel(fine, curves, myocardium)


def contrast_model(study: StudyParameters) -> ContrastModel:
    return _contrast_model_cached(study)


@dataclass(frozen=True)
class SlicePhantom:
    """Truth and noise-free series of one myocardial slice at the reference position."""

    index: int
    level: str
    anatomy: anat.SliceAnatomy
    time_s: np.ndarray            # float64 [T]
    mbf: np.ndarray               # float32 [rows, cols], NaN outside the myocardium label
    aha_segments: np.ndarray      # uint8 [rows, cols]
    gd: np.ndarray | None         # float32 [T, rows, cols] fraction-weighted tissue Gd, mmol/L (None if not asked)
    clean: np.ndarray             # float32 [T, rows, cols] noise-free magnitude (no coil shading)


def slice_phantom(study: StudyParameters, index: int, *, with_gd: bool = True) -> SlicePhantom:
    """Render slice ``index``; ``with_gd=False`` skips the truth Gd series (image path speed)."""
    level = study.levels[index]
    sl = anat.render_slice(study.anatomy, level, MYO_SHAPE, MYO_PIXEL_MM)
    myo_fraction = sl.fractions["myocardium"]
    mbf_all = perfusion.mbf_map(study.perfusion, myo_fraction, sl.transmural_depth, sl.lv_center_rc,
                                sl.rv_insertion_deg, level)  # type: ignore[arg-type]
    time_s = frame_times_s(study, "myocardium", index)
    model = contrast_model(study)
    gd_by_class = {name: dynamics.sample_curves(model.fine_time_s, curve, time_s)
                   for name, curve in model.class_curves.items()}
    pixel_index = np.flatnonzero(myo_fraction)
    pixel_mbf = mbf_all.ravel()[pixel_index].astype(np.float64)
    myo_gd = dynamics.sample_curves(model.fine_time_s, model.myocardium.curves(pixel_mbf), time_s).T  # [T, N]
    gd_by_class["myocardium"] = np.zeros_like(time_s)
    clean = signal.render_series(sl, study.myocardial_sequence, gd_by_class, study.n_pd_frames, myocardium_gd=myo_gd,
                                 blood_inflow_fraction=study.blood_inflow_fraction)
    gd = None
    if with_gd:
        classes = [name for name in anat.TISSUE_CLASSES if name != "myocardium"]
        fractions = np.stack([sl.fractions[name].ravel() for name in classes])
        gd = (np.stack([gd_by_class[name] for name in classes], axis=1).astype(np.float32) @ fractions)
        gd[:, pixel_index] += (myo_gd * myo_fraction.ravel()[pixel_index][None, :]).astype(np.float32)
        gd = gd.reshape(-1, *MYO_SHAPE)
    labels = sl.labels
    mbf = np.where(labels == 2, mbf_all, np.nan).astype(np.float32)
    segments = aha_segment_map(labels == 2, sl.lv_center_rc, sl.rv_insertion_deg, level)  # type: ignore[arg-type]
    return SlicePhantom(index=index, level=level, anatomy=sl, time_s=time_s, mbf=mbf, aha_segments=segments,
                        gd=gd, clean=clean)


def aif_gd_truth(study: StudyParameters) -> tuple[np.ndarray, np.ndarray]:
    """(time_s [T], LV blood Gd mmol/L [T]) at the AIF k-space-centre times."""
    time_s = frame_times_s(study, "aif")
    lv = dynamics.blood_curves(time_s, study.bolus)["lv"]
    return time_s, lv


def aif_phantom(study: StudyParameters) -> tuple[np.ndarray, anat.SliceAnatomy]:
    """Noise-free AIF echoes float32 [echo, T, rows, cols] and the AIF slice anatomy.

    The AIF slice is a basal-level short-axis slice rendered on the 64 x 48 AIF grid; its
    myocardium follows the study's normal-flow curve.
    """
    sl = anat.render_slice(study.anatomy, "basal", AIF_SHAPE, AIF_PIXEL_MM)
    time_s = frame_times_s(study, "aif")
    model = contrast_model(study)
    gd_by_class = {name: dynamics.sample_curves(model.fine_time_s, curve, time_s)
                   for name, curve in model.class_curves.items()}
    gd_by_class["myocardium"] = gd_by_class["papillary"]
    echoes = [signal.render_series(sl, study.aif_sequence, gd_by_class, study.n_pd_frames, echo_time_ms=te)
              for te in AIF_ECHO_TIMES_MS]
    return np.stack(echoes), sl


def noise_sigma(study: StudyParameters) -> float:
    """Noise SD of the coil-combined image: LV blood peak SR signal / ``snr_blood_peak``.

    The reference signal is M0_blood * SR_blood(peak Gd) with the coil shading taken as 0.6
    (about its value at the heart for the default coil arrays).
    """
    sr_table, _ = signal.signal_table(study.myocardial_sequence, "blood")
    peak = signal.table_lookup(sr_table, np.array([study.bolus.lv_peak_mmol_l]))[0]
    return float(0.6 * signal.PROTON_DENSITY["lv_blood"] * peak / study.snr_blood_peak)


def aif_snr_gain(study: StudyParameters) -> float:
    """SNR of an AIF image voxel over a myocardial one for the same magnetization and coil shading.

    Per voxel, SNR is proportional to the voxel volume times the square root of the time spent
    sampling the image, (samples per readout x acquired phase encodes) x dwell time (Edelstein et al.,
    MRM 1986; Haacke et al., *Magnetic Resonance Imaging*, 1999, ch. 15), with the same receiver noise
    per unit bandwidth for both series. With the protocol's 5.625 x 5.625 x 10 mm AIF voxels (64 x 48,
    R = 2, 10 us dwell) against 1.875 x 1.875 x 8 mm myocardial voxels (192 x 144, R = 3, 5 us): 6.50
    (5.30 without acceleration). docs/simulator.md "AIF image noise from its voxels".
    """
    def sampling(shape: tuple[int, int], acceleration: int, dwell_us: float) -> float:
        return shape[1] * (shape[0] / acceleration) * dwell_us

    myo = MYO_PIXEL_MM**2 * MYO_SLICE_THICKNESS_MM * math.sqrt(
        sampling(MYO_SHAPE, study.acceleration, MYO_SAMPLE_TIME_US))
    aif = AIF_PIXEL_MM**2 * AIF_SLICE_THICKNESS_MM * math.sqrt(
        sampling(AIF_SHAPE, aif_acceleration(study.acceleration), AIF_SAMPLE_TIME_US))
    return aif / myo


def aif_noise_sigma(study: StudyParameters) -> float:
    """Noise SD of the coil-combined AIF image (R-fold recon, g = 1), in the units of :func:`noise_sigma`:
    the myocardial image's noise over :func:`aif_snr_gain`. Before 2026-11-29 (session 31) the AIF
    image had the myocardial image's noise SD, 6.5x too much for its voxels."""
    return noise_sigma(study) / aif_snr_gain(study)


def motion_fields(study: StudyParameters, series: str, index: int, shape: tuple[int, int], pixel_mm: float,
                  heart_rc: tuple[float, float]) -> motion.MotionField:
    """Pull-back motion model (pixels) of one series/slice, frames at its k-space-centre times."""
    rng = np.random.default_rng([study.motion_seed, 0 if series == "aif" else 1 + index])
    trace = motion.respiratory_trace(study.breathing, frame_times_s(study, series, index), rng)
    return motion.displacement_fields(study.breathing, trace, shape, pixel_mm, heart_rc, rng)


def coil_maps(study: StudyParameters, series: str, index: int, shape: tuple[int, int], pixel_mm: float,
              magnitude_only: bool = False) -> np.ndarray:
    """Coil sensitivities complex64 [coils, rows, cols] (float32 magnitudes if
    ``magnitude_only``); the same coil positions for every slice."""
    rng = np.random.default_rng(study.coil_seed)
    body = study.anatomy.body
    return signal.coil_sensitivities(study.n_coils, shape, pixel_mm, body.center_xy_mm, body.semi_axes_mm, rng,
                                     magnitude_only=magnitude_only)
