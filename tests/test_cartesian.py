"""Cartesian recon: toolbox properties and the gadget against an independent numpy reference."""

from __future__ import annotations

import ismrmrd
import numpy as np
import pytest
from conftest import reference_rss, relative_error

from perfline.core.gadget import ChainContext, GadgetError
from perfline.core.runtime import GadgetFailed, run_gadgets
from perfline.gadgets.cartesian_recon import CartesianRecon, CartesianReconSettings
from perfline.server.storage import iter_acquisitions, read_header_xml
from perfline.toolbox import cartesian

rng = np.random.default_rng(7)


def complex_noise(*shape: int) -> np.ndarray:
    return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)) / np.sqrt(2)


def test_prewhitening_makes_noise_covariance_identity() -> None:
    mixing = complex_noise(4, 4) + 2 * np.eye(4)
    noise = mixing @ complex_noise(4, 20000)
    whitening = cartesian.prewhitening_matrix(cartesian.noise_covariance(noise))
    whitened = cartesian.apply_prewhitening(noise.astype(np.complex64), whitening)
    np.testing.assert_allclose(cartesian.noise_covariance(whitened), np.eye(4), atol=0.03)


def test_prewhitening_dwell_ratio_scales_amplitude() -> None:
    covariance = np.diag([1.0, 4.0]).astype(np.complex128)
    whitening = cartesian.prewhitening_matrix(covariance, dwell_ratio=4.0)
    np.testing.assert_allclose(np.abs(np.diag(whitening)), [2.0, 1.0], rtol=1e-6)


def test_singular_noise_covariance_is_reported() -> None:
    with pytest.raises(cartesian.ReconstructionError, match="not positive definite"):
        cartesian.prewhitening_matrix(np.zeros((3, 3), np.complex64))


def test_oversampling_removal_equals_cropping_the_full_image() -> None:
    kspace = complex_noise(3, 16, 64).astype(np.complex64)
    direct = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(kspace, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))
    via_removal = cartesian.kspace_to_image(cartesian.remove_readout_oversampling(kspace, 32))
    np.testing.assert_allclose(via_removal, direct[..., 16:48], atol=1e-5)


def test_unitary_fft_preserves_energy_and_centres_dc() -> None:
    kspace = np.zeros((1, 8, 8), np.complex64)
    kspace[0, 4, 4] = 8.0  # DC at n // 2
    image = cartesian.kspace_to_image(kspace)
    np.testing.assert_allclose(image, np.full((1, 8, 8), 1.0), atol=1e-6)


def test_rss_of_known_coils() -> None:
    images = np.stack([np.full((2, 2), 3.0 + 0j), np.full((2, 2), 4.0j)])
    np.testing.assert_allclose(cartesian.coil_combine_rss(images), np.full((2, 2), 5.0))


def test_walsh_recovers_the_object_from_smooth_sensitivities() -> None:
    rows, cols = np.mgrid[0:48, 0:48] / 48.0
    obj = 1.0 + 0.5 * np.cos(6 * rows)
    raw = np.stack([np.exp(-((rows - r0) ** 2 + (cols - c0) ** 2)) * np.exp(1j * (rows + k * cols))
                    for k, (r0, c0) in enumerate([(0, 0), (1, 0), (0, 1), (1, 1)])])
    sensitivities = raw / np.sqrt(np.sum(np.abs(raw) ** 2, axis=0))
    combined = cartesian.coil_combine_walsh(sensitivities * obj, kernel_size=5)
    np.testing.assert_allclose(np.abs(combined), obj, rtol=1e-3)
    # phase is smooth (referenced to the strongest coil), not random per pixel
    assert np.max(np.abs(np.diff(np.unwrap(np.angle(combined), axis=1), axis=1))) < 0.5


def test_walsh_rejects_even_kernel() -> None:
    with pytest.raises(cartesian.ReconstructionError, match="odd"):
        cartesian.walsh_sensitivities(np.ones((2, 4, 4), np.complex64), kernel_size=4)


def _run(path, **settings) -> list[ismrmrd.Image]:
    header_xml = read_header_xml(path)
    context = ChainContext(header=ismrmrd.xsd.CreateFromDocument(header_xml), header_xml=header_xml)
    gadget = CartesianRecon(CartesianReconSettings(**settings), context)
    return run_gadgets([gadget], iter_acquisitions(path))


