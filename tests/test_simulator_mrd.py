"""MRD output of the simulator: header, indices, sampling pattern, flags, C++ reader, recon."""

from __future__ import annotations

import shutil
import subprocess

import h5py
import ismrmrd
import numpy as np
import pytest

from perfline.simulator import mrd
from perfline.simulator import study as st
from perfline.simulator.motion import warp


@pytest.fixture(scope="module")
def kspace_file(tmp_path_factory):
    study = st.sample_study(21, kind="rest", n_slices=2, n_frames=10, n_coils=4, acceleration=3)
    path = tmp_path_factory.mktemp("mrd") / "kspace.h5"
    count = mrd.write_kspace(study, str(path))
    return study, path, count


def _acquisitions(path, every: int = 1):
    """Header and acquisitions through ismrmrd-python (``every``-th acquisition only: the
    package reads them one by one)."""
    with ismrmrd.Dataset(str(path), "dataset", create_if_needed=False) as dataset:
        header = ismrmrd.xsd.CreateFromDocument(dataset.read_xml_header())
        n = dataset.number_of_acquisitions()
        acqs = [dataset.read_acquisition(i) for i in range(0, n, every)]
    return header, acqs


def _heads(path) -> np.ndarray:
    """All acquisition headers in bulk (structured array of ismrmrd's acquisition_header_dtype)."""
    with h5py.File(path, "r") as f:
        return f["dataset/data"]["head"]


def _has(heads: np.ndarray, flag: int) -> np.ndarray:
    return (heads["flags"] & (np.uint64(1) << np.uint64(flag - 1))) != 0


def test_header_describes_both_encoding_spaces(kspace_file):
    study, path, _ = kspace_file
    header, some = _acquisitions(path, every=500)
    assert some[1].data.shape == (4, some[1].number_of_samples)
    myo, aif = header.encoding
    assert (myo.encodedSpace.matrixSize.x, myo.encodedSpace.matrixSize.y) == (192, 144)
    assert (aif.encodedSpace.matrixSize.x, aif.encodedSpace.matrixSize.y) == (64, 48)
    assert myo.encodedSpace.fieldOfView_mm.x == 360 and myo.encodedSpace.fieldOfView_mm.y == 270
    assert myo.encodingLimits.repetition.maximum == study.n_total_frames - 1
    assert myo.encodingLimits.slice.maximum == 1 and aif.encodingLimits.contrast.maximum == 1
    assert myo.parallelImaging.accelerationFactor.kspace_encoding_step_1 == 3
    assert header.acquisitionSystemInformation.receiverChannels == 4
    assert header.acquisitionSystemInformation.systemFieldStrength_T == study.field_strength_t
    longs = {p.name: p.value for p in header.userParameters.userParameterLong}
    doubles = {p.name: p.value for p in header.userParameters.userParameterDouble}
    assert longs["NumberOfPDFrames"] == 3 and longs["NumberOfSRFrames"] == 10
    assert doubles["SaturationTime_ms"] == pytest.approx(100.0)
    assert doubles["AIFEchoTime2_ms"] > doubles["AIFEchoTime1_ms"]


def test_indices_sampling_pattern_flags_and_time_stamps(kspace_file):
    study, path, count = kspace_file
    heads = _heads(path)
    assert heads.size == count
    assert _has(heads[:1], ismrmrd.ACQ_IS_NOISE_MEASUREMENT).all()
    assert _has(heads[-1:], ismrmrd.ACQ_LAST_IN_MEASUREMENT).all()
    data = heads[1:]
    assert np.all(np.diff(data["acquisition_time_stamp"].astype(np.int64)) >= 0), "time stamps must not go back"
    assert np.all(data["number_of_samples"] == np.where(data["encoding_space_ref"] == 0, 192, 64))
    idx = data["idx"]
    lines: dict[tuple[int, int, int, int], list[int]] = {}
    for space, sl, rep, con, line in zip(data["encoding_space_ref"], idx["slice"], idx["repetition"],
                                         idx["contrast"], idx["kspace_encode_step_1"]):
        lines.setdefault((int(space), int(sl), int(rep), int(con)), []).append(int(line))
    for (space, _, frame, _), acquired in lines.items():
        rate = 3 if space == 0 else 2
        n_lines = 144 if space == 0 else 48
        assert acquired == [line for line in range(n_lines) if (line - frame) % rate == 0]
    # R consecutive frames together sample every line once
    union = sorted(sum((lines[(0, 1, f, 0)] for f in (4, 5, 6)), []))
    assert union == list(range(144))
    assert _has(data, ismrmrd.ACQ_FIRST_IN_SLICE).sum() == _has(data, ismrmrd.ACQ_LAST_IN_SLICE).sum() == len(lines)
    assert set(idx["contrast"][data["encoding_space_ref"] == 1]) == {0, 1}
    assert set(idx["repetition"]) == set(range(study.n_total_frames))
    # one LAST_IN_REPETITION per heartbeat and encoding space
    assert _has(data, ismrmrd.ACQ_LAST_IN_REPETITION).sum() == 2 * study.n_total_frames


