"""``perfline serve`` as a process: SIGTERM/SIGINT finish the session in flight, then exit."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import ismrmrd
import pytest
from conftest import reference_rss, relative_error

from perfline.server.protocol import Close, Header, MessageReader, MessageWriter, Text
from perfline.server.storage import iter_acquisitions, read_header_xml


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _connect(port: int, process: subprocess.Popen, timeout: float = 20.0) -> socket.socket:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=10)
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_finishes_the_session_in_flight(shepp_logan, tmp_path, signum: int) -> None:
    path = shepp_logan()
    port = _free_port()
    process = subprocess.Popen([sys.executable, "-m", "perfline.cli", "serve", "--port", str(port)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        sock = _connect(port, process)
        writer = MessageWriter(sock)
        acquisitions = list(iter_acquisitions(path))
        writer.send(ismrmrd.ConfigFile("cartesian-recon"))
        writer.send(Header(read_header_xml(path)))
        half = len(acquisitions) // 2
        for acquisition in acquisitions[:half]:
            writer.send(acquisition)
        time.sleep(0.5)
        process.send_signal(signum)
        time.sleep(0.5)
        with pytest.raises(OSError):  # no new connections once stopping
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        for acquisition in acquisitions[half:]:
            writer.send(acquisition)
        writer.send(Close())
        reader = MessageReader(sock)
        received = []
        while not isinstance(message := reader.read_message(), Close):
            received.append(message)
        sock.close()
        assert not [m for m in received if isinstance(m, Text)]
        (image,) = received
        assert relative_error(image.data[0, 0], reference_rss(path)[0]) < 1e-4
        output, _ = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, output
    assert f"{signal.Signals(signum).name} received" in output
    assert "server stopped" in output
    # log lines of the session carry its connection id in the format
    assert any("[-]" not in line and "chain 'cartesian-recon'" in line for line in output.splitlines())
