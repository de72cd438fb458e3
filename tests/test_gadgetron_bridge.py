"""Gadgetron external-node bridge, driven like Gadgetron drives `python -m gadgetron PORT MODULE TARGET`.

The test plays Gadgetron's side of the socket (CONFIG, HEADER, items, CLOSE; then reads what the
node sends back); the node side is the `gadgetron` package's own Connection.
"""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
import threading
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import ismrmrd
import numpy as np
import pytest

gadgetron = pytest.importorskip("gadgetron")
from gadgetron.external import Connection  # noqa: E402

from perfline.gadgets import gadgetron_bridge  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
HEADER_XML = """<?xml version="1.0"?>
<ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD">
  <subjectInformation><patientID>GT-1</patientID></subjectInformation>
  <experimentalConditions><H1resonanceFrequency_Hz>63500000</H1resonanceFrequency_Hz></experimentalConditions>
  <encoding>
    <encodedSpace><matrixSize><x>8</x><y>8</y><z>1</z></matrixSize><fieldOfView_mm><x>80</x><y>80</y><z>8</z></fieldOfView_mm></encodedSpace>
    <reconSpace><matrixSize><x>8</x><y>8</y><z>1</z></matrixSize><fieldOfView_mm><x>80</x><y>80</y><z>8</z></fieldOfView_mm></reconSpace>
    <encodingLimits></encodingLimits>
    <trajectory>cartesian</trajectory>
  </encoding>
</ismrmrdHeader>"""


def config_xml(**properties: str) -> bytes:
    body = "".join(f'<property name="{k}" value="{v}"/>' for k, v in properties.items())
    return f"<configuration>{body}</configuration>".encode()


def images(n: int = 3) -> list[ismrmrd.Image]:
    out = []
    for index in range(n):
        image = ismrmrd.Image.from_array(np.full((1, 1, 6, 8), index + 1, np.float32))
        image.image_index = index
        out.append(image)
    return out


def play_gadgetron(sock: socket.socket, config: bytes, items: list) -> tuple[list[ismrmrd.Image], list[str], bool]:
    """Send config, header, items and CLOSE; return (images, texts, closed) sent back by the node."""
    sock.sendall(struct.pack("<HI", 2, len(config)) + config)
    header = HEADER_XML.encode()
    sock.sendall(struct.pack("<HI", 3, len(header)) + header)
    writer = lambda data: sock.sendall(data)  # noqa: E731
    for item in items:
        if isinstance(item, ismrmrd.Image):
            sock.sendall(struct.pack("<H", 1022))
            item.serialize_into(writer)
        else:
            sock.sendall(struct.pack("<H", 1008))
            item.serialize_into(writer)
    sock.sendall(struct.pack("<H", 4))

    def read(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("node closed the socket without CLOSE")
            data += chunk
        return data

    got_images, texts = [], []
    while True:
        (message_id,) = struct.unpack("<H", read(2))
        if message_id == 4:
            return got_images, texts, True
        if message_id == 1022:
            got_images.append(ismrmrd.Image.deserialize_from(read))
        elif message_id == 5:
            (length,) = struct.unpack("<I", read(4))
            texts.append(read(length).decode())
        else:
            raise AssertionError(f"unexpected message id {message_id}")


def run_in_process(target, config: bytes, items: list):
    parent, child = socket.socketpair()
    parent.settimeout(60)

    def node() -> None:
        with Connection(child) as connection:  # the package's own Connection; CLOSE on exit
            target(connection)

    thread = threading.Thread(target=node, daemon=True)
    thread.start()
    try:
        return play_gadgetron(parent, config, items)
    finally:
        thread.join(timeout=60)
        parent.close()
        assert not thread.is_alive()


def test_config_properties():
    element = ElementTree.fromstring(config_xml(chain="passthrough", parameters="{}"))
    assert gadgetron_bridge.config_properties(element) == {"chain": "passthrough", "parameters": "{}"}
    assert gadgetron_bridge.config_properties(None) == {}


def test_chain_target_passthrough_in_process():
    sent = images(3)
    got, texts, closed = run_in_process(gadgetron_bridge.chain, config_xml(chain="passthrough"), sent)
    assert closed and texts == []
    assert [i.image_index for i in got] == [0, 1, 2]
    np.testing.assert_array_equal(got[2].data, sent[2].data)


@pytest.mark.parametrize("config, items, message", [
    (config_xml(chain="no-such-chain"), images(2), "unknown chain"),
    (config_xml(), images(1), "no chain named"),
    (config_xml(chain="passthrough", parameters="[1]"), images(1), "JSON object"),
    (config_xml(chain="passthrough"), [ismrmrd.Acquisition.from_array(np.zeros((2, 8), np.complex64))],
     "takes image messages"),
], ids=["unknown-chain", "no-chain", "bad-parameters", "wrong-item-type"])
def test_errors_reach_gadgetron_then_close(config, items, message):
    got, texts, closed = run_in_process(gadgetron_bridge.chain, config, items)
    assert closed and got == []
    assert len(texts) == 1 and texts[0].startswith(gadgetron_bridge.ERROR_PREFIX) and message in texts[0]


def test_python_m_gadgetron_subprocess():
    """The real entry point: `python -m gadgetron PORT perfline.gadgets.gadgetron_bridge passthrough`."""
    server = socket.socket(socket.AF_INET6 if socket.has_ipv6 else socket.AF_INET)
    try:
        server.bind(("localhost", 0))
    except OSError:
        server = socket.socket(socket.AF_INET)
        server.bind(("localhost", 0))
    server.listen(1)
    server.settimeout(90)
    port = server.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "gadgetron", str(port), "perfline.gadgets.gadgetron_bridge",
                                "passthrough"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               env={"GADGETRON_EXTERNAL_LOG_LEVEL": "WARNING", "PATH": "/usr/bin:/bin"})
    try:
        connection, _ = server.accept()
        connection.settimeout(90)
        got, texts, closed = play_gadgetron(connection, config_xml(), images(4))
        connection.close()
        assert process.wait(timeout=60) == 0, process.stdout.read().decode()
    finally:
        if process.poll() is None:
            process.kill()
        server.close()
    assert closed and texts == []
    assert [i.image_index for i in got] == [0, 1, 2, 3]


def test_gadgetron_chain_xml_names_the_bridge():
    root = ElementTree.parse(REPO / "chains" / "perfusion-gadgetron.xml").getroot()
    execute = root.find("./stream/external/execute")
    assert execute is not None and execute.get("type") == "python"
    assert execute.get("name") == "perfline.gadgets.gadgetron_bridge"
    assert callable(getattr(gadgetron_bridge, execute.get("target")))
    properties = gadgetron_bridge.config_properties(root.find("./stream/external/configuration"))
    assert properties["text_messages"] == "drop"
    assert {r.findtext("classname") for r in root.iter("reader")} == {"AcquisitionReader", "WaveformReader"}
