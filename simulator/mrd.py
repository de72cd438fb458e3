"""MRD/ISMRMRD output of a simulated study: XML header, k-space acquisitions, or images.

Conventions (encoding spaces, indices, flags, time stamps, user parameters) are documented
in docs/simulator.md, section "MRD conventions". Files are written with the ``ismrmrd``
python package: the XML header through ``ismrmrd.xsd`` and ``ismrmrd.Dataset``, the
acquisitions in the dataset's ``data`` table with the package's own ``acquisition_dtype``
(filled in bulk instead of one ``append_acquisition`` call per readout, which resizes the
table every time), and images through ``Dataset.append_image``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import ismrmrd
import ismrmrd.xsd as xsd
import numpy as np
import scipy.fft
from ismrmrd.hdf5 import acquisition_dtype, acquisition_header_dtype

from perfline.simulator import study as st
from perfline.simulator.motion import warp
from perfline.toolbox.bloch import SequenceParameters, saturation_time_ms

logger = logging.getLogger(__name__)

TICK_S = 0.0025                 # acquisition_time_stamp unit
SCAN_START_S = 36000.0          # 10:00:00, seconds since midnight
SLICE_GAP_MM = 10.0


def _flag(bit: int) -> np.uint64:
    return np.uint64(1) << np.uint64(bit - 1)


def _limit(maximum: int, center: int = 0) -> xsd.limitType:
    return xsd.limitType(minimum=0, maximum=maximum, center=center)


def _encoding(shape: tuple[int, int], fov_xyz_mm: tuple[float, float, float], limits: dict[str, int],
              acceleration: int) -> xsd.encodingType:
    rows, cols = shape
    space = xsd.encodingSpaceType(matrixSize=xsd.matrixSizeType(x=cols, y=rows, z=1),
                                  fieldOfView_mm=xsd.fieldOfViewMm(x=fov_xyz_mm[0], y=fov_xyz_mm[1], z=fov_xyz_mm[2]))
    recon = xsd.encodingSpaceType(matrixSize=xsd.matrixSizeType(x=cols, y=rows, z=1),
                                  fieldOfView_mm=xsd.fieldOfViewMm(x=fov_xyz_mm[0], y=fov_xyz_mm[1], z=fov_xyz_mm[2]))
    encoding_limits = xsd.encodingLimitsType(
        kspace_encoding_step_0=_limit(cols - 1, cols // 2), kspace_encoding_step_1=_limit(rows - 1, rows // 2),
        kspace_encoding_step_2=_limit(0), average=_limit(0), slice=_limit(limits["slice"]),
        contrast=_limit(limits["contrast"]), phase=_limit(0), repetition=_limit(limits["repetition"]),
        set=_limit(0), segment=_limit(0))
    parallel = xsd.parallelImagingType(
        accelerationFactor=xsd.accelerationFactorType(kspace_encoding_step_1=acceleration, kspace_encoding_step_2=1),
        calibrationMode=xsd.calibrationModeType.INTERLEAVED,
        interleavingDimension=xsd.interleavingDimensionType.REPETITION)
    return xsd.encodingType(encodedSpace=space, reconSpace=recon, encodingLimits=encoding_limits,
                            trajectory=xsd.trajectoryType.CARTESIAN, parallelImaging=parallel)


def header_parameters(study: st.StudyParameters) -> dict[str, dict[str, float | int | str]]:
    """The user parameters of the XML header, by kind ("long", "double", "string")."""
    myo, aif = study.myocardial_sequence, study.aif_sequence
    return {
        "long": {"NumberOfPDFrames": study.n_pd_frames, "NumberOfSRFrames": study.n_frames,
                 "NumberOfSlices": study.n_slices, "AIFAccelerationFactor": aif.acceleration},
        "double": {"SaturationTime_ms": saturation_time_ms(myo), "SaturationDelay_ms": myo.saturation_delay_ms,
                   "AIFSaturationTime_ms": saturation_time_ms(aif), "AIFSaturationDelay_ms": aif.saturation_delay_ms,
                   "AIFEchoTime1_ms": st.AIF_ECHO_TIMES_MS[0], "AIFEchoTime2_ms": st.AIF_ECHO_TIMES_MS[1],
                   "FlipAngle_deg": myo.flip_angle_deg, "AIFFlipAngle_deg": aif.flip_angle_deg,
                   "PDFlipAngle_deg": myo.pd_flip_angle_deg, "RepetitionTime_ms": myo.tr_ms,
                   "AIFRepetitionTime_ms": aif.tr_ms},
        "string": {"ReadoutType": myo.readout, "AIFReadoutType": aif.readout, "PDReadoutType": myo.pd_readout},
    }


def build_header(study: st.StudyParameters) -> str:
    """ISMRMRD XML header of the study (see docs/simulator.md)."""
    myo, aif = study.myocardial_sequence, study.aif_sequence
    frames = study.n_total_frames
    encodings = [
        _encoding(st.MYO_SHAPE, (st.MYO_FOV_MM[0], st.MYO_FOV_MM[1], st.MYO_SLICE_THICKNESS_MM),
                  {"slice": study.n_slices - 1, "contrast": 0, "repetition": frames - 1}, myo.acceleration),
        _encoding(st.AIF_SHAPE, (st.MYO_FOV_MM[0], st.MYO_FOV_MM[1], st.AIF_SLICE_THICKNESS_MM),
                  {"slice": 0, "contrast": 1, "repetition": frames - 1}, aif.acceleration),
    ]
    params = header_parameters(study)
    user = xsd.userParametersType(
        userParameterLong=[xsd.userParameterLongType(name=k, value=int(v)) for k, v in params["long"].items()],
        userParameterDouble=[xsd.userParameterDoubleType(name=k, value=float(v)) for k, v in params["double"].items()],
        userParameterString=[xsd.userParameterStringType(name=k, value=str(v)) for k, v in params["string"].items()])
    header = xsd.ismrmrdHeader(
        experimentalConditions=xsd.experimentalConditionsType(
            H1resonanceFrequency_Hz=int(round(42.577478e6 * study.field_strength_t))),
        encoding=encodings,
        acquisitionSystemInformation=xsd.acquisitionSystemInformationType(
            systemVendor="perfline", systemModel="perfline-simulator", systemFieldStrength_T=study.field_strength_t,
            receiverChannels=study.n_coils),
        measurementInformation=xsd.measurementInformationType(
            measurementID=f"perfline_sim_{study.seed}", protocolName="perfline_perfusion",
            patientPosition=xsd.patientPositionType.HFS),
        sequenceParameters=xsd.sequenceParametersType(
            TR=[myo.tr_ms, aif.tr_ms], TE=[myo.te_ms, *st.AIF_ECHO_TIMES_MS],
            TI=[saturation_time_ms(myo), saturation_time_ms(aif)],
            flipAngle_deg=[myo.flip_angle_deg, aif.flip_angle_deg, myo.pd_flip_angle_deg], sequence_type="SSFP"),
        userParameters=user)
    return xsd.ToXML(header)


def sampled_lines(n_lines: int, acceleration: int, frame: int) -> np.ndarray:
    """Phase-encode lines acquired in ``frame``: ``(line - frame) % R == 0``."""
    lines = np.arange(n_lines)
    return lines[(lines - frame) % acceleration == 0]


@dataclass(frozen=True)
class _Block:
    """The acquisitions of one image (series, slice, frame) in stream order."""

    series: str
    slice_index: int
    frame: int
    lines: np.ndarray
    start_s: float          # saturation pulse time


def _plan(study: st.StudyParameters) -> list[_Block]:
    blocks = []
    aif_start = st.image_start_s(study, "aif")
    myo_start = [st.image_start_s(study, "myocardium", k) for k in range(study.n_slices)]
    for frame in range(study.n_total_frames):
        blocks.append(_Block("aif", 0, frame, sampled_lines(st.AIF_SHAPE[0], study.aif_sequence.acceleration, frame),
                             float(aif_start[frame])))
        for k in range(study.n_slices):
            blocks.append(_Block("myocardium", k, frame,
                                 sampled_lines(st.MYO_SHAPE[0], study.myocardial_sequence.acceleration, frame),
                                 float(myo_start[k][frame])))
    return blocks


def _checkerboard(shape: tuple[int, int]) -> np.ndarray:
    """(-1)^(row + col): for even sizes, fftshift(fft2(ifftshift(x))) = C * fft2(C * x)."""
    rows, cols = np.indices(shape)
    return np.where((rows + cols) % 2 == 0, 1.0, -1.0).astype(np.float32)


def _coil_series(study: st.StudyParameters, series: str, index: int,
                 phantoms: list[st.SlicePhantom] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(moving magnitude series [echo, T, rows, cols], coil maps [coils, rows, cols]) of a series."""
    if series == "aif":
        echoes, sl = st.aif_phantom(study)
        field = st.motion_fields(study, "aif", 0, st.AIF_SHAPE, st.AIF_PIXEL_MM, sl.lv_center_rc)
        moving = np.stack([warp(e, field) for e in echoes])
        sens = st.coil_maps(study, "aif", 0, st.AIF_SHAPE, st.AIF_PIXEL_MM)
    else:
        phantom = phantoms[index] if phantoms is not None else st.slice_phantom(study, index)
        field = st.motion_fields(study, "myocardium", index, st.MYO_SHAPE, st.MYO_PIXEL_MM,
                                 phantom.anatomy.lv_center_rc)
        moving = warp(phantom.clean, field)[None]
        sens = st.coil_maps(study, "myocardium", index, st.MYO_SHAPE, st.MYO_PIXEL_MM)
    return moving, sens


