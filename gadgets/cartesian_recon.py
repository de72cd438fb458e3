"""``cartesian-recon``: multi-coil Cartesian k-space (MRD acquisitions) -> magnitude images.

Per (slice, contrast, phase, repetition, set): collect readouts into k-space
``[coils, ky, kx]`` (noise-prewhitened when noise scans came first; repeated lines averaged),
and at ``ACQ_LAST_IN_SLICE`` (or the end of the stream) remove readout oversampling,
inverse-FFT and combine the coils (RSS or adaptive Walsh). The algorithms live in
``perfline.toolbox.cartesian``; this gadget only groups and places the data.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import ismrmrd
import numpy as np
from pydantic import Field

from perfline.core.gadget import Gadget, GadgetError, GadgetSettings, register_gadget
from perfline.gadgets.mrd_images import make_image
from perfline.gadgets.perfusion_items import ImageGeometry
from perfline.toolbox import cartesian

_SKIPPED_FLAGS = (ismrmrd.ACQ_IS_NAVIGATION_DATA, ismrmrd.ACQ_IS_PHASECORR_DATA,
                  ismrmrd.ACQ_IS_PARALLEL_CALIBRATION)
_DEFAULT_DIRECTIONS = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))


class CartesianReconSettings(GadgetSettings):
    """Settings of ``cartesian-recon``."""

    coil_combination: Literal["rss", "walsh"] = Field("rss", description="root-sum-of-squares or adaptive Walsh")
    walsh_kernel_size: int = Field(7, ge=1, le=63, description="Walsh correlation window, pixels (odd)")
    prewhiten: bool = Field(True, description="noise prewhitening when noise scans are present")
    image_series_index: int = Field(1, ge=0, le=65535, description="MRD image_series_index of the output")


@dataclass
class _Buffer:
    kspace: np.ndarray                    # complex64 [coils, ky, kx] (sum of repeated lines)
    counts: np.ndarray                    # int [ky] readouts summed per line
    first: ismrmrd.Acquisition           # geometry and time stamps
    lines: set[int] = field(default_factory=set)


@register_gadget
class CartesianRecon(Gadget):
    """Reconstruct Cartesian 2D multi-coil k-space into magnitude images."""

    name = "cartesian-recon"
    Settings = CartesianReconSettings
    accepts = (ismrmrd.Acquisition,)
    produces = (ismrmrd.Image,)
    settings: CartesianReconSettings

    def process(self, items: Iterator[ismrmrd.Acquisition]) -> Iterator[ismrmrd.Image]:
        if self.settings.coil_combination == "walsh" and self.settings.walsh_kernel_size % 2 == 0:
            raise GadgetError(f"walsh_kernel_size must be odd, got {self.settings.walsh_kernel_size}")
        encoding = self._encoding()
        noise: list[np.ndarray] = []
        noise_dwell_us = 0.0
        whitening: np.ndarray | None = None
        whitening_ready = False
        buffers: dict[tuple[int, ...], _Buffer] = {}
        self._image_index = 0
        for acquisition in items:
            if acquisition.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT):
                if whitening_ready:
                    self.log.warning("noise scan after imaging data ignored")
                else:
                    noise.append(np.array(acquisition.data))
                    noise_dwell_us = float(acquisition.sample_time_us)
                continue
            if any(acquisition.is_flag_set(flag) for flag in _SKIPPED_FLAGS):
                continue
            if not whitening_ready:
                whitening = self._whitening(noise, noise_dwell_us, float(acquisition.sample_time_us))
                whitening_ready = True
            key = (acquisition.idx.slice, acquisition.idx.contrast, acquisition.idx.phase,
                   acquisition.idx.repetition, acquisition.idx.set)
            self._insert(buffers, key, acquisition, whitening, encoding)
            if acquisition.is_flag_set(ismrmrd.ACQ_LAST_IN_SLICE):
                yield self._reconstruct(buffers.pop(key), encoding)
        for key in sorted(buffers):
            self.log.info("end of stream: reconstructing slice/contrast/phase/repetition/set %s "
                          "without an ACQ_LAST_IN_SLICE flag", key)
            yield self._reconstruct(buffers.pop(key), encoding)

    # -- steps -------------------------------------------------------------------------------
    def _encoding(self) -> dict[str, object]:
        header = self.context.header
        if header is None or not header.encoding:
            raise GadgetError("cartesian-recon needs the MRD XML header with an <encoding> section; none was sent")
        enc = header.encoding[0]
        if enc.trajectory is not None and str(getattr(enc.trajectory, "value", enc.trajectory)) != "cartesian":
            raise GadgetError(f"cartesian-recon takes Cartesian data, the header says trajectory {enc.trajectory}")
        encoded, recon = enc.encodedSpace, enc.reconSpace
        if encoded.matrixSize.z > 1:
            raise GadgetError(f"cartesian-recon reconstructs 2D encodings; encodedSpace z = {encoded.matrixSize.z}")
        limits = enc.encodingLimits
        step1 = limits.kspace_encoding_step_1 if limits is not None else None
        center_line = step1.center if step1 is not None and step1.center is not None else encoded.matrixSize.y // 2
        return {
            "encoded_x": int(encoded.matrixSize.x), "encoded_y": int(encoded.matrixSize.y),
            "recon_x": int(recon.matrixSize.x), "recon_y": int(recon.matrixSize.y),
            "fov_mm": (float(recon.fieldOfView_mm.x), float(recon.fieldOfView_mm.y), float(recon.fieldOfView_mm.z)),
            "center_line": int(center_line),
        }

    def _whitening(self, noise: list[np.ndarray], noise_dwell_us: float,
                   acquisition_dwell_us: float) -> np.ndarray | None:
        if not noise or not self.settings.prewhiten:
            return None
        samples = np.concatenate(noise, axis=1)
        ratio = noise_dwell_us / acquisition_dwell_us if noise_dwell_us > 0 and acquisition_dwell_us > 0 else 1.0
        self.log.info("noise prewhitening from %d noise samples x %d coils (dwell ratio %.3g)",
                      samples.shape[1], samples.shape[0], ratio)
        try:
            return cartesian.prewhitening_matrix(cartesian.noise_covariance(samples), ratio)
        except cartesian.ReconstructionError as error:
            raise GadgetError(f"noise prewhitening failed: {error}") from error

    def _insert(self, buffers: dict[tuple[int, ...], _Buffer], key: tuple[int, ...],
                acquisition: ismrmrd.Acquisition, whitening: np.ndarray | None,
                encoding: dict[str, object]) -> None:
        coils, samples = acquisition.data.shape
        encoded_x, encoded_y = int(encoding["encoded_x"]), int(encoding["encoded_y"])
        line = int(acquisition.idx.kspace_encode_step_1) - int(encoding["center_line"]) + encoded_y // 2
        if not 0 <= line < encoded_y:
            raise GadgetError(f"readout for ky {acquisition.idx.kspace_encode_step_1} lands at line {line}, "
                              f"outside the encoded matrix of {encoded_y} lines")
        start = encoded_x // 2 - int(acquisition.center_sample) if samples < encoded_x else 0
        if samples > encoded_x or start < 0 or start + samples > encoded_x:
            raise GadgetError(f"readout of {samples} samples (center {acquisition.center_sample}) does not fit "
                              f"the encoded matrix x = {encoded_x}")
        buffer = buffers.get(key)
        if buffer is None:
            buffer = _Buffer(kspace=np.zeros((coils, encoded_y, encoded_x), np.complex64),
                             counts=np.zeros(encoded_y, np.int32), first=acquisition)
            buffers[key] = buffer
        elif buffer.kspace.shape[0] != coils:
            raise GadgetError(f"coil count changed from {buffer.kspace.shape[0]} to {coils} within {key}")
        data = acquisition.data
        if whitening is not None:
            data = cartesian.apply_prewhitening(data, whitening)
        buffer.kspace[:, line, start:start + samples] += data
        buffer.counts[line] += 1

    def _reconstruct(self, buffer: _Buffer, encoding: dict[str, object]) -> ismrmrd.Image:
        kspace = buffer.kspace
        repeated = buffer.counts > 1
        if repeated.any():
            kspace[:, repeated] /= buffer.counts[repeated][np.newaxis, :, np.newaxis]
        recon_x, recon_y = int(encoding["recon_x"]), int(encoding["recon_y"])
        if kspace.shape[-1] > recon_x:
            kspace = cartesian.remove_readout_oversampling(kspace, recon_x)
        coil_images = cartesian.kspace_to_image(kspace)
        coil_images = cartesian.centered_crop(cartesian.centered_crop(coil_images, recon_y, axis=1), recon_x, axis=2)
        if self.settings.coil_combination == "rss":
            magnitude = cartesian.coil_combine_rss(coil_images)
        else:
            magnitude = np.abs(cartesian.coil_combine_walsh(coil_images, self.settings.walsh_kernel_size))
        first = buffer.first
        fov = encoding["fov_mm"]
        geometry = ImageGeometry(
            field_of_view_mm=fov,  # type: ignore[arg-type]
            position=tuple(first.position),  # type: ignore[arg-type]
            read_dir=_direction(first.read_dir, 0),
            phase_dir=_direction(first.phase_dir, 1),
            slice_dir=_direction(first.slice_dir, 2),
            patient_table_position=tuple(first.patient_table_position),  # type: ignore[arg-type]
            pixel_spacing_mm=(fov[1] / recon_y, fov[0] / recon_x),  # type: ignore[index]
        )
        self._image_index += 1
        method = "RSS" if self.settings.coil_combination == "rss" else "Walsh"
        return make_image(
            magnitude.astype(np.float32), geometry, series_index=self.settings.image_series_index,
            image_index=self._image_index, slice=first.idx.slice, repetition=first.idx.repetition,
            data_role="Image", comment=f"cartesian-recon {method}", seq_description="cartesian_recon",
            header_fields={
                "contrast": first.idx.contrast, "phase": first.idx.phase, "set": first.idx.set,
                "average": first.idx.average, "measurement_uid": first.measurement_uid,
                "acquisition_time_stamp": first.acquisition_time_stamp,
                "physiology_time_stamp": tuple(first.physiology_time_stamp),
            })


def _direction(values: object, axis: int) -> tuple[float, float, float]:
    """The acquisition's direction cosine, or the scanner axis if the scanner left it zero."""
    vector = tuple(float(v) for v in values)  # type: ignore[union-attr]
    if not any(vector):
        return _DEFAULT_DIRECTIONS[axis]
    return vector  # type: ignore[return-value]
