"""``perfusion-recon``: dual-sequence perfusion acquisitions -> AifSeries + one SliceSeries per slice.

Collects the whole scan (docs/simulator.md "MRD conventions"): encoding space 0 = myocardial
slices (``idx.slice``), encoding space 1 = the dual-echo AIF (``idx.contrast`` = echo),
``idx.repetition`` = frame (the first ``NumberOfPDFrames`` are proton-density frames), noise
scans flagged ``ACQ_IS_NOISE_MEASUREMENT``. Only the acquired lines are stored (time-interleaved
acceleration R: frame f holds lines ``(l - f) % R == 0``). At the end of the scan every series is
reconstructed with TSENSE (``perfline.toolbox.interleaved_recon``; noise pre-whitening and PCA
coil compression of the myocardial series to ``virtual_coils``, the AIF series by default with all
coils, ``aif_virtual_coils``; both AIF echoes with the same calibration so their ratio
stays unbiased) and emitted: the AIF first, then the slices. The myocardial series are then
filtered by a local low-rank (patch-wise temporal PCA) filter whose threshold comes from the
noise scan and the unfolding's g-factor: it removes most of the noise TSENSE amplifies and keeps
the components of the bolus and of the motion (docs/preprocessing.md). The AIF series is not
filtered (its noise level differs from the noise scan's on the simulator, and its curve is a
median over many blood-pool pixels anyway).

Frame times: the acquisition time of the k-space centre line (interpolated between the
acquired lines), in seconds from the first R wave (``acquisition_time_stamp`` -
``physiology_time_stamp`` of the first imaging readout; 2.5 ms ticks).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import ismrmrd
import numpy as np
from pydantic import Field, model_validator

from perfline.core.gadget import Gadget, GadgetError, GadgetSettings, register_gadget
from perfline.gadgets.perfusion_items import AifSeries, ImageGeometry, SliceSeries
from perfline.toolbox import sense_kernels
from perfline.toolbox.gd_conversion import user_parameters
from perfline.toolbox.interleaved_recon import (
    ReconError,
    calibrate,
    noise_whitening_matrix,
    reconstruct_compact,
    single_threaded_blas,
)

TICK_S = 0.0025
MYOCARDIAL_ENCODING = 0
AIF_ENCODING = 1


class PerfusionReconSettings(GadgetSettings):
    """Settings of ``perfusion-recon``."""

    prewhiten: bool = Field(True, description="noise pre-whitening when a noise scan is present")
    regularization: float = Field(1e-3, ge=0.0, le=1.0, description="SENSE Tikhonov lambda (relative)")
    max_frames: int = Field(400, ge=2, le=4096, description="largest repetition index accepted + 1")
    virtual_coils: int = Field(8, ge=0, le=128,
                               description="PCA coil compression of the myocardial series before unfolding "
                               "(0: keep all coils)")
    aif_virtual_coils: int = Field(
        0, ge=0, le=128, description="PCA coil compression of the AIF series (0: keep all coils; compression to "
        "8 picked the wrong blood pool on 2 of 8 held-out rest scans, docs/integration.md)")
    denoise_threshold: float = Field(
        1.0, ge=0.0, le=3.0, description="local low-rank filter of the myocardial series, in noise edges "
        "(0: off); needs the noise scan")
    coil_mask_fraction: float = Field(
        0.05, ge=0.0, lt=1.0, description="coil sensitivities of the myocardial series set to zero where the "
        "calibration's low-resolution root-sum-of-squares is under this fraction of its maximum (0: no mask; the "
        "5 % mask takes dark tissue for background and folds its signal onto the myocardium, "
        "toolbox/interleaved_recon.py coil_sensitivities; 0 read the dev MBF worse, docs/preprocessing.md "
        "'TSENSE sensitivity mask'); the perfusion chains: 0.02 with the fitted maps of coil_map_detail_mm)")
    aif_coil_mask_fraction: float = Field(
        0.05, ge=0.0, lt=1.0, description="the same for the AIF series")
    coil_calibration: Literal["time-average", "time-average+pd"] = Field(
        "time-average", description="what the myocardial series' coil maps are fitted to (with coil_map_detail_mm): "
        "the time average of the interleaved frames, or jointly that and the PD frames (one per offset at R = 3; "
        "under breathing the time average's offsets hold different mean positions and bolus samples, the PD frames "
        "only a few seconds' breathing; noise-free the frames are better, with the study's noise the three PD "
        "frames make the maps noisier: not run through the noisy chain, docs/preprocessing.md 'Fitted coil maps'); "
        "the PD frames are left out, with a warning, where they do not sample every offset")
    coil_map_detail_mm: float = Field(
        0.0, ge=0.0, le=500.0, description="coil sensitivities of the myocardial series fitted as band-limited "
        "maps with detail down to this length, mm (the order in cycles per field of view: field of view / this "
        "length, each axis; toolbox/interleaved_recon.py fitted_sensitivities); 0: the ratio of low-pass images. "
        "The perfusion chains: 35 mm with coil_mask_fraction 0.02 and flow-map vp_steps 21 (session-21 decision "
        "run, 200 new scans: global 6.69 -> 6.23 %, sectors 9.53 -> 8.72 %; without the finer Vp grid it read "
        "1.3 points higher, session 20; docs/integration.md)")
    denoise_patch_px: int = Field(16, ge=4, le=64, description="local low-rank filter patch width, pixels")
    workers: int = Field(2, ge=1, le=16, description="series reconstructed in parallel threads")
    balance_pd_frames: bool = Field(
        False, description="coil sensitivities from the time average with as many PD frames on every interleave "
        "offset (the surplus left out: 3 PD frames at R = 2 put two on the even lines, one on the odd, and leave a "
        "PD alias in the maps; toolbox/interleaved_recon.py calibration_kspace); no change where the PD count is a "
        "multiple of R")

    @model_validator(mode="after")
    def _check_calibration(self) -> PerfusionReconSettings:
        if self.coil_calibration != "time-average" and self.coil_map_detail_mm <= 0:
            raise ValueError(f"coil_calibration {self.coil_calibration!r} fits band-limited coil maps: it needs "
                             f"coil_map_detail_mm > 0, found {self.coil_map_detail_mm}")
        return self


@dataclass
class _SeriesBuffer:
    """Acquired lines of one image series (one slice, or one AIF echo), compact storage."""

    n_lines: int
    n_cols: int
    lines: dict[int, dict[int, np.ndarray]] = field(default_factory=dict)   # frame -> line -> [coils, kx]
    times: dict[int, dict[int, float]] = field(default_factory=dict)        # frame -> line -> s
    first: ismrmrd.AcquisitionHeader | None = None

    def add(self, acquisition: ismrmrd.Acquisition, frame: int, line: int, time_s: float) -> None:
        if not 0 <= line < self.n_lines:
            raise GadgetError(f"phase-encode line {line} outside the encoded matrix 0..{self.n_lines - 1}")
        data = acquisition.data
        if data.shape[1] != self.n_cols:
            raise GadgetError(f"readout of {data.shape[1]} samples, expected {self.n_cols} (encoded matrix x)")
        # the acquisition's own array (a view; no copy: 12,000 readouts per scan)
        self.lines.setdefault(frame, {})[line] = np.asarray(data, dtype=np.complex64)
        self.times.setdefault(frame, {})[line] = time_s
        if self.first is None:
            self.first = acquisition.getHead()


def _geometry(head: ismrmrd.AcquisitionHeader, encoding) -> ImageGeometry:  # noqa: ANN001 - xsd type
    fov = encoding.reconSpace.fieldOfView_mm
    matrix = encoding.reconSpace.matrixSize
    return ImageGeometry(
        field_of_view_mm=(float(fov.x), float(fov.y), float(fov.z)),
        position=tuple(float(v) for v in head.position),  # type: ignore[arg-type]
        read_dir=tuple(float(v) for v in head.read_dir),  # type: ignore[arg-type]
        phase_dir=tuple(float(v) for v in head.phase_dir),  # type: ignore[arg-type]
        slice_dir=tuple(float(v) for v in head.slice_dir),  # type: ignore[arg-type]
        patient_table_position=tuple(float(v) for v in head.patient_table_position),  # type: ignore[arg-type]
        pixel_spacing_mm=(float(fov.y) / int(matrix.y), float(fov.x) / int(matrix.x)),
    )


@register_gadget
class PerfusionRecon(Gadget):
    """Reconstruct the myocardial slices and the AIF series of a dual-sequence perfusion scan."""

    name = "perfusion-recon"
    Settings = PerfusionReconSettings
    accepts = (ismrmrd.Acquisition,)
    produces = (AifSeries, SliceSeries)
    settings: PerfusionReconSettings

    @classmethod
    def warm_up(cls, settings: PerfusionReconSettings, chain: Any,
                stop: threading.Event | None = None) -> str | None:
        """Compile the SENSE unfolding's loops at server start (or load them from numba's disk cache)."""
        started = time.perf_counter()
        sense_kernels.warm_compiled_unfolding()
        return f"SENSE unfolding loops: {time.perf_counter() - started:.2f} s"

    def process(self, items: Iterator[ismrmrd.Acquisition]) -> Iterator[AifSeries | SliceSeries]:
        header = self.context.header
        if header is None:
            raise GadgetError("perfusion-recon needs the MRD XML header (none was sent)")
        encodings = list(header.encoding or [])
        params = user_parameters(header)
        n_pd = int(params.get("NumberOfPDFrames", 0))
        if n_pd < 1:
            raise GadgetError("no PD frames: header user parameter NumberOfPDFrames is missing or 0; the "
                              "SR/PD surface-coil correction needs proton-density frames at the start")
        buffers: dict[tuple[int, int], _SeriesBuffer] = {}
        noise: list[tuple[np.ndarray, float]] = []   # (samples [coils, n], dwell time us)
        origin_s: float | None = None
        for acquisition in items:
            if acquisition.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT):
                noise.append((np.array(acquisition.data, dtype=np.complex64),
                              float(acquisition.sample_time_us)))
                continue
            space = int(acquisition.encoding_space_ref)
            if space not in (MYOCARDIAL_ENCODING, AIF_ENCODING) or space >= len(encodings):
                raise GadgetError(f"acquisition in encoding space {space}; the header declares "
                                  f"{len(encodings)} and perfusion uses 0 (myocardium) and 1 (AIF)")
            idx = acquisition.idx
            frame = int(idx.repetition)
            if frame >= self.settings.max_frames:
                raise GadgetError(f"repetition {frame} exceeds max_frames {self.settings.max_frames}")
            stamp_s = int(acquisition.acquisition_time_stamp) * TICK_S
            if origin_s is None:
                origin_s = stamp_s - int(acquisition.physiology_time_stamp[0]) * TICK_S
            key = (space, int(idx.slice) if space == MYOCARDIAL_ENCODING else int(idx.contrast))
            if key not in buffers:
                matrix = encodings[space].encodedSpace.matrixSize
                buffers[key] = _SeriesBuffer(n_lines=int(matrix.y), n_cols=int(matrix.x))
            buffers[key].add(acquisition, frame, int(idx.kspace_encode_step_1), stamp_s - origin_s)
        whitening = None
        noise_sd = None
        noise_dwell_us = 0.0
        if noise:
            samples = np.concatenate([n for n, _ in noise], axis=1)
            if self.settings.prewhiten:
                whitening = noise_whitening_matrix(samples)
            # whitening keeps the mean noise variance, so this is the level after it too
            noise_sd = float(np.sqrt(np.mean(np.abs(samples) ** 2)))
            noise_dwell_us = noise[0][1]
        elif self.settings.denoise_threshold > 0:
            self.log.warning("no noise scan in the stream: the low-rank filter is off (its threshold "
                             "needs the noise level)")
        myocardial = sorted(k[1] for k in buffers if k[0] == MYOCARDIAL_ENCODING)
        echoes = sorted(k[1] for k in buffers if k[0] == AIF_ENCODING)
        if not myocardial:
            raise GadgetError("no myocardial acquisitions (encoding space 0) in the stream")
        if not echoes:
            raise GadgetError("no AIF series: no acquisitions in encoding space 1 (the dual-echo AIF "
                              "images) were received")
        jobs = [(self._aif, (buffers, echoes, encodings[AIF_ENCODING], n_pd, whitening, params))]
        for slice_index in myocardial:
            buffer = buffers[(MYOCARDIAL_ENCODING, slice_index)]
            slice_noise_sd = None
            if noise_sd is not None and self.settings.denoise_threshold > 0:
                # noise power is proportional to the receiver bandwidth (1 / dwell time)
                dwell_us = float(buffer.first.sample_time_us) if buffer.first is not None else 0.0
                ratio = noise_dwell_us / dwell_us if dwell_us > 0 and noise_dwell_us > 0 else 1.0
                slice_noise_sd = noise_sd * float(np.sqrt(ratio))
            jobs.append((self._slice, (buffer, slice_index, encodings[MYOCARDIAL_ENCODING], n_pd, whitening,
                                       slice_noise_sd)))
        # series are independent: reconstructed by a small thread pool (numpy releases the GIL in
        # its FFTs and array arithmetic) and emitted in order, the AIF first, each as soon as it
        # and those before it are done
        with single_threaded_blas(), ThreadPoolExecutor(max_workers=self.settings.workers) as pool:
            futures = [pool.submit(job, *arguments) for job, arguments in jobs]
            try:
                # the scan's common time span (frame times only) while the pool reconstructs
                span = self._scan_time_span(buffers, n_pd)
                for future in futures:
                    yield replace(future.result(), scan_time_span_s=span)
            finally:
                for future in futures:
                    future.cancel()

    def _frames(self, buffer: _SeriesBuffer, what: str, *, warn: bool = True):  # noqa: ANN202
        """(frame numbers, sorted lines of each) of one series; a last frame the stream ended
        inside is dropped (logged when ``warn``)."""
        frames = sorted(buffer.lines)
        expected = list(range(frames[-1] + 1)) if frames else []
        missing = sorted(set(expected) - set(buffer.lines))
        if missing:
            raise GadgetError(f"{what}: frames {missing[:10]} missing (received {len(buffer.lines)} of "
                              f"{len(expected)})")
        lines_per_frame = [np.array(sorted(buffer.lines[f])) for f in expected]
        if len(expected) > 2 and lines_per_frame[-1].size < lines_per_frame[-2].size and \
                len({lines.size for lines in lines_per_frame[:-1]}) == 1:
            # the stream ended inside the last frame (a scan stopped early): that frame cannot be
            # reconstructed; the complete frames before it can
            if warn:
                self.log.warning("%s: the scan ended inside frame %d (%d of %d lines): that frame is "
                                 "dropped", what, expected[-1], lines_per_frame[-1].size,
                                 lines_per_frame[-2].size)
            expected, lines_per_frame = expected[:-1], lines_per_frame[:-1]
        return expected, lines_per_frame

    @staticmethod
    def _frame_times(buffer: _SeriesBuffer, expected: list[int], lines_per_frame: list[np.ndarray]) -> np.ndarray:
        """Acquisition time (s) of each frame: when its k-space centre line was (interpolated) acquired."""
        centre = buffer.n_lines // 2
        return np.array([float(np.interp(centre, lines, [buffer.times[frame][int(line)] for line in lines]))
                         for frame, lines in zip(expected, lines_per_frame)])

    def _scan_time_span(self, buffers: dict[tuple[int, int], _SeriesBuffer], n_pd: int
                        ) -> tuple[float, float] | None:
        """(start, end) s of the SR-frame times common to every series of the scan (the grid
        temporal-resample puts them all on), or None when a series is unusable (its own job
        raises the error)."""
        starts, ends = [], []
        aif_echoes = [k[1] for k in buffers if k[0] == AIF_ENCODING]
        for key, buffer in buffers.items():
            if key[0] == AIF_ENCODING and key[1] != min(aif_echoes):
                continue  # the AIF series' times are its first echo's
            try:
                expected, lines_per_frame = self._frames(buffer, "", warn=False)
            except GadgetError:
                return None
            times = self._frame_times(buffer, expected, lines_per_frame)[n_pd:]
            if times.size < 2:
                return None
            starts.append(float(times[0]))
            ends.append(float(times[-1]))
        return (max(starts), min(ends)) if starts else None

    def _compact(self, buffer: _SeriesBuffer, what: str, whitening: np.ndarray | None):  # noqa: ANN202
        """(compact [T, C, M, kx], offsets [T], R, time_s [T]) of one series."""
        expected, lines_per_frame = self._frames(buffer, what)
        counts = {lines.size for lines in lines_per_frame}
        if len(counts) != 1:
            raise GadgetError(f"{what}: inconsistent dimensions: frames hold {sorted(counts)} lines")
        n_reduced = counts.pop()
        if buffer.n_lines % n_reduced:
            raise GadgetError(f"{what}: {n_reduced} lines per frame do not divide the {buffer.n_lines}-line matrix")
        accel = buffer.n_lines // n_reduced
        offsets = np.array([lines[0] % accel for lines in lines_per_frame])
        for frame, lines in zip(expected, lines_per_frame):
            if not np.array_equal(lines, np.arange(lines[0] % accel, buffer.n_lines, accel)):
                raise GadgetError(f"{what}: frame {frame} does not sample every {accel}-th line "
                                  f"(found lines {lines[:6].tolist()}...)")
        first = buffer.lines[expected[0]][int(lines_per_frame[0][0])]
        compact = np.empty((len(expected), first.shape[0], n_reduced, buffer.n_cols), dtype=np.complex64)
        for t, (frame, lines) in enumerate(zip(expected, lines_per_frame)):
            for m, line in enumerate(lines):
                data = buffer.lines[frame][int(line)]
                if data.shape[0] != compact.shape[1]:
                    raise GadgetError(f"{what}: frame {frame} line {line} has {data.shape[0]} coils, "
                                      f"expected {compact.shape[1]}")
                compact[t, :, m] = data
        time_s = self._frame_times(buffer, expected, lines_per_frame)
        if not np.all(np.isfinite(compact.view(np.float32))):
            raise GadgetError(f"{what}: k-space contains NaN or infinite samples")
        if whitening is not None and whitening.shape[0] != compact.shape[1]:
            raise GadgetError(f"{what}: noise scan has {whitening.shape[0]} coils, data {compact.shape[1]}")
        return compact, offsets, accel, time_s

    def _slice(self, buffer: _SeriesBuffer, slice_index: int, encoding, n_pd: int,  # noqa: ANN001
               whitening: np.ndarray | None, noise_sd: float | None) -> SliceSeries:
        what = f"myocardial slice {slice_index}"
        compact, offsets, accel, time_s = self._compact(buffer, what, whitening)
        if compact.shape[0] < n_pd + 2:
            raise GadgetError(f"{what}: {compact.shape[0]} frames, need {n_pd} PD frames + at least 2 SR frames")
        with_pd = self.settings.coil_calibration == "time-average+pd"
        if with_pd and not (n_pd > 0 and set(offsets[:n_pd].tolist()) == set(range(accel))):
            self.log.warning("%s: the %d PD frames do not sample every offset of R = %d: coil maps from the time "
                             "average alone", what, n_pd, accel)
            with_pd = False
        try:
            images = reconstruct_compact(
                compact, offsets, accel, whitening=whitening, regularization=self.settings.regularization,
                virtual_coils=self.settings.virtual_coils or None, noise_sd=noise_sd,
                denoise_threshold=self.settings.denoise_threshold if noise_sd else 0.0,
                denoise_patch_px=self.settings.denoise_patch_px,
                # the joint fit needs the PD frames counted (the time average is then PD-balanced too)
                n_pd_frames=n_pd if with_pd else self._calibration_pd_frames(n_pd),
                mask_fraction=self.settings.coil_mask_fraction, map_fit_order=self._map_fit_order(encoding),
                fit_pd_frames=with_pd)
        except ReconError as error:
            raise GadgetError(f"{what}: {error}") from error
        flags = ()
        limits = getattr(getattr(encoding, "encodingLimits", None), "repetition", None)
        declared = int(limits.maximum) + 1 if limits is not None and limits.maximum is not None else 0
        if declared > images.shape[0]:
            flags = (f"scan ended early: {images.shape[0]} of the {declared} frames the header declares",)
            self.log.warning("%s: %s", what, flags[0])
        geometry = _geometry(buffer.first, encoding)
        slice_dir = np.asarray(geometry.slice_dir)
        position = float(np.dot(np.asarray(geometry.position), slice_dir)) if np.any(slice_dir) else 0.0
        self.log.info("%s: %d frames, R=%d, %d coils", what, images.shape[0], accel, compact.shape[1])
        return SliceSeries(slice_index=slice_index, data=images, time_s=time_s, units="signal",
                           n_pd_frames=n_pd, geometry=geometry, slice_position_mm=position, stages=("recon",),
                           flags=flags)

    def _map_fit_order(self, encoding) -> tuple[int, int] | None:  # noqa: ANN001 - xsd type
        """(rows, cols) order of the fitted coil maps from ``coil_map_detail_mm`` and the encoded field of view."""
        detail = self.settings.coil_map_detail_mm
        if detail <= 0:
            return None
        fov = encoding.encodedSpace.fieldOfView_mm
        return max(1, round(float(fov.y) / detail)), max(1, round(float(fov.x) / detail))

    def _calibration_pd_frames(self, n_pd: int) -> int:
        """The PD frames the coil calibration balances over the offsets (``balance_pd_frames``; 0: plain average)."""
        return n_pd if self.settings.balance_pd_frames else 0

    def _aif(self, buffers: dict[tuple[int, int], _SeriesBuffer], echoes: list[int], encoding,  # noqa: ANN001
             n_pd: int, whitening: np.ndarray | None, params: dict) -> AifSeries:
        compacts = []
        time_s = None
        for echo in echoes:
            compact, offsets, accel, echo_time_s = self._compact(buffers[(AIF_ENCODING, echo)], f"AIF echo {echo}",
                                                                 whitening)
            compacts.append((compact, offsets, accel))
            if time_s is None:
                time_s = echo_time_s
        shapes = {c[0].shape for c in compacts}
        if len(shapes) != 1:
            raise GadgetError(f"AIF echoes differ in dimensions: {sorted(shapes)}")
        try:
            compact, offsets, accel = compacts[0]
            calibration = calibrate(compact, offsets, accel, whitening=whitening,
                                    virtual_coils=self.settings.aif_virtual_coils or None,
                                    n_pd_frames=self._calibration_pd_frames(n_pd),
                                    mask_fraction=self.settings.aif_coil_mask_fraction)
            images = np.stack([reconstruct_compact(c, o, a, calibration=calibration,
                                                   regularization=self.settings.regularization)
                               for c, o, a in compacts])
        except ReconError as error:
            raise GadgetError(f"AIF series: {error}") from error
        if images.shape[1] < n_pd + 2:
            raise GadgetError(f"AIF series: {images.shape[1]} frames, need {n_pd} PD frames + at least 2 SR frames")
        echo_times = tuple(float(params[name]) for name in ("AIFEchoTime1_ms", "AIFEchoTime2_ms")
                           if name in params)[: len(echoes)]
        if len(echo_times) != len(echoes):
            raise GadgetError(f"AIF series has {len(echoes)} echoes but the header gives "
                              f"{len(echo_times)} echo times (AIFEchoTime1_ms, AIFEchoTime2_ms)")
        geometry = _geometry(buffers[(AIF_ENCODING, echoes[0])].first, encoding)
        self.log.info("AIF: %d echoes, %d frames, R=%d", len(echoes), images.shape[1], compacts[0][2])
        return AifSeries(data=images, time_s=time_s, echo_times_ms=echo_times, units="signal", n_pd_frames=n_pd,
                         geometry=geometry, stages=("recon",))