def write_kspace(study: st.StudyParameters, path: str, *, phantoms: list[st.SlicePhantom] | None = None,
                 progress: Callable[[str], None] | None = None) -> int:
    """Write the study as multi-coil Cartesian k-space to an MRD HDF5 file; returns the number
    of acquisitions (including the noise scan). ``phantoms`` (from ``slice_phantom``) are
    rendered if not given."""
    blocks = _plan(study)
    coils = study.n_coils
    rng = np.random.default_rng([study.noise_seed, 99])
    # per-coil k-space noise so that an R-fold interleaved recon reaches each series' image noise (g = 1);
    # the AIF's larger voxels give it less noise per unit of magnetization (study.aif_snr_gain)
    sigma = {"myocardium": st.noise_sigma(study) / math.sqrt(study.myocardial_sequence.acceleration),
             "aif": st.aif_noise_sigma(study) / math.sqrt(study.aif_sequence.acceleration)}
    n_acq = 1 + sum(b.lines.size * (2 if b.series == "aif" else 1) for b in blocks)
    heads = np.zeros(n_acq, dtype=acquisition_header_dtype)
    payload: list[np.ndarray | None] = [None] * n_acq
    # position of every block's first acquisition in the stream
    offsets, position = [], 1
    for block in blocks:
        offsets.append(position)
        position += block.lines.size * (2 if block.series == "aif" else 1)
    samples = {"myocardium": st.MYO_SHAPE[1], "aif": st.AIF_SHAPE[1]}
    noise_scan = (rng.standard_normal((coils, samples["myocardium"])) + 1j * rng.standard_normal(
        (coils, samples["myocardium"]))) * (sigma["myocardium"] / math.sqrt(2))
    payload[0] = noise_scan.astype(np.complex64)
    _fill_noise_head(heads[0], study)
    series_list = [("aif", 0)] + [("myocardium", k) for k in range(study.n_slices)]
    for series, index in series_list:
        if progress:
            progress(f"{series} {index}")
        moving, sens = _coil_series(study, series, index, phantoms)
        seq = study.aif_sequence if series == "aif" else study.myocardial_sequence
        checker = _checkerboard(sens.shape[-2:])
        sens_checker = (sens * checker).astype(np.complex64)  # centring folded into the coil maps
        for block_number, block in enumerate(blocks):
            if block.series != series or block.slice_index != index:
                continue
            coil_images = sens_checker[None] * moving[:, block.frame][:, None]  # [echo, coils, rows, cols]
            k = scipy.fft.fft2(coil_images, norm="ortho")[:, :, block.lines] * checker[block.lines]
            k = k + (rng.standard_normal(k.shape, dtype=np.float32) + 1j * rng.standard_normal(
                k.shape, dtype=np.float32)) * np.float32(sigma[series] / math.sqrt(2))
            k = k.astype(np.complex64)
            n_echo = k.shape[0]
            for j in range(block.lines.size):
                for echo in range(n_echo):
                    payload[offsets[block_number] + j * n_echo + echo] = np.ascontiguousarray(k[echo, :, j])
            first = offsets[block_number]
            _fill_block_heads(heads[first:first + block.lines.size * n_echo], study, block, seq, n_echo)
    _set_last_flags(heads, blocks, offsets)
    data = np.empty(n_acq, dtype=acquisition_dtype)
    data["head"] = heads
    empty_traj = np.zeros(0, dtype=np.float32)
    for a in range(n_acq):
        data[a]["data"] = payload[a].view(np.float32).ravel()  # type: ignore[union-attr]
        data[a]["traj"] = empty_traj
    with ismrmrd.Dataset(path, "dataset", create_if_needed=True, mode="w") as dataset:
        dataset.write_xml_header(build_header(study))
        group = dataset._file.require_group("dataset")
        group.create_dataset("data", data=data, maxshape=(None,), chunks=True)
    return n_acq