def test_gadget_matches_numpy_reference_per_repetition(shepp_logan) -> None:
    path = shepp_logan(matrix=64, coils=4, repetitions=2)
    images = _run(path)
    references = reference_rss(path)
    assert [im.repetition for im in images] == [0, 1]
    for image, reference in zip(images, references):
        assert image.data.shape == (1, 1, 64, 64)
        assert relative_error(image.data[0, 0], reference) < 1e-4
    first = images[0]
    assert first.image_series_index == 1 and first.image_index == 1 and images[1].image_index == 2
    assert tuple(first.field_of_view) == (300.0, 300.0, 6.0)
    assert tuple(first.read_dir) == (1.0, 0.0, 0.0) and tuple(first.slice_dir) == (0.0, 0.0, 1.0)
    meta = first.meta
    assert meta["GADGETRON_DataRole"] == "Image"
    assert meta["GADGETRON_ImageComment"] == "cartesian-recon RSS"
    assert float(meta["GADGETRON_WindowWidth"]) > 0


def test_gadget_prewhitens_with_noise_scans(shepp_logan) -> None:
    path = shepp_logan(matrix=64, coils=4, noise_calibration=True)
    acquisitions = list(iter_acquisitions(path))
    noise = np.concatenate([a.data for a in acquisitions if a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)], axis=1)
    whitening = np.linalg.inv(np.linalg.cholesky(noise @ noise.conj().T / (noise.shape[1] - 1)))
    kspace = np.zeros((4, 64, 128), np.complex128)
    for a in acquisitions:
        if not a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT):
            kspace[:, a.idx.kspace_encode_step_1] = whitening @ a.data
    coil_images = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(kspace, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))
    reference = np.sqrt(np.sum(np.abs(coil_images[:, :, 32:96]) ** 2, axis=0))
    (image,) = _run(path)
    assert relative_error(image.data[0, 0], reference) < 1e-4
    (unwhitened,) = _run(path, prewhiten=False)
    assert relative_error(unwhitened.data[0, 0], reference) > 1e-2


def test_walsh_setting_gives_a_comparable_image(shepp_logan) -> None:
    path = shepp_logan(matrix=64, coils=4)
    (walsh,) = _run(path, coil_combination="walsh", walsh_kernel_size=5)
    (rss,) = _run(path)
    correlation = np.corrcoef(walsh.data.ravel(), rss.data.ravel())[0, 1]
    assert correlation > 0.95
    assert walsh.meta["GADGETRON_ImageComment"] == "cartesian-recon Walsh"


def test_gadget_without_header_fails_clearly(shepp_logan) -> None:
    gadget = CartesianRecon(CartesianReconSettings(), ChainContext())
    with pytest.raises(GadgetFailed, match="needs the MRD XML header") as info:
        run_gadgets([gadget], iter_acquisitions(shepp_logan()))
    assert isinstance(info.value.__cause__, GadgetError)


HEADER_TEMPLATE = """<?xml version="1.0"?>
<ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD">
  <experimentalConditions><H1resonanceFrequency_Hz>63500000</H1resonanceFrequency_Hz></experimentalConditions>
  <encoding>
    <encodedSpace><matrixSize><x>{ex}</x><y>{ey}</y><z>1</z></matrixSize>
      <fieldOfView_mm><x>{fx2}</x><y>{fy}</y><z>8</z></fieldOfView_mm></encodedSpace>
    <reconSpace><matrixSize><x>{rx}</x><y>{ey}</y><z>1</z></matrixSize>
      <fieldOfView_mm><x>{fx}</x><y>{fy}</y><z>8</z></fieldOfView_mm></reconSpace>
    <encodingLimits><kspace_encoding_step_1><minimum>0</minimum><maximum>{maxy}</maximum><center>{cy}</center>
      </kspace_encoding_step_1></encodingLimits>
    <trajectory>{trajectory}</trajectory>
  </encoding>
</ismrmrdHeader>"""


def _context(ex: int = 32, ey: int = 16, rx: int = 16, cy: int = 8, maxy: int = 15,
             trajectory: str = "cartesian") -> ChainContext:
    xml = HEADER_TEMPLATE.format(ex=ex, ey=ey, rx=rx, cy=cy, maxy=maxy, fx=rx * 2.0, fx2=ex * 2.0, fy=ey * 2.5,
                                 trajectory=trajectory)
    return ChainContext(header=ismrmrd.xsd.CreateFromDocument(xml), header_xml=xml)


