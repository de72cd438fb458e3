"""Every error case ends in ERROR + CLOSE (where the socket works), a log line with the
connection id, and a server that still serves the next, good client correctly."""

from __future__ import annotations

import logging
import socket
import struct
import time
from collections.abc import Callable, Iterator

import ismrmrd
import numpy as np
import pytest
from conftest import reference_rss, relative_error

from perfline.core.gadget import PureGadget, register_gadget
from perfline.gadgets.mrd_images import make_image
from perfline.gadgets.perfusion_items import ImageGeometry
from perfline.server.client import send_dataset
from perfline.server.protocol import (
    Close,
    Header,
    MessageReader,
    ProtocolError,
    ProtocolLimits,
    Text,
    encode_message,
)
from perfline.server.storage import iter_acquisitions, read_header_xml
from perfline.server.testing import running_server


class _CrashOnThird(PureGadget):
    name = "test-crash-on-third"
    accepts = (ismrmrd.Acquisition,)
    produces = (ismrmrd.Acquisition,)
    count = 0

    def process_item(self, item: ismrmrd.Acquisition) -> ismrmrd.Acquisition:
        self.count += 1
        if self.count == 3:
            raise ZeroDivisionError("simulated crash")
        return item


register_gadget(_CrashOnThird)
CRASH_CHAIN = ('name = "crash"\ninput = ["acquisition"]\n[[gadgets]]\ngadget = "test-crash-on-third"\n'
               '[[gadgets]]\ngadget = "cartesian-recon"\n')
LIMITS = ProtocolLimits(max_message_bytes=1 << 20, max_text_bytes=1 << 16, idle_timeout_s=1.0)


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, int]]:
    with running_server(limits=LIMITS, drain_timeout_s=2.0) as address:
        yield address


def config(name: str) -> bytes:
    return encode_message(ismrmrd.ConfigFile(name))


def exchange(address: tuple[str, int], payload: bytes, *, half_close: bool = True) -> list[object]:
    """Send raw bytes, optionally half-close, and read every message until CLOSE or EOF."""
    received: list[object] = []
    with socket.create_connection(address, timeout=30) as sock:
        sock.sendall(payload)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        reader = MessageReader(sock, ProtocolLimits(idle_timeout_s=30))
        try:
            while not isinstance(message := reader.read_message(), Close):
                received.append(message)
            received.append(message)
        except ProtocolError as error:
            received.append(error)
    return received


def assert_error_then_close(received: list[object], pattern: str) -> None:
    texts = [m.text for m in received if isinstance(m, Text)]
    assert len(texts) == 1 and texts[0].startswith("ERROR"), received
    assert pattern in texts[0], texts[0]
    assert isinstance(received[-1], Close), received


def assert_good_client(address: tuple[str, int], path) -> None:
    results = send_dataset(path, *address, "cartesian-recon")
    assert results.ok, results.errors
    assert relative_error(results.images[0].data[0, 0], reference_rss(path)[0]) < 1e-4


def _image() -> ismrmrd.Image:
    return make_image(np.ones((8, 8), np.float32), ImageGeometry(field_of_view_mm=(8.0, 8.0, 1.0)),
                      series_index=1, image_index=0, slice=0, data_role="Image")


def _cases(path) -> dict[str, tuple[Callable[[], bytes], str]]:
    header = encode_message(Header(read_header_xml(path)))
    acquisitions = [encode_message(a) for a in list(iter_acquisitions(path))[:5]]
    huge = ismrmrd.Acquisition.from_array(np.zeros((64, 4096), np.complex64))  # 2 MiB > 1 MiB
    return {
        "unknown-message-id": (lambda: config("cartesian-recon") + header + acquisitions[0]
                               + struct.pack("<H", 4242), "unknown message id 4242"),
        "truncated-message": (lambda: config("cartesian-recon") + header + acquisitions[0][:100],
                              "stream ended inside acquisition header"),
        "unparsable-header": (lambda: config("cartesian-recon") + encode_message(Header("<ismrmrdHeader><oops")),
                              "unparsable XML header"),
        "unknown-chain": (lambda: config("no-such-chain.xml") + header, "unknown chain 'no-such-chain.xml'"),
        "images-for-kspace-chain": (lambda: config("cartesian-recon") + header + encode_message(_image()),
                                    "chain 'cartesian-recon' takes acquisition messages, got image"),
        "gadget-crash": (lambda: encode_message(ismrmrd.ConfigText(CRASH_CHAIN)) + header
                         + b"".join(acquisitions) + encode_message(Close()),
                         "gadget 'test-crash-on-third' failed: ZeroDivisionError: simulated crash"),
        "message-too-large": (lambda: config("cartesian-recon") + header + encode_message(huge),
                              "acquisition of 2097152 bytes exceeds the limit of 1048576 bytes"),
        "text-too-large": (lambda: config("cartesian-recon") + struct.pack("<HI", 3, 1 << 20),
                           "XML header of 1048576 bytes exceeds the limit"),
        "bad-json-parameters": (lambda: config("cartesian-recon") + header + encode_message(Text("{not json")),
                                "must be a JSON object"),
        "data-before-config": (lambda: acquisitions[0], "expected a config message"),
        "invalid-config-text": (lambda: encode_message(ismrmrd.ConfigText('name = "x"\ninput = ["image"]\n'
                                                                          '[[gadgets]]\ngadget = "evil.module"\n')),
                                "unknown gadget 'evil.module'"),
    }