def _fill_noise_head(head: np.ndarray, study: st.StudyParameters) -> None:
    head["version"] = 1
    head["flags"] = _flag(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)
    head["measurement_uid"] = 1
    head["scan_counter"] = 1
    head["acquisition_time_stamp"] = int(round(SCAN_START_S / TICK_S)) - 40
    head["number_of_samples"] = st.MYO_SHAPE[1]
    head["available_channels"] = head["active_channels"] = study.n_coils
    head["channel_mask"] = _channel_mask(study.n_coils)
    head["sample_time_us"] = st.MYO_SAMPLE_TIME_US
    head["encoding_space_ref"] = 0
    head["read_dir"], head["phase_dir"], head["slice_dir"] = (1, 0, 0), (0, 1, 0), (0, 0, 1)


def _channel_mask(n_coils: int) -> np.ndarray:
    mask = np.zeros(16, dtype=np.uint64)
    for coil in range(n_coils):
        mask[coil // 64] |= np.uint64(1) << np.uint64(coil % 64)
    return mask


def _fill_block_heads(heads: np.ndarray, study: st.StudyParameters, block: _Block, seq: SequenceParameters,
                      n_echo: int) -> None:
    """Headers of one image's acquisitions (lines in order, echoes interleaved per line)."""
    aif = block.series == "aif"
    n = heads.size
    j = np.repeat(np.arange(block.lines.size), n_echo)           # played-line number
    time_s = block.start_s + (seq.saturation_delay_ms + j * seq.tr_ms) / 1000.0
    trigger = float(study.timing.trigger_s[block.frame])
    flags = np.zeros(n, dtype=np.uint64)
    flags[j == 0] |= _flag(ismrmrd.ACQ_FIRST_IN_SLICE)
    flags[j == block.lines.size - 1] |= _flag(ismrmrd.ACQ_LAST_IN_SLICE)
    samples = st.AIF_SHAPE[1] if aif else st.MYO_SHAPE[1]
    heads["version"] = 1
    heads["flags"] = flags
    heads["measurement_uid"] = 1
    heads["acquisition_time_stamp"] = np.round((SCAN_START_S + time_s) / TICK_S).astype(np.uint32)
    heads["physiology_time_stamp"][:, 0] = np.round((time_s - trigger) / TICK_S).astype(np.uint32)
    heads["number_of_samples"] = samples
    heads["available_channels"] = study.n_coils
    heads["active_channels"] = study.n_coils
    heads["channel_mask"] = _channel_mask(study.n_coils)[None, :]
    heads["center_sample"] = samples // 2
    heads["encoding_space_ref"] = 1 if aif else 0
    heads["sample_time_us"] = st.AIF_SAMPLE_TIME_US if aif else st.MYO_SAMPLE_TIME_US
    z = -15.0 if aif else (block.slice_index - (study.n_slices - 1) / 2) * SLICE_GAP_MM
    heads["position"] = (0.0, 0.0, z)
    heads["read_dir"], heads["phase_dir"], heads["slice_dir"] = (1, 0, 0), (0, 1, 0), (0, 0, 1)
    idx = heads["idx"]
    idx["kspace_encode_step_1"] = block.lines[j]
    idx["slice"] = 0 if aif else block.slice_index
    idx["contrast"] = np.tile(np.arange(n_echo), block.lines.size)
    idx["repetition"] = block.frame
    heads["idx"] = idx


def _set_last_flags(heads: np.ndarray, blocks: list[_Block], offsets: list[int]) -> None:
    """LAST_IN_REPETITION on the last acquisition of each heartbeat per encoding space,
    LAST_IN_MEASUREMENT on the final acquisition; scan counters in stream order."""
    last_of: dict[tuple[int, str], int] = {}
    for block, offset in zip(blocks, offsets):
        n = block.lines.size * (2 if block.series == "aif" else 1)
        last_of[(block.frame, block.series)] = offset + n - 1
    for position in last_of.values():
        heads[position]["flags"] |= _flag(ismrmrd.ACQ_LAST_IN_REPETITION)
    heads[-1]["flags"] |= _flag(ismrmrd.ACQ_LAST_IN_MEASUREMENT)
    heads["scan_counter"] = np.arange(1, heads.size + 1)


def write_images(study: st.StudyParameters, path: str, *, phantoms: list[st.SlicePhantom] | None = None,
                 progress: Callable[[str], None] | None = None) -> int:
    """Write reconstructed magnitude images (root sum of squares of noisy, fully sampled coil
    images) to the MRD groups ``images_myocardium`` and ``images_aif``; returns the count."""
    rng = np.random.default_rng([study.noise_seed, 98])
    count = 0
    with ismrmrd.Dataset(path, "dataset", create_if_needed=True, mode="w") as dataset:
        dataset.write_xml_header(build_header(study))
        for series, index in [("aif", 0)] + [("myocardium", k) for k in range(study.n_slices)]:
            if progress:
                progress(f"{series} {index}")
            moving, sens = _coil_series(study, series, index, phantoms)
            times = st.frame_times_s(study, series, index)
            shape = st.AIF_SHAPE if series == "aif" else st.MYO_SHAPE
            pixel = st.AIF_PIXEL_MM if series == "aif" else st.MYO_PIXEL_MM
            sigma_image = st.aif_noise_sigma(study) if series == "aif" else st.noise_sigma(study)
            for echo in range(moving.shape[0]):
                for frame in range(moving.shape[1]):
                    coil = sens * moving[echo, frame][None]
                    coil = coil + (rng.standard_normal(coil.shape, dtype=np.float32) + 1j * rng.standard_normal(
                        coil.shape, dtype=np.float32)) * np.float32(sigma_image / math.sqrt(2))
                    rss = np.sqrt(np.sum(coil.real**2 + coil.imag**2, axis=0)).astype(np.float32)
                    image = ismrmrd.Image.from_array(rss[None, None], transpose=False)
                    _fill_image_head(image, study, series, index, echo, frame, float(times[frame]), shape, pixel)
                    dataset.append_image(f"images_{series}", image)
                    count += 1
    return count


def _fill_image_head(image: ismrmrd.Image, study: st.StudyParameters, series: str, index: int, echo: int,
                     frame: int, time_s: float, shape: tuple[int, int], pixel_mm: float) -> None:
    aif = series == "aif"
    image.image_type = ismrmrd.IMTYPE_MAGNITUDE
    image.image_series_index = 1 if aif else 0
    image.slice = 0 if aif else index
    image.repetition = frame
    image.contrast = echo
    image.field_of_view = (shape[1] * pixel_mm, shape[0] * pixel_mm,
                          st.AIF_SLICE_THICKNESS_MM if aif else st.MYO_SLICE_THICKNESS_MM)
    image.acquisition_time_stamp = int(round((SCAN_START_S + time_s) / TICK_S))
    trigger = float(study.timing.trigger_s[frame])
    image.physiology_time_stamp = (int(round((time_s - trigger) / TICK_S)), 0, 0)
    z = -15.0 if aif else (index - (study.n_slices - 1) / 2) * SLICE_GAP_MM
    image.position = (0.0, 0.0, z)
    image.read_dir, image.phase_dir, image.slice_dir = (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)
    meta = ismrmrd.Meta({"GADGETRON_DataRole": "AIF" if aif else "Image",
                         "GADGETRON_SeqDescription": "perfline_sim_aif" if aif else "perfline_sim_myocardium",
                         "PD": int(frame < study.n_pd_frames)})
    image.attribute_string = meta.serialize()
