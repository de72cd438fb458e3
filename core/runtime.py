"""Run a chain of gadgets: one thread per gadget, linked by bounded queues.

Design (Gadgetron's Node/Channel model, in Python threads):

- every gadget has an input queue of bounded size; its thread pulls items, hands the ones it
  ``accepts`` to the gadget's ``process`` generator and forwards all others unchanged to the
  next queue (pass-through);
- a full queue blocks the producer (backpressure), so a slow step cannot make the server
  buffer a whole scan in memory;
- the end of the input is an end-of-stream sentinel that travels down the chain after each
  gadget has finished (so accumulating gadgets can flush);
- a gadget that raises stops the whole chain: a shared stop event wakes every thread, the
  error (wrapped with the gadget's name) is raised from :meth:`RunningChain.outputs` and from
  :meth:`RunningChain.put`, and no thread is left blocked.

The caller feeds with :meth:`RunningChain.put` / :meth:`RunningChain.close` and drains with
:meth:`RunningChain.outputs` (normally from two different threads, as the server does).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from perfline.core.gadget import Gadget, GadgetError, accepts_item

logger = logging.getLogger(__name__)

DEFAULT_QUEUE_SIZE = 64
_POLL_S = 0.05


class _EndOfStream:
    """Sentinel closing a queue (one instance, compared by identity)."""

    def __repr__(self) -> str:
        return "END_OF_STREAM"


END_OF_STREAM = _EndOfStream()


class ChainStopped(RuntimeError):
    """The chain was stopped (a gadget failed or the chain was aborted); no more input."""


class GadgetFailed(GadgetError):
    """A gadget raised while processing; ``gadget`` names it, ``__cause__`` is the error."""

    def __init__(self, gadget: str, error: BaseException) -> None:
        super().__init__(f"gadget {gadget!r} failed: {type(error).__name__}: {error}")
        self.gadget = gadget


class UnexpectedOutput(GadgetError):
    """A gadget yielded an item of a type it did not declare in ``produces``."""


@dataclass
class StageTiming:
    """Where one gadget's thread spent its time (seconds of wall clock).

    ``busy_s`` is the time inside the gadget's own code: the thread's wall time from the first
    item to the end of stream, minus the time it waited for input or for room downstream.
    """

    gadget: str
    busy_s: float = 0.0
    waiting_s: float = 0.0
    items_in: int = 0
    items_out: int = 0


class RunningChain:
    """A started chain instance (one per connection). Create with :func:`start_chain`."""

    def __init__(self, gadgets: Sequence[Gadget], *, queue_size: int = DEFAULT_QUEUE_SIZE,
                 connection_id: str = "-") -> None:
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size}")
        self.gadgets = list(gadgets)
        self.connection_id = connection_id
        self._queues: list[queue.Queue[Any]] = [queue.Queue(maxsize=queue_size)
                                                for _ in range(len(self.gadgets) + 1)]
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._error_lock = threading.Lock()
        self._closed = False
        self._timings = [StageTiming(gadget.name) for gadget in self.gadgets]
        self._threads = [
            threading.Thread(target=self._run_gadget, args=(index,), daemon=True,
                             name=f"gadget-{gadget.name}-{connection_id}")
            for index, gadget in enumerate(self.gadgets)
        ]
        for thread in self._threads:
            thread.start()

    # -- feeding -------------------------------------------------------------------------
    def put(self, item: Any, timeout: float | None = None) -> None:
        """Feed one item; blocks while the first queue is full (backpressure).

        Raises:
            ChainStopped: the chain failed or was aborted (``__cause__`` is the gadget error).
            TimeoutError: ``timeout`` seconds passed with the queue still full.
        """
        if self._closed:
            raise ChainStopped("chain input already closed")
        self._put(self._queues[0], item, timeout=timeout)

    def close(self) -> None:
        """Signal the end of the input stream (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._put(self._queues[0], END_OF_STREAM)
        except ChainStopped:
            pass

    def abort(self, reason: str = "aborted") -> None:
        """Stop every gadget thread now (e.g. the client vanished); pending items are dropped."""
        self._fail(ChainStopped(reason))

    # -- draining ------------------------------------------------------------------------
    def outputs(self) -> Iterator[Any]:
        """Yield the items leaving the last gadget until the end of the stream.

        Raises:
            GadgetFailed: a gadget raised (the chain is stopped).
            ChainStopped: the chain was aborted.
        """
        last = self._queues[-1]
        while True:
            item = self._get(last, raise_failure=True)
            if item is END_OF_STREAM:
                self.join()
                return
            yield item

    def run(self, items: Iterable[Any]) -> list[Any]:
        """Feed ``items`` from a helper thread and return every output (tests, offline use)."""
        feeder_error: list[BaseException] = []

        def feed() -> None:
            try:
                for item in items:
                    self.put(item)
                self.close()
            except ChainStopped:
                pass
            except BaseException as error:  # noqa: BLE001 - reported to the caller below
                feeder_error.append(error)
                self.abort(f"input iterator failed: {error}")

        feeder = threading.Thread(target=feed, daemon=True, name=f"feeder-{self.connection_id}")
        feeder.start()
        try:
            results = list(self.outputs())
        except ChainStopped:
            if feeder_error:
                raise feeder_error[0] from None
            raise
        feeder.join()
        return results

    @property
    def error(self) -> BaseException | None:
        """The first error that stopped the chain, or None."""
        return self._error

    def stage_timings(self) -> list[StageTiming]:
        """Per-gadget busy and waiting times (complete once the chain has ended)."""
        return list(self._timings)

    def join(self, timeout: float | None = None) -> None:
        """Wait for every gadget thread to end."""
        for thread in self._threads:
            thread.join(timeout)

    # -- internals -----------------------------------------------------------------------
    def _fail(self, error: BaseException) -> None:
        with self._error_lock:
            if self._error is None:
                self._error = error
        self._stop.set()

    def _raise_stopped(self) -> None:
        error = self._error
        if isinstance(error, ChainStopped):
            raise error
        raise ChainStopped(str(error)) from error

    def _put(self, target: queue.Queue[Any], item: Any, timeout: float | None = None) -> None:
        waited = 0.0
        while True:
            if self._stop.is_set():
                self._raise_stopped()
            try:
                target.put(item, timeout=_POLL_S)
                return
            except queue.Full:
                waited += _POLL_S
                if timeout is not None and waited >= timeout:
                    raise TimeoutError(f"chain input queue full for {timeout} s") from None

    def _get(self, source: queue.Queue[Any], *, raise_failure: bool = False) -> Any:
        """Next item; once stopped, raise ChainStopped (GadgetFailed itself if ``raise_failure``)."""
        while True:
            try:
                return source.get(timeout=_POLL_S)
            except queue.Empty:
                if self._stop.is_set():
                    error = self._error
                    if raise_failure and isinstance(error, GadgetFailed):
                        raise error
                    self._raise_stopped()

    def _run_gadget(self, index: int) -> None:
        gadget = self.gadgets[index]
        inbox, outbox = self._queues[index], self._queues[index + 1]
        produces = gadget.output_types(gadget.settings)
        timing = self._timings[index]
        started: float | None = None

        ended = False

        def waited(call: Any, *args: Any) -> Any:
            nonlocal started
            before = time.perf_counter()
            try:
                return call(*args)
            finally:
                after = time.perf_counter()
                if started is None:
                    started = after  # the clock starts when the first item arrives
                else:
                    timing.waiting_s += after - before

        def accepted_items() -> Iterator[Any]:
            nonlocal ended
            while not ended:
                item = waited(self._get, inbox)
                if item is END_OF_STREAM:
                    ended = True
                    return
                if accepts_item(gadget, item):
                    timing.items_in += 1
                    yield item
                else:
                    waited(self._put, outbox, item)

        try:
            for output in gadget.process(accepted_items()):
                if produces and not isinstance(output, produces):
                    raise UnexpectedOutput(
                        f"gadget {gadget.name!r} yielded {type(output).__name__}, but declares "
                        f"produces={[t.__name__ for t in produces]}")
                timing.items_out += 1
                waited(self._put, outbox, output)
            if started is not None:
                timing.busy_s = max(0.0, time.perf_counter() - started - timing.waiting_s)
            # a gadget may stop reading early: drop its unread items, pass the others through
            for item in accepted_items():
                logger.debug("%s ended early, dropping %s", gadget.name, type(item).__name__,
                             extra={"connection": self.connection_id})
            self._put(outbox, END_OF_STREAM)
        except ChainStopped:
            logger.debug("gadget %s stopped", gadget.name, extra={"connection": self.connection_id})
        except Exception as error:
            failure = GadgetFailed(gadget.name, error)
            failure.__cause__ = error
            logger.error("%s", failure, exc_info=error, extra={"connection": self.connection_id})
            self._fail(failure)


def start_chain(gadgets: Sequence[Gadget], *, queue_size: int = DEFAULT_QUEUE_SIZE,
                connection_id: str = "-") -> RunningChain:
    """Start one thread per gadget and return the running chain."""
    return RunningChain(gadgets, queue_size=queue_size, connection_id=connection_id)


def run_gadgets(gadgets: Sequence[Gadget], items: Iterable[Any], *,
                queue_size: int = DEFAULT_QUEUE_SIZE) -> list[Any]:
    """Run ``items`` through ``gadgets`` (threads, queues) and return every output.

    Convenience for tests and offline tools; raises :class:`GadgetFailed` on a gadget error.
    """
    return start_chain(gadgets, queue_size=queue_size).run(items)