CASES = ["unknown-message-id", "truncated-message", "unparsable-header", "unknown-chain",
         "images-for-kspace-chain", "gadget-crash", "message-too-large", "text-too-large",
         "bad-json-parameters", "data-before-config", "invalid-config-text"]


@pytest.mark.parametrize("case", CASES)
def test_error_reaches_client_and_server_keeps_serving(case: str, shepp_logan, server, caplog) -> None:
    path = shepp_logan()
    payload, pattern = _cases(path)[case]
    with caplog.at_level(logging.ERROR, logger="perfline"):
        received = exchange(server, payload())
    assert_error_then_close(received, pattern)
    records = [r for r in caplog.records if pattern.split("'")[0] in r.getMessage()]
    assert records and all(getattr(r, "connection", "-") != "-" for r in records)
    assert_good_client(server, path)


def test_gadget_crash_mid_stream_with_client_still_sending(shepp_logan, server) -> None:
    """The client keeps streaming after the crash: it still gets ERROR then CLOSE, no reset."""
    results = send_dataset(shepp_logan(matrix=64, coils=4, repetitions=2), *server, config_text=CRASH_CHAIN)
    assert results.closed
    assert results.errors == ["ERROR gadget 'test-crash-on-third' failed: ZeroDivisionError: simulated crash"]
    assert_good_client(server, shepp_logan())


def test_client_vanishing_mid_stream(shepp_logan, server, caplog) -> None:
    path = shepp_logan()
    payload = config("cartesian-recon") + encode_message(Header(read_header_xml(path)))
    acquisitions = [encode_message(a) for a in list(iter_acquisitions(path))[:11]]
    payload += b"".join(acquisitions[:10]) + acquisitions[10][:500]  # ends inside a message
    with caplog.at_level(logging.ERROR, logger="perfline"):
        sock = socket.create_connection(server, timeout=10)
        sock.sendall(payload)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # abortive close (RST), like a crashed client
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any("ERROR" in r.getMessage() for r in caplog.records):
            time.sleep(0.05)
    messages = [r.getMessage() for r in caplog.records]
    assert any("ERROR" in m and ("connection lost" in m or "stream ended" in m or "vanished" in m)
               for m in messages), messages
    assert_good_client(server, path)


def test_idle_client_gets_a_timeout_error(shepp_logan, server) -> None:
    received = exchange(server, config("cartesian-recon"), half_close=False)
    assert_error_then_close(received, "no data from the peer for 1 s")
    assert_good_client(server, shepp_logan())


def test_busy_server_refuses_with_an_error(shepp_logan) -> None:
    with running_server(max_connections=1, limits=LIMITS) as address:
        with socket.create_connection(address, timeout=10) as first:
            first.sendall(config("cartesian-recon"))
            time.sleep(0.2)
            received = exchange(address, b"")
            assert_error_then_close(received, "server busy")
        time.sleep(1.5)  # the idle first session ends
        assert_good_client(address, shepp_logan())


def test_client_hanging_up_after_a_gadget_error_is_not_a_second_error(shepp_logan, server, caplog) -> None:
    path = shepp_logan()
    payload = encode_message(ismrmrd.ConfigText(CRASH_CHAIN)) + encode_message(Header(read_header_xml(path)))
    payload += b"".join(encode_message(a) for a in list(iter_acquisitions(path))[:5])
    with caplog.at_level(logging.INFO, logger="perfline"):
        received = exchange(server, payload, half_close=False)  # reads ERROR + CLOSE, hangs up, no CLOSE
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not any("closed after" in r.getMessage() for r in caplog.records):
            time.sleep(0.05)
    assert_error_then_close(received, "simulated crash")
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "simulated crash" in errors[0], errors
    assert_good_client(server, path)
