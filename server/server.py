"""The MRD streaming server: a TCP listener, one thread and one chain instance per connection.

Connections are isolated: each gets its own :class:`~perfline.server.session.Session`, its own
gadget objects and its own queues. :meth:`MRDServer.stop` stops accepting and waits for the
sessions in flight to finish (used on SIGINT/SIGTERM by ``perfline serve``).

Warm-up: after :meth:`MRDServer.start` listens, one background thread calls the ``warm_up``
class method of every gadget of every available chain that defines one (``flow-map``: the BTEX
residue tables), so the first scan does not pay for them; serving never waits for it.
"""

from __future__ import annotations

import itertools
import logging
import secrets
import socket
import threading
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from perfline.core.chain import ChainError, available_chains, load_chain_file
from perfline.core.registry import load_gadgets
from perfline.server.protocol import Close, MessageWriter, ProtocolLimits, Text
from perfline.server.session import Session

logger = logging.getLogger(__name__)


class ServerSettings(BaseModel):
    """Settings of ``perfline serve``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = Field("127.0.0.1", description="address to listen on (loopback by default)")
    port: int = Field(9002, ge=0, le=65535, description="TCP port; 0 picks a free one")
    save_dir: Path | None = Field(None, description="save every incoming stream as MRD HDF5 here")
    output_dir: Path | None = Field(None, description="server-side outputs of gadgets (ChainContext.output_dir)")
    chain_dir: Path | None = Field(None, description="chain files directory (default: the shipped chains/)")
    limits: ProtocolLimits = Field(default_factory=ProtocolLimits)
    max_connections: int = Field(32, ge=1, description="connections served at once; more get an ERROR")
    drain_timeout_s: float = Field(10.0, gt=0, description="how long to read a client's stream after an error")
    shutdown_timeout_s: float = Field(600.0, gt=0, description="wait for sessions in flight on shutdown")
    warm_up: bool = Field(True, description="prepare gadget caches (BTEX tables) in a background thread at start")


class MRDServer:
    """Accepts MRD connections until :meth:`stop`."""

    def __init__(self, settings: ServerSettings | None = None) -> None:
        self.settings = settings or ServerSettings()
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._sessions: dict[str, threading.Thread] = {}
        self._sessions_lock = threading.Lock()
        self._counter = itertools.count(1)
        self._tag = secrets.token_hex(2)
        self.warm_up_thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        if self._listener is None:
            raise RuntimeError("server not started")
        host, port = self._listener.getsockname()[:2]
        return host, port

    def start(self) -> tuple[str, int]:
        """Bind, load the gadget registry and start accepting in a background thread."""
        registry = load_gadgets()
        listener = socket.socket(socket.AF_INET6 if ":" in self.settings.host else socket.AF_INET,
                                 socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((self.settings.host, self.settings.port))
            listener.listen(64)
        except OSError:
            listener.close()
            raise
        listener.settimeout(0.2)
        self._listener = listener
        if self.settings.output_dir is not None:
            self.settings.output_dir.mkdir(parents=True, exist_ok=True)
        self._accept_thread = threading.Thread(target=self._accept_loop, name="mrd-accept", daemon=True)
        self._accept_thread.start()
        logger.info("listening on %s:%d (%d gadgets, chains: %s)", *self.address, len(registry),
                    ", ".join(available_chains(self.settings.chain_dir)))
        if self.settings.warm_up:
            self.warm_up_thread = threading.Thread(target=self._warm_up, name="warm-up", daemon=True)
            self.warm_up_thread.start()
        return self.address

    def _warm_up(self) -> None:
        """Call each chain gadget's ``warm_up(settings, chain, stop)`` (background; errors are logged)."""
        started = time.perf_counter()
        for name, path in available_chains(self.settings.chain_dir).items():
            try:
                chain = load_chain_file(path)
            except ChainError as error:
                logger.warning("warm-up: skipping chain %s: %s", name, error)
                continue
            for spec in chain.gadgets:
                warm = getattr(spec.gadget, "warm_up", None)
                if not callable(warm) or self._stopping.is_set():
                    continue
                try:
                    done = warm(spec.settings, chain, self._stopping)
                except Exception:  # a failed warm-up only costs the first scan time
                    logger.exception("warm-up of %s (chain %s) failed", spec.gadget.name, name)
                    continue
                if done:
                    logger.info("warm-up: %s (chain %s): %s", spec.gadget.name, name, done)
        logger.info("warm-up finished in %.1f s", time.perf_counter() - started)

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                connection, peer = self._listener.accept()
            except TimeoutError:
                continue
            except OSError as error:
                if not self._stopping.is_set():
                    logger.error("accept failed: %s", error)
                break
            connection_id = f"{self._tag}-{next(self._counter):04d}"
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            extra = {"connection": connection_id}
            with self._sessions_lock:
                self._sessions = {k: t for k, t in self._sessions.items() if t.is_alive()}
                busy = len(self._sessions) >= self.settings.max_connections
                if not busy:
                    logger.info("connection from %s:%s", peer[0], peer[1], extra=extra)
                    thread = threading.Thread(target=self._serve, args=(connection, connection_id),
                                              name=f"session-{connection_id}", daemon=True)
                    self._sessions[connection_id] = thread
                    thread.start()
            if busy:
                logger.warning("refused %s:%s: %d connections already", peer[0], peer[1],
                               self.settings.max_connections, extra=extra)
                self._refuse(connection)

    def _refuse(self, connection: socket.socket) -> None:
        try:
            writer = MessageWriter(connection)
            writer.send(Text(f"ERROR server busy: {self.settings.max_connections} connections "
                             f"in progress, try again later"))
            writer.send(Close())
        except OSError:
            pass
        connection.close()

    def _serve(self, connection: socket.socket, connection_id: str) -> None:
        session = Session(connection, connection_id, limits=self.settings.limits,
                          chain_dir=self.settings.chain_dir, save_dir=self.settings.save_dir,
                          output_dir=self.settings.output_dir,
                          drain_timeout_s=self.settings.drain_timeout_s)
        session.run()

    def active_sessions(self) -> int:
        with self._sessions_lock:
            return sum(thread.is_alive() for thread in self._sessions.values())

    def stop(self, timeout: float | None = None) -> bool:
        """Stop accepting, wait for sessions in flight; True if all finished in time."""
        self._stopping.set()
        if self._accept_thread is not None:
            self._accept_thread.join()
        if self._listener is not None:
            self._listener.close()
        timeout = self.settings.shutdown_timeout_s if timeout is None else timeout
        with self._sessions_lock:
            threads = list(self._sessions.values())
        if any(t.is_alive() for t in threads):
            logger.info("waiting for %d session(s) in flight", sum(t.is_alive() for t in threads))
        for thread in threads:
            thread.join(timeout)
        finished = not any(t.is_alive() for t in threads)
        if not finished:
            logger.warning("shutdown: sessions still running after %.0f s", timeout)
        logger.info("server stopped")
        return finished

    def wait(self) -> None:
        """Block until :meth:`stop` is called from another thread or a signal handler."""
        while not self._stopping.wait(0.5):
            pass
