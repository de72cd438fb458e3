"""``perfline send`` / ``send_dataset``: inputs, output file layout, options."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import ismrmrd
import numpy as np
import pytest

from perfline.cli import main
from perfline.core.gadget import PureGadget, register_gadget
from perfline.core.items import TextItem
from perfline.gadgets.mrd_images import make_image
from perfline.gadgets.perfusion_items import ImageGeometry
from perfline.server.client import send_dataset
from perfline.server.storage import iter_images, write_images
from perfline.server.testing import running_server


class _ReportParameters(PureGadget):
    name = "test-report-parameters"
    accepts = (ismrmrd.Image,)
    produces = (ismrmrd.Image, TextItem)

    def process_item(self, item: ismrmrd.Image) -> list:
        return [item, TextItem(json.dumps(self.context.parameters))]


register_gadget(_ReportParameters)


@pytest.fixture(scope="module")
def server():
    with running_server() as address:
        yield address


@pytest.fixture
def image_file(tmp_path: Path) -> Path:
    geometry = ImageGeometry(field_of_view_mm=(100.0, 100.0, 5.0))
    images = [make_image(np.full((16, 16), float(i), np.float32), geometry, series_index=series,
                         image_index=i, slice=0, data_role="Image")
              for i, series in enumerate([2, 2, 5])]
    path = tmp_path / "images.h5"
    write_images(path, "dataset", images)
    return path


def test_send_images_file_writes_a_group_per_run(server, image_file: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out.h5"
    host, port = server
    for run in ("first", "second"):
        assert main(["send", str(image_file), "--host", host, "--port", str(port), "--config", "passthrough",
                     "--out", str(out), "--out-group", run]) == 0
    assert "sent 3 messages" in capsys.readouterr().out
    with h5py.File(out, "r") as handle:
        assert sorted(handle) == ["first", "second"]
        assert sorted(handle["first"]) == ["image_2", "image_5"]
    received = list(iter_images(out, "second"))
    assert [float(im.data.mean()) for im in received] == [0.0, 1.0, 2.0]


def test_send_config_file_and_params(server, image_file: Path, tmp_path: Path) -> None:
    chain = tmp_path / "report.toml"
    chain.write_text('name = "report"\ninput = ["image"]\n[[gadgets]]\ngadget = "test-report-parameters"\n')
    params = tmp_path / "params.json"
    params.write_text('{"stress": true}')
    out = tmp_path / "out.h5"
    host, port = server
    assert main(["send", str(image_file), "--host", host, "--port", str(port), "--config-file", str(chain),
                 "--params", f"@{params}", "--nul-terminate", "--out", str(out), "--out-group", "g"]) == 0
    with h5py.File(out, "r") as handle:
        texts = [t.decode() for t in handle["g"]["texts"][()]]
    assert texts == ['{"stress": true}'] * 3


def test_send_missing_input_file_is_a_clear_error(server, tmp_path: Path, capsys) -> None:
    host, port = server
    status = main(["send", str(tmp_path / "missing.h5"), "--host", host, "--port", str(port),
                   "--config", "passthrough", "--out", str(tmp_path / "o.h5")])
    assert status == 2
    assert "cannot read" in capsys.readouterr().err


def test_send_dataset_needs_exactly_one_config(server) -> None:
    with pytest.raises(ValueError, match="exactly one of config"):
        send_dataset([], *server)
    with pytest.raises(ValueError, match="exactly one of config"):
        send_dataset([], *server, "passthrough", config_text="x")


def test_results_report_what_was_sent(server) -> None:
    geometry = ImageGeometry(field_of_view_mm=(10.0, 10.0, 1.0))
    images = [make_image(np.zeros((4, 4), np.float32), geometry, series_index=1, image_index=i, slice=0,
                         data_role="Image") for i in range(4)]
    progress: list[int] = []
    results = send_dataset(images, *server, "passthrough", progress=progress.append)
    assert results.ok and results.items_sent == 4 and progress == [1, 2, 3, 4]
    assert results.bytes_sent > 4 * 4 * 4 * 4 and results.bytes_received > 0


def test_send_to_a_closed_port_is_a_clear_error(image_file: Path, tmp_path: Path, capsys) -> None:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    status = main(["send", str(image_file), "--port", str(port), "--config", "passthrough",
                   "--out", str(tmp_path / "o.h5")])
    assert status == 1
    assert f"cannot stream to 127.0.0.1:{port}" in capsys.readouterr().err
