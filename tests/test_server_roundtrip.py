"""End-to-end over real loopback TCP: perfline send -> server -> chains -> results file."""

from __future__ import annotations

import json
import socket
import struct
import threading
from pathlib import Path

import h5py
import ismrmrd
import numpy as np
import pytest
from conftest import reference_rss, relative_error

from perfline.cli import main
from perfline.core.gadget import PureGadget, register_gadget
from perfline.core.items import TextItem
from perfline.gadgets.mrd_images import make_image
from perfline.gadgets.perfusion_items import ImageGeometry
from perfline.server.client import send_dataset
from perfline.server.protocol import Close, MessageReader, Text
from perfline.server.storage import iter_acquisitions, iter_images, read_header_xml
from perfline.server.testing import running_server


@pytest.fixture(scope="module")
def server() -> tuple[str, int]:
    with running_server() as address:
        yield address


def test_perfline_send_cartesian_recon_matches_numpy_reference(shepp_logan, server, tmp_path: Path, capsys) -> None:
    """Acceptance: ismrmrd_generate_cartesian_shepp_logan -> perfline send -> cartesian-recon (RSS)."""
    path = shepp_logan(matrix=128, coils=8, repetitions=2)
    out = tmp_path / "results.h5"
    host, port = server
    status = main(["send", str(path), "--host", host, "--port", str(port), "--config", "cartesian-recon.xml",
                   "--out", str(out), "--out-group", "run1"])
    assert status == 0, capsys.readouterr()
    dataset = ismrmrd.Dataset(str(out), "run1", create_if_needed=False)
    assert dataset.number_of_images("image_1") == 2
    images = [dataset.read_image("image_1", i) for i in range(2)]
    dataset.close()
    for image, reference in zip(images, reference_rss(path)):
        assert image.data.shape == (1, 1, 128, 128)
        assert relative_error(image.data[0, 0].astype(np.float64), reference) < 1e-4


def test_send_exits_nonzero_and_prints_server_errors(shepp_logan, server, tmp_path: Path, capsys) -> None:
    host, port = server
    status = main(["send", str(shepp_logan()), "--host", host, "--port", str(port), "--config", "nope",
                   "--out", str(tmp_path / "r.h5")])
    assert status == 1
    assert "ERROR unknown chain 'nope'" in capsys.readouterr().err


def _test_images(count: int = 3) -> list[ismrmrd.Image]:
    geometry = ImageGeometry(field_of_view_mm=(200.0, 150.0, 8.0), position=(1.0, -2.0, 3.5))
    rng = np.random.default_rng(1)
    return [make_image(rng.random((24, 32)).astype(np.float32), geometry, series_index=4, image_index=i,
                       slice=i, data_role="Image", meta={"custom": f"value {i}"}) for i in range(count)]


def test_passthrough_echoes_images_exactly(server) -> None:
    images = _test_images()
    results = send_dataset(images, *server, "passthrough")
    assert results.ok, results.errors
    assert len(results.images) == len(images)
    for sent, received in zip(images, results.images):
        assert received.getHead() == sent.getHead()
        np.testing.assert_array_equal(received.data, sent.data)
        assert received.meta["custom"] == sent.meta["custom"]


def test_chain_sent_as_config_text(shepp_logan, server) -> None:
    path = shepp_logan()
    text = Path(__file__).parents[1].joinpath("chains", "cartesian-recon.toml").read_text()
    results = send_dataset(path, *server, config_text=text.replace("image_series_index = 1", "image_series_index = 9"))
    assert results.ok, results.errors
    assert [im.image_series_index for im in results.images] == [9]


def _fire_string(message_id: int, text: str) -> bytes:
    payload = text.encode("utf-8") + b"\x00"  # FIRE: NUL-terminated, NUL counted in the length
    return struct.pack("<HI", message_id, len(payload)) + payload


def test_fire_client_emulation(shepp_logan, server) -> None:
    """FIRE's python client: CONFIG_FILE name, NUL-terminated header and JSON text, one
    socket.send per part of each message, then CLOSE; it reads images and text until CLOSE."""
    path = shepp_logan()
    header = read_header_xml(path)
    with socket.create_connection(server, timeout=30) as sock:
        sock.sendall(struct.pack("<H", 1) + b"cartesian-recon".ljust(1024, b"\x00"))
        sock.sendall(_fire_string(3, header))
        sock.sendall(_fire_string(5, json.dumps({"parameters": {"customconfig": ""}})))
        for acquisition in iter_acquisitions(path):
            sock.send(struct.pack("<H", 1008))
            acquisition.serialize_into(sock.sendall)
        sock.sendall(struct.pack("<H", 4))
        reader = MessageReader(sock)
        received = []
        while not isinstance(message := reader.read_message(), Close):
            received.append(message)
    assert not [m for m in received if isinstance(m, Text)], received
    (image,) = received
    assert relative_error(image.data[0, 0], reference_rss(path)[0]) < 1e-4


