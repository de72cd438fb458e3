"""MRD HDF5 files: record an incoming stream for replay, read datasets, write results.

Layout follows the MRD HDF5 convention (``ismrmrd.Dataset``): group ``<name>`` with ``xml``
(header), ``data`` (acquisitions), ``waveforms`` and image series ``image_<series>`` (FIRE's
client naming).
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import ismrmrd
import numpy as np

logger = logging.getLogger(__name__)

# h5py serialises calls with its own lock, but concurrent use of files from several threads
# (8 clients reading while sessions record) still crashed it; every access here takes this lock
# and no file stays open across a ``yield``.
HDF5_LOCK = threading.RLock()


class DatasetError(ValueError):
    """An MRD HDF5 file lacks what was expected."""


class StreamRecorder:
    """Appends everything a client streams to an MRD HDF5 file (``--save-dir``)."""

    def __init__(self, path: Path, header_xml: str) -> None:
        self.path = path
        with HDF5_LOCK:
            self._dataset = ismrmrd.Dataset(str(path), "dataset", create_if_needed=True)
            if header_xml:
                self._dataset.write_xml_header(header_xml.encode("utf-8"))

    @classmethod
    def create(cls, directory: Path, connection_id: str, header_xml: str, *, config: str,
               parameters: dict[str, Any]) -> StreamRecorder:
        directory.mkdir(parents=True, exist_ok=True)
        safe_id = re.sub(r"[^A-Za-z0-9_-]", "_", connection_id)
        path = directory / f"{time.strftime('%Y%m%d-%H%M%S')}_{safe_id}.h5"
        recorder = cls(path, header_xml)
        with HDF5_LOCK:
            group = recorder._dataset._file.require_group("dataset")
            group.attrs["perfline_config"] = config
            group.attrs["perfline_parameters"] = json.dumps(parameters)
        logger.info("saving the incoming stream to %s", path, extra={"connection": connection_id})
        return recorder

    def write(self, item: Any) -> None:
        with HDF5_LOCK:
            if isinstance(item, ismrmrd.Acquisition):
                self._dataset.append_acquisition(item)
            elif isinstance(item, ismrmrd.Image):
                self._dataset.append_image(f"image_{item.image_series_index}", item)
            elif isinstance(item, ismrmrd.Waveform):
                self._dataset.append_waveform(item)

    def close(self) -> None:
        with HDF5_LOCK:
            self._dataset.close()


def read_header_xml(path: str | Path, group: str = "dataset") -> str:
    """The XML header of an MRD HDF5 dataset ("" if it has none)."""
    with HDF5_LOCK, h5py.File(path, "r") as handle:
        if group not in handle:
            raise DatasetError(f"{path}: no group {group!r}; groups: {sorted(handle)}")
        if "xml" not in handle[group]:
            return ""
        value = handle[group]["xml"][0]
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def iter_acquisitions(path: str | Path, group: str = "dataset", chunk: int = 512) -> Iterator[ismrmrd.Acquisition]:
    """Acquisitions of an MRD HDF5 dataset in file order, read in chunks of ``chunk`` rows."""
    with HDF5_LOCK, h5py.File(path, "r") as handle:
        if group not in handle or "data" not in handle[group]:
            return
        total = handle[group]["data"].shape[0]
    for start in range(0, total, chunk):
        with HDF5_LOCK, h5py.File(path, "r") as handle:
            rows = handle[group]["data"][start:start + chunk]
        for row in rows:
            acquisition = ismrmrd.Acquisition(row["head"].tobytes())
            data = np.asarray(row["data"], dtype=np.float32).view(np.complex64)
            acquisition.data[:] = data.reshape(acquisition.active_channels, acquisition.number_of_samples)
            if acquisition.trajectory_dimensions:
                acquisition.traj[:] = np.asarray(row["traj"], dtype=np.float32).reshape(
                    acquisition.number_of_samples, acquisition.trajectory_dimensions)
            yield acquisition


def image_series_names(path: str | Path, group: str = "dataset") -> list[str]:
    """Names of the image series groups (``image_*`` / ``images*``) in ``group``."""
    with HDF5_LOCK, h5py.File(path, "r") as handle:
        if group not in handle:
            return []
        return sorted(name for name in handle[group]
                      if name.startswith("image") and isinstance(handle[group][name], h5py.Group))


def iter_images(path: str | Path, group: str = "dataset") -> Iterator[ismrmrd.Image]:
    """Every image of every image series in ``group``."""
    for name in image_series_names(path, group):
        with HDF5_LOCK:
            dataset = ismrmrd.Dataset(str(path), group, mode="r")
            try:
                images = [dataset.read_image(name, i) for i in range(dataset.number_of_images(name))]
            finally:
                dataset.close()
        yield from images


def write_images(path: str | Path, group: str, images: list[ismrmrd.Image],
                 header_xml: str = "") -> dict[str, int]:
    """Append images to ``path`` under ``group/image_<series>``; returns images per series."""
    counts: dict[str, int] = {}
    with HDF5_LOCK:
        return _write_images_locked(path, group, images, header_xml, counts)


def _write_images_locked(path: str | Path, group: str, images: list[ismrmrd.Image], header_xml: str,
                         counts: dict[str, int]) -> dict[str, int]:
    dataset = ismrmrd.Dataset(str(path), group, create_if_needed=True)
    try:
        if header_xml:
            dataset.write_xml_header(header_xml.encode("utf-8"))
        for image in images:
            name = f"image_{image.image_series_index}"
            dataset.append_image(name, image)
            counts[name] = counts.get(name, 0) + 1
    finally:
        dataset.close()
    return counts
