"""An MRD client: stream a dataset like a scanner, collect what the server sends back.

``send_dataset`` sends config, header, optional JSON parameters, then acquisitions, images and
waveforms, then CLOSE, while a receiver thread collects images and text concurrently (the
server may answer before the input ends). ``nul_terminate=True`` reproduces FIRE's python
client (strings NUL-terminated, NUL counted in the length).
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ismrmrd

from perfline.server.protocol import (
    Close,
    Header,
    MessageReader,
    MessageWriter,
    ProtocolError,
    ProtocolLimits,
    Text,
)
from perfline.server.storage import iter_acquisitions, iter_images, read_header_xml

logger = logging.getLogger(__name__)


@dataclass
class Results:
    """What the server sent back on one connection.

    Attributes:
        images: returned ``ismrmrd.Image`` objects in arrival order.
        texts: every text message (including the errors).
        errors: text messages starting with ``ERROR`` (and client-side protocol problems).
        other: returned acquisitions / waveforms.
        closed: the server ended with a CLOSE message.
        items_sent, bytes_sent, seconds: what was streamed and how long the connection lasted.
        sent_s: seconds from connecting until the last item (before CLOSE) was sent.
        text_times_s: for each entry of ``texts``, seconds from connecting to its arrival
            (latency of a report = its arrival minus ``sent_s``).
    """

    images: list[ismrmrd.Image] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    other: list[Any] = field(default_factory=list)
    closed: bool = False
    items_sent: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    seconds: float = 0.0
    sent_s: float = 0.0
    text_times_s: list[float] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic, repr=False)

    @property
    def ok(self) -> bool:
        return self.closed and not self.errors

    def stage_timings(self) -> list[dict[str, Any]]:
        """The per-gadget times the server sent (``{"timings": true}`` in the parameters).

        Returns the list of ``{"gadget", "busy_s", "waiting_s", "items_in", "items_out"}``
        dicts of the ``perfline_stage_timings`` text message, or ``[]`` if none arrived.
        """
        for text in self.texts:
            try:
                data = json.loads(text.rstrip("\x00"))
            except ValueError:
                continue
            if isinstance(data, dict) and isinstance(data.get("perfline_stage_timings"), list):
                return data["perfline_stage_timings"]
        return []


def dataset_items(path: str | Path, group: str = "dataset") -> tuple[str, Iterable[Any]]:
    """(header XML, iterator over acquisitions then images) of an MRD HDF5 file."""
    header_xml = read_header_xml(path, group)

    def items() -> Iterable[Any]:
        yield from iter_acquisitions(path, group)
        yield from iter_images(path, group)

    return header_xml, items()


def _receive(reader: MessageReader, results: Results, done: threading.Event) -> None:
    try:
        while True:
            message = reader.read_message()
            if isinstance(message, Close):
                results.closed = True
                return
            if isinstance(message, Text):
                results.texts.append(message.text)
                results.text_times_s.append(time.monotonic() - results.started)
                if message.text.lstrip().startswith("ERROR"):
                    results.errors.append(message.text)
                    logger.error("server: %s", message.text)
            elif isinstance(message, ismrmrd.Image):
                results.images.append(message)
            else:
                results.other.append(message)
    except ProtocolError as error:
        results.errors.append(f"client: {error}")
    finally:
        results.bytes_received = reader.bytes_read
        done.set()


def send_dataset(source: str | Path | Iterable[Any], host: str, port: int, config: str | None = None, *,
                 config_text: str | None = None, header_xml: str | None = None,
                 parameters: dict[str, Any] | None = None, group: str = "dataset",
                 nul_terminate: bool = False, timeout_s: float = 600.0,
                 progress: Callable[[int], None] | None = None) -> Results:
    """Stream ``source`` to an MRD server and return what came back.

    Args:
        source: an MRD HDF5 path (header, acquisitions and images of ``group`` are sent) or an
            iterable of ``ismrmrd`` Acquisition/Image/Waveform objects.
        config: chain name for a CONFIG_FILE message; or give ``config_text`` (a TOML chain).
        header_xml: XML header to send (default: the file's; none for an iterable).
        parameters: JSON object sent as a text message right after the header.
        nul_terminate: send strings NUL-terminated like FIRE's client.
        timeout_s: idle limit for the receiving side.
        progress: called with the number of items sent so far.
    """
    if (config is None) == (config_text is None):
        raise ValueError("give exactly one of config (a chain name) or config_text (a chain file's text)")
    if isinstance(source, (str, Path)):
        file_header, items = dataset_items(source, group)
        header_xml = file_header if header_xml is None else header_xml
    else:
        items = source
    results = Results()
    started = results.started
    with socket.create_connection((host, port), timeout=timeout_s) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        writer = MessageWriter(sock, nul_terminate=nul_terminate)
        reader = MessageReader(sock, ProtocolLimits(idle_timeout_s=timeout_s))
        done = threading.Event()
        receiver = threading.Thread(target=_receive, args=(reader, results, done), daemon=True,
                                    name="mrd-client-receiver")
        receiver.start()
        try:
            writer.send(ismrmrd.ConfigFile(config) if config is not None else ismrmrd.ConfigText(config_text))
            if header_xml:
                writer.send(Header(header_xml))
            if parameters is not None:
                writer.send(Text(json.dumps(parameters)))
            for item in items:
                if done.is_set():
                    logger.info("server closed the stream after %d items; stop sending", results.items_sent)
                    break
                writer.send(item)
                results.items_sent += 1
                if progress is not None:
                    progress(results.items_sent)
            results.sent_s = time.monotonic() - started
            if not done.is_set():
                writer.send(Close())
        except OSError as error:
            logger.info("sending stopped: %s", error)
        results.bytes_sent = writer.bytes_written
        receiver.join(timeout_s)
        if receiver.is_alive():
            results.errors.append(f"client: no CLOSE from the server within {timeout_s:g} s")
    results.seconds = time.monotonic() - started
    return results