class _EchoParameters(PureGadget):
    """Answers each image with the JSON parameters and the header's institution name."""

    name = "test-echo-parameters"
    accepts = (ismrmrd.Image,)
    produces = (TextItem,)

    def process_item(self, item: ismrmrd.Image) -> TextItem:
        institution = self.context.header.acquisitionSystemInformation.institutionName
        return TextItem(json.dumps({"parameters": self.context.parameters, "institution": institution,
                                    "connection": self.context.connection_id}))


register_gadget(_EchoParameters)
ECHO_CHAIN = 'name = "echo"\ninput = ["image"]\n[[gadgets]]\ngadget = "test-echo-parameters"\n'


@pytest.mark.parametrize("nul_terminate", [False, True], ids=["cpp-strings", "fire-strings"])
def test_header_and_parameters_reach_the_chain_context(shepp_logan, server, nul_terminate: bool) -> None:
    header = read_header_xml(shepp_logan())
    results = send_dataset(_test_images(1), *server, config_text=ECHO_CHAIN, header_xml=header,
                           parameters={"hematocrit": 0.42}, nul_terminate=nul_terminate)
    assert results.ok, results.errors
    (text,) = results.texts
    answer = json.loads(text)
    assert answer["parameters"] == {"hematocrit": 0.42}
    assert answer["institution"] == "ISMRM Synthetic Imaging Lab"
    assert answer["connection"] != "-"


def test_eight_concurrent_clients_get_correct_results(shepp_logan, server) -> None:
    paths = [shepp_logan(matrix=64, coils=4, repetitions=2), shepp_logan(matrix=96, coils=2)]
    references = {p: reference_rss(p) for p in paths}
    results: dict[int, object] = {}

    def client(index: int) -> None:
        results[index] = send_dataset(paths[index % 2], *server, "cartesian-recon")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert sorted(results) == list(range(8))
    for index, result in results.items():
        assert result.ok, result.errors
        expected = references[paths[index % 2]]
        assert len(result.images) == len(expected)
        for image, reference in zip(result.images, expected):
            assert relative_error(image.data[0, 0], reference) < 1e-4


def test_save_dir_records_the_stream_for_replay(shepp_logan, tmp_path: Path) -> None:
    path = shepp_logan(matrix=64, coils=4, noise_calibration=True)
    with running_server(save_dir=tmp_path / "saved") as address:
        first = send_dataset(path, *address, "cartesian-recon")
        images = _test_images(2)
        assert send_dataset(images, *address, "passthrough").ok
    assert first.ok, first.errors
    saved = sorted((tmp_path / "saved").glob("*.h5"))
    assert len(saved) == 2
    with h5py.File(saved[0], "r") as handle:
        assert handle["dataset"].attrs["perfline_config"] == "cartesian-recon"
    assert read_header_xml(saved[0]) == read_header_xml(path)
    original, recorded = list(iter_acquisitions(path)), list(iter_acquisitions(saved[0]))
    assert len(recorded) == len(original)
    assert all(np.array_equal(a.data, b.data) and a.flags == b.flags for a, b in zip(original, recorded))
    assert len(list(iter_images(saved[1]))) == 2
    with running_server() as address:
        replay = send_dataset(saved[0], *address, "cartesian-recon")
    np.testing.assert_array_equal(replay.images[0].data, first.images[0].data)


def _waveform(index: int) -> ismrmrd.Waveform:
    data = np.arange(index, index + 2 * 50, dtype=np.uint32).reshape(2, 50)
    return ismrmrd.Waveform.from_array(data, waveform_id=0, time_stamp=1000 + index, sample_time_us=2.5)


def test_waveforms_pass_through_a_chain_that_takes_them(server) -> None:
    chain = 'name = "w"\ninput = ["image", "waveform"]\n[[gadgets]]\ngadget = "passthrough"\n'
    items = [_waveform(0), *_test_images(2), _waveform(7)]
    results = send_dataset(items, *server, config_text=chain)
    assert results.ok, results.errors
    assert len(results.images) == 2 and len(results.other) == 2
    for sent, received in zip([items[0], items[3]], results.other):
        assert received.time_stamp == sent.time_stamp
        np.testing.assert_array_equal(received.data, sent.data)


def test_waveforms_are_skipped_by_a_chain_that_does_not_take_them(shepp_logan, server) -> None:
    path = shepp_logan()
    acquisitions = list(iter_acquisitions(path))
    items = [_waveform(0)] + acquisitions[:10] + [_waveform(1)] + acquisitions[10:]
    results = send_dataset(items, *server, "cartesian-recon", header_xml=read_header_xml(path))
    assert results.ok, results.errors
    assert relative_error(results.images[0].data[0, 0], reference_rss(path)[0]) < 1e-4