@pytest.mark.skipif(shutil.which("ismrmrd_read_timing_test") is None, reason="Debian ismrmrd-tools not installed")
def test_cpp_ismrmrd_tools_read_the_file(kspace_file, tmp_path):
    _, path, _ = kspace_file
    run = subprocess.run(["ismrmrd_read_timing_test", str(path)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "READ TIMER" in run.stdout
    subprocess.run(["ismrmrd_info", str(path)], capture_output=True, timeout=60, check=True)
    with h5py.File(path, "r") as f:
        (tmp_path / "header.xml").write_bytes(f["dataset/xml"][0])
    parse = subprocess.run(["ismrmrd_test_xml", str(tmp_path / "header.xml")], capture_output=True, timeout=60, cwd=tmp_path)
    assert parse.returncode == 0, parse.stderr


def test_fully_sampled_kspace_reconstructs_the_phantom(tmp_path):
    study = st.sample_study(4, n_slices=1, n_frames=10, n_coils=6, acceleration=1)
    path = tmp_path / "full.h5"
    mrd.write_kspace(study, str(path))
    frame = 12
    kspace = np.zeros((6, 144, 192), dtype=np.complex64)
    with h5py.File(path, "r") as f:
        table = f["dataset/data"][()]
    for row in table[1:]:
        head = row["head"]
        if head["encoding_space_ref"] == 0 and head["idx"]["repetition"] == frame:
            kspace[:, head["idx"]["kspace_encode_step_1"]] = row["data"].view(np.complex64).reshape(6, 192)
    coil_images = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(kspace, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))
    sens = st.coil_maps(study, "myocardium", 0, st.MYO_SHAPE, st.MYO_PIXEL_MM)
    combined = np.real(np.sum(np.conj(sens) * coil_images, axis=0) / np.sum(np.abs(sens) ** 2, axis=0))
    phantom = st.slice_phantom(study, 0)
    field = st.motion_fields(study, "myocardium", 0, st.MYO_SHAPE, st.MYO_PIXEL_MM, phantom.anatomy.lv_center_rc)
    expected = warp(phantom.clean, field)[frame]
    heart = phantom.anatomy.labels > 0
    sigma = st.noise_sigma(study)
    residual = (combined - expected)[heart]
    assert abs(residual.mean()) < 0.2 * sigma and residual.std() < 2.0 * sigma
    assert np.corrcoef(combined[heart], expected[heart])[0, 1] > 0.95


def test_images_mode_writes_both_series(tmp_path):
    study = st.sample_study(2, n_slices=1, n_frames=10, n_coils=4)
    path = tmp_path / "images.h5"
    count = mrd.write_images(study, str(path))
    with ismrmrd.Dataset(str(path), "dataset", create_if_needed=False) as dataset:
        assert dataset.number_of_images("images_myocardium") == 13
        assert dataset.number_of_images("images_aif") == 26
        image = dataset.read_image("images_myocardium", 5)
        assert image.data.shape == (1, 1, 144, 192) and image.repetition == 5
        meta = ismrmrd.Meta.deserialize(image.attribute_string)
        assert meta["PD"] == "0"
    assert count == 39


def _kspace_by_space(path) -> dict[int, np.ndarray]:
    """{encoding space: complex64 [acquisitions, coils, samples]} of the imaging readouts of a k-space file."""
    heads = _heads(path)
    with h5py.File(path, "r") as f:
        data = f["dataset/data"]["data"]
    imaging = (heads["flags"] & np.uint64(1 << (ismrmrd.ACQ_IS_NOISE_MEASUREMENT - 1))) == 0
    out = {}
    for space in (0, 1):
        rows = np.nonzero(imaging & (heads["encoding_space_ref"] == space))[0]
        coils, samples = int(heads["active_channels"][rows[0]]), int(heads["number_of_samples"][rows[0]])
        out[space] = np.stack([data[i].view(np.complex64).reshape(coils, samples) for i in rows])
    return out


def test_aif_noise_follows_its_voxels_and_sampling(tmp_path):
    """The AIF image's noise, relative to the myocardial image's, is what its voxel volume, sampled lines,
    readout length and dwell time (all read back from the file) give: SNR ~ volume x sqrt(sampling time).
    Two files of one study that differ only in the noise draw: their k-space difference is pure noise."""
    import dataclasses

    study = st.sample_study(21, kind="rest", n_slices=1, n_frames=10, n_coils=4, acceleration=3)
    paths = [tmp_path / "a.h5", tmp_path / "b.h5"]
    mrd.write_kspace(study, str(paths[0]))
    mrd.write_kspace(dataclasses.replace(study, noise_seed=study.noise_seed + 1), str(paths[1]))
    a, b = _kspace_by_space(paths[0]), _kspace_by_space(paths[1])
    noise_sd = {space: float(np.std(a[space] - b[space]) / np.sqrt(2)) for space in (0, 1)}

    heads = _heads(paths[0])
    with ismrmrd.Dataset(str(paths[0]), "dataset", create_if_needed=False) as dataset:
        header = ismrmrd.xsd.CreateFromDocument(dataset.read_xml_header())
    snr_per_voxel = {}
    for space, encoding in enumerate(header.encoding):
        fov, matrix = encoding.reconSpace.fieldOfView_mm, encoding.reconSpace.matrixSize
        volume = fov.x / matrix.x * fov.y / matrix.y * fov.z
        accel = encoding.parallelImaging.accelerationFactor.kspace_encoding_step_1
        readout = np.nonzero(heads["encoding_space_ref"] == space)[0][-1]  # an imaging readout of this space
        sampling_us = heads["number_of_samples"][readout] * (matrix.y / accel) * heads["sample_time_us"][readout]
        snr_per_voxel[space] = volume * np.sqrt(sampling_us)
        # image noise of the R-fold recon = k-space noise per sample x sqrt(R) (the file's unitary FFT)
        noise_sd[space] *= np.sqrt(accel)
    expected = snr_per_voxel[1] / snr_per_voxel[0]
    assert expected == pytest.approx(6.50, abs=0.01)
    assert noise_sd[0] / noise_sd[1] == pytest.approx(expected, rel=0.03)
    assert st.aif_noise_sigma(study) == pytest.approx(st.noise_sigma(study) / expected, rel=1e-9)
