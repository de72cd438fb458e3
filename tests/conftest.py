"""Shared fixtures: Shepp-Logan MRD datasets from Debian's ismrmrd-tools and a numpy reference."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import ismrmrd
import numpy as np
import pytest

GENERATOR = "ismrmrd_generate_cartesian_shepp_logan"


@pytest.fixture(scope="session")
def shepp_logan(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``make(matrix=64, coils=4, repetitions=1, noise_calibration=False) -> Path`` of an MRD
    HDF5 file written by ``ismrmrd_generate_cartesian_shepp_logan`` (cached per argument set)."""
    if shutil.which(GENERATOR) is None:
        pytest.skip(f"{GENERATOR} not installed (Debian package ismrmrd-tools)")
    directory = tmp_path_factory.mktemp("shepp_logan")
    cache: dict[tuple, Path] = {}

    def make(matrix: int = 64, coils: int = 4, repetitions: int = 1, noise_calibration: bool = False) -> Path:
        key = (matrix, coils, repetitions, noise_calibration)
        if key not in cache:
            path = directory / f"sl_{matrix}_{coils}_{repetitions}_{int(noise_calibration)}.h5"
            command = [GENERATOR, "-m", str(matrix), "-c", str(coils), "-r", str(repetitions), "-o", str(path)]
            if noise_calibration:
                command.append("-C")
            subprocess.run(command, check=True, capture_output=True, timeout=120)
            cache[key] = path
        return cache[key]

    return make


def reference_rss(path: Path) -> list[np.ndarray]:
    """Independent numpy reconstruction (RSS) of each repetition of a Shepp-Logan file
    without noise scans: k-space [coils, ky, kx], centred unitary 2D inverse FFT, central
    readout crop, root-sum-of-squares. Returns float64 [rows, cols] per repetition."""
    dataset = ismrmrd.Dataset(str(path), "dataset", create_if_needed=False)
    header = ismrmrd.xsd.CreateFromDocument(dataset.read_xml_header())
    encoded = header.encoding[0].encodedSpace.matrixSize
    recon_x = header.encoding[0].reconSpace.matrixSize.x
    kspaces: dict[int, np.ndarray] = {}
    for index in range(dataset.number_of_acquisitions()):
        acquisition = dataset.read_acquisition(index)
        if acquisition.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT):
            continue
        kspace = kspaces.setdefault(acquisition.idx.repetition,
                                    np.zeros((acquisition.active_channels, encoded.y, encoded.x), np.complex128))
        kspace[:, acquisition.idx.kspace_encode_step_1, :] = acquisition.data
    dataset.close()
    images = []
    for repetition in sorted(kspaces):
        coil_images = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(kspaces[repetition], axes=(-2, -1)),
                                                   norm="ortho"), axes=(-2, -1))
        start = (encoded.x - recon_x) // 2
        coil_images = coil_images[:, :, start:start + recon_x]
        images.append(np.sqrt(np.sum(np.abs(coil_images) ** 2, axis=0)))
    return images


def relative_error(value: np.ndarray, reference: np.ndarray) -> float:
    return float(np.linalg.norm(value - reference) / np.linalg.norm(reference))
