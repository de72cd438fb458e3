"""One client connection: handshake, a private chain instance, streaming in and out.

Sequence (REFERENCES.md §8): config (CONFIG_FILE name or CONFIG_TEXT chain) -> optional XML
header -> optional JSON text (parameters) -> acquisitions / images / waveforms -> CLOSE.
A reader (this thread) feeds the chain; a sender thread streams the chain's outputs back.

Every failure (protocol, unknown chain, bad header, wrong input type, gadget crash, idle
client) ends in one ``ERROR ...`` text message and a CLOSE to the client while its socket
still works, a log line with the connection id, and a clean stop of this chain only. After
an error the rest of the client's stream is read and discarded (bounded by the idle
timeout) so the client sees the error instead of a connection reset.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import socket
import threading
import time
from pathlib import Path
from typing import Any

import ismrmrd

from perfline.core.chain import SENDABLE_TYPES, ChainError, ChainSpec, parse_chain, resolve_chain
from perfline.core.gadget import ChainContext
from perfline.core.items import TextItem
from perfline.core.runtime import ChainStopped, GadgetFailed, RunningChain
from perfline.server.protocol import (
    Close,
    Header,
    IdleTimeoutError,
    MessageReader,
    MessageWriter,
    PeerClosedError,
    ProtocolError,
    ProtocolLimits,
    Text,
)
from perfline.server.storage import StreamRecorder

logger = logging.getLogger("perfline.server.session")
_MESSAGE_NAMES = {ismrmrd.Acquisition: "acquisition", ismrmrd.Image: "image", ismrmrd.Waveform: "waveform"}


class SessionError(Exception):
    """A client request that cannot be served (bad header, wrong message order or type)."""


class ConnectionLog(logging.LoggerAdapter):
    """Sets ``record.connection`` (shown by ``perfline serve``'s log format) on every line."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        kwargs.setdefault("extra", {})["connection"] = self.extra["connection"]
        return msg, kwargs


class Session:
    """Serves one connected client; :meth:`run` returns when the connection is closed."""

    def __init__(self, sock: socket.socket, connection_id: str, *, limits: ProtocolLimits,
                 chain_dir: Path | None = None, save_dir: Path | None = None,
                 output_dir: Path | None = None, drain_timeout_s: float = 10.0) -> None:
        self.sock = sock
        self.connection_id = connection_id
        self.limits = limits
        self.chain_dir = chain_dir
        self.save_dir = save_dir
        self.output_dir = output_dir
        self.drain_timeout_s = drain_timeout_s
        self.log = ConnectionLog(logger, {"connection": connection_id})
        self.reader = MessageReader(sock, limits)
        self.writer = MessageWriter(sock)
        self.chain: RunningChain | None = None
        self.spec: ChainSpec | None = None
        self.recorder: StreamRecorder | None = None
        self._error_sent = False
        self._send_lock = threading.Lock()
        self._sender: threading.Thread | None = None
        self._chain_failed = threading.Event()
        self.items_in = 0
        self.items_out = 0
        self.waveforms_skipped = 0

    # -- entry point ---------------------------------------------------------------------
    def run(self) -> None:
        started = time.monotonic()
        try:
            self._serve()
        except (ProtocolError, ChainError, SessionError) as error:
            if self._chain_failed.is_set() and self._error_sent:
                # the gadget error is reported; the client may hang up without a CLOSE
                self.log.info("stream ended after the reported error: %s", error)
            else:
                self._stop_with_error(self._describe(error))
        except ChainStopped:
            pass  # stopped by the sender thread (client socket failed), already logged there
        except Exception as error:  # noqa: BLE001 - last resort: the client must not hang
            self.log.exception("internal error")
            self._stop_with_error(f"internal server error: {type(error).__name__}: {error}")
        finally:
            self._close_connection()
            if self.recorder is not None:
                self.recorder.close()
            self.log.info("closed after %.2f s: %d messages in, %d items out, %.1f MB in",
                          time.monotonic() - started, self.items_in, self.items_out,
                          self.reader.bytes_read / 1e6)

    @staticmethod
    def _describe(error: Exception) -> str:
        if isinstance(error, PeerClosedError):
            return "client vanished: " + str(error)
        return str(error)

    # -- protocol ------------------------------------------------------------------------
    def _serve(self) -> None:
        first = self.reader.read_message()
        self.spec = self._chain_from_config(first)
        self.log.info("chain %r (%d gadgets)", self.spec.name, len(self.spec.gadgets))

        message = self.reader.read_message()
        header_xml, header = "", None
        if isinstance(message, Header):
            header_xml = message.xml
            header = self._parse_header(header_xml)
            message = self.reader.read_message()
        parameters: dict[str, Any] = {}
        if isinstance(message, Text):
            parameters = self._parse_parameters(message.text)
            message = self.reader.read_message()

        if self.save_dir is not None:
            self.recorder = StreamRecorder.create(self.save_dir, self.connection_id, header_xml,
                                                  config=self.spec.name, parameters=parameters)
        context = ChainContext(header=header, header_xml=header_xml, parameters=parameters,
                               connection_id=self.connection_id, output_dir=self.output_dir)
        self.chain = self.spec.start(context)
        self._sender = threading.Thread(target=self._send_outputs, daemon=True,
                                        name=f"sender-{self.connection_id}")
        self._sender.start()

        while not isinstance(message, Close):
            self._accept(message)
            message = self.reader.read_message()
        self.chain.close()
        self._sender.join()
        if not self._chain_failed.is_set():
            self._report_stage_timings(parameters)
            self._send_final(None)

    def _chain_from_config(self, message: Any) -> ChainSpec:
        if isinstance(message, ismrmrd.ConfigFile):
            return resolve_chain(str(message), self.chain_dir)
        if isinstance(message, ismrmrd.ConfigText):
            return parse_chain(str(message), source="CONFIG_TEXT")
        raise SessionError(f"expected a config message (CONFIG_FILE or CONFIG_TEXT) first, "
                           f"got {type(message).__name__}")

    def _parse_header(self, xml: str) -> Any:
        try:
            return ismrmrd.xsd.CreateFromDocument(xml)
        except Exception as error:  # pyxb raises many exception types for malformed XML
            raise SessionError(f"unparsable XML header: {type(error).__name__}: {error}") from error

    def _parse_parameters(self, text: str) -> dict[str, Any]:
        try:
            parameters = json.loads(text) if text.strip() else {}
        except json.JSONDecodeError as error:
            raise SessionError(f"the text message after the header must be a JSON object: {error}") from error
        if not isinstance(parameters, dict):
            raise SessionError(f"the text message after the header must be a JSON object, "
                               f"got {type(parameters).__name__}")
        return parameters

    def _accept(self, message: Any) -> None:
        assert self.chain is not None and self.spec is not None
        if isinstance(message, Text):
            self.log.info("text message from client ignored (%d chars)", len(message.text))
            return
        if not isinstance(message, (ismrmrd.Acquisition, ismrmrd.Image, ismrmrd.Waveform)):
            raise SessionError(f"unexpected {type(message).__name__} message after the data started")
        if isinstance(message, ismrmrd.Waveform) and not self.spec.accepts_message(message):
            # scanners interleave physiological waveforms with everything; a chain that does not
            # take them simply does not see them
            if self.waveforms_skipped == 0:
                self.log.info("chain %r does not take waveforms; skipping them", self.spec.name)
            self.waveforms_skipped += 1
            return
        if not self.spec.accepts_message(message):
            raise SessionError(f"chain {self.spec.name!r} takes {', '.join(self.spec.input)} messages, "
                               f"got {_MESSAGE_NAMES[type(message)]}")
        self.items_in += 1
        if self.recorder is not None:
            self.recorder.write(message)
        if self._chain_failed.is_set():
            return  # the error is sent; read and discard the rest of the stream
        try:
            self.chain.put(message)
        except ChainStopped:
            if not isinstance(self.chain.error, GadgetFailed):
                raise
            # the sender thread reports the gadget's error; keep reading to the client's CLOSE
            self._chain_failed.set()

    def _send_outputs(self) -> None:
        assert self.chain is not None
        try:
            for item in self.chain.outputs():
                if isinstance(item, TextItem):
                    item = Text(item.text)
                elif not isinstance(item, SENDABLE_TYPES):
                    self.log.debug("dropping %s at the end of the chain", type(item).__name__)
                    continue
                with self._send_lock:
                    if self._error_sent:
                        return
                    self.writer.send(item)
                self.items_out += 1
        except GadgetFailed as error:
            self._chain_failed.set()  # the runtime logged it with its traceback
            self.log.info("reporting to the client: %s", error)
            self._send_final(f"ERROR {error}")
        except ChainStopped:
            return
        except OSError as error:
            self.log.warning("cannot send to client: %s", error)
            self._chain_failed.set()
            self.chain.abort("client socket failed")

    def _report_stage_timings(self, parameters: dict[str, Any]) -> None:
        """Log each gadget's busy time; send them as JSON text if the client asked for it.

        A client opts in with ``{"timings": true}`` in the JSON parameters; the text is
        ``{"perfline_stage_timings": [{"gadget", "busy_s", "waiting_s", "items_in",
        "items_out"}, ...]}``.
        """
        assert self.chain is not None
        timings = [dataclasses.asdict(t) for t in self.chain.stage_timings()]
        self.log.info("stage times (s): %s", ", ".join(f"{t['gadget']} {t['busy_s']:.3f}" for t in timings))
        if parameters.get("timings") is True:
            with self._send_lock:
                if not self._error_sent:
                    self.writer.send(Text(json.dumps({"perfline_stage_timings": timings})))

    # -- ending --------------------------------------------------------------------------
    def _send_final(self, error_text: str | None) -> None:
        """Send the ERROR text (if any) then CLOSE, once."""
        with self._send_lock:
            if self._error_sent:
                return
            self._error_sent = True
            try:
                if error_text is not None:
                    self.writer.send(Text(error_text))
                self.writer.send(Close())
            except OSError as error:
                self.log.warning("could not send %s to the client: %s",
                                 "the error" if error_text else "CLOSE", error)

    def _stop_with_error(self, description: str) -> None:
        self.log.error("ERROR %s", description)
        if self.chain is not None:
            self.chain.abort(description)
        if self._sender is not None:
            self._sender.join(timeout=self.drain_timeout_s)
        self._send_final(f"ERROR {description}")
        self._drain()

    def _drain(self) -> None:
        """Read and discard until the client closes (so it reads our error, not a reset)."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
            self.sock.settimeout(min(self.drain_timeout_s, self.limits.idle_timeout_s))
            deadline = time.monotonic() + self.drain_timeout_s
            while time.monotonic() < deadline and self.sock.recv(1 << 16):
                pass
        except (OSError, IdleTimeoutError):
            pass

    def _close_connection(self) -> None:
        if self.chain is not None:
            self.chain.abort("connection closed")
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