def _readout(data: np.ndarray, line: int, *, slice: int = 0, center_sample: int | None = None,
             last: bool = False, position=(0.0, 0.0, 0.0)) -> ismrmrd.Acquisition:
    acquisition = ismrmrd.Acquisition.from_array(data.astype(np.complex64))
    acquisition.idx.kspace_encode_step_1 = line
    acquisition.idx.slice = slice
    acquisition.center_sample = data.shape[1] // 2 if center_sample is None else center_sample
    acquisition.position = position
    acquisition.read_dir = (0.0, 1.0, 0.0)
    acquisition.phase_dir = (1.0, 0.0, 0.0)
    acquisition.slice_dir = (0.0, 0.0, 1.0)
    acquisition.sample_time_us = 2.0
    if last:
        acquisition.set_flag(ismrmrd.ACQ_LAST_IN_SLICE)
    return acquisition


def _zero_filled_reference(kspace: np.ndarray, recon_x: int) -> np.ndarray:
    coil_images = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(kspace, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))
    start = (kspace.shape[-1] - recon_x) // 2
    return np.sqrt(np.sum(np.abs(coil_images[..., start:start + recon_x]) ** 2, axis=0))


def test_partial_fourier_and_asymmetric_echo_are_placed_by_centre() -> None:
    """Lines 0..11 with centre line 4 (partial Fourier) and 24-sample readouts with centre sample 8
    (asymmetric echo) land at ky - 4 + 8 and kx offset 16 - 8 of a 16 x 32 matrix."""
    full = complex_noise(2, 16, 32)
    expected = np.zeros_like(full)
    acquisitions = []
    for line in range(12):
        row = line - 4 + 8
        expected[:, row, 8:32] = full[:, row, 8:32]
        acquisitions.append(_readout(full[:, row, 8:32], line, center_sample=8, last=line == 11))
    (image,) = run_gadgets([CartesianRecon(context=_context(cy=4, maxy=11))], acquisitions)
    assert relative_error(image.data[0, 0], _zero_filled_reference(expected, 16)) < 1e-5


def test_slices_are_grouped_with_their_own_geometry_and_repeated_lines_averaged() -> None:
    kspaces = [complex_noise(2, 16, 32), complex_noise(2, 16, 32)]
    acquisitions = []
    for line in range(16):
        for slice_index, kspace in enumerate(kspaces):
            position = (0.0, 0.0, 10.0 * slice_index)
            if line == 5:  # an extra noisy average of line 5: the mean must be used
                offset = complex_noise(2, 32)
                acquisitions.append(_readout(kspace[:, line] + offset, line, slice=slice_index, position=position))
                acquisitions.append(_readout(kspace[:, line] - offset, line, slice=slice_index, position=position))
            else:
                acquisitions.append(_readout(kspace[:, line], line, slice=slice_index, position=position,
                                             last=line == 15))
    images = run_gadgets([CartesianRecon(context=_context())], acquisitions)
    assert [image.slice for image in images] == [0, 1]
    for image, kspace in zip(images, kspaces):
        assert tuple(image.position) == (0.0, 0.0, 10.0 * image.slice)
        assert tuple(image.read_dir) == (0.0, 1.0, 0.0) and tuple(image.phase_dir) == (1.0, 0.0, 0.0)
        assert tuple(image.field_of_view) == (32.0, 40.0, 8.0)
        assert relative_error(image.data[0, 0], _zero_filled_reference(kspace, 16)) < 1e-5


def test_stream_end_flushes_a_slice_without_last_flag() -> None:
    kspace = complex_noise(2, 16, 32)
    acquisitions = [_readout(kspace[:, line], line) for line in range(16)]
    (image,) = run_gadgets([CartesianRecon(context=_context())], acquisitions)
    assert relative_error(image.data[0, 0], _zero_filled_reference(kspace, 16)) < 1e-5


@pytest.mark.parametrize("context, acquisition, message", [
    (_context(trajectory="radial"), _readout(np.ones((2, 32)), 0), "takes Cartesian data"),
    (_context(), _readout(np.ones((2, 32)), 20), "outside the encoded matrix of 16 lines"),
    (_context(), _readout(np.ones((2, 40)), 0), "does not fit the encoded matrix x = 32"),
], ids=["radial", "line-outside", "readout-too-long"])
def test_inconsistent_data_is_a_clear_gadget_error(context, acquisition, message) -> None:
    with pytest.raises(GadgetFailed, match=message):
        run_gadgets([CartesianRecon(context=context)], [acquisition])
