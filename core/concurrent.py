"""Items of one gadget processed concurrently, outputs in input order.

A gadget's thread processes its items one after another. Where one item takes long and the next
is already waiting (the motion correction of the myocardial slices, about 1 s each, whose
recon ends while the previous slice is still being registered), a second worker lets the next
item start at once. :func:`ordered_concurrent_map` runs ``function`` on up to ``workers`` items
at a time and yields the results in the order the items came, so downstream gadgets see the
same stream as with one worker (in a chain, an item the gadget does not accept passes through
when the feeder reads it, and may overtake the at most ``workers`` items still in process). numpy / scipy release the interpreter lock in their array
kernels, so two threads overlap most of the work (motion correction of two slices: 1.34x on
two cores, docs/integration.md "Session 29").

The gadget's busy time cannot be the runtime's usual "wall time minus time waiting for input",
because the input is read by a feeder thread while the workers run: :class:`BusyClock` measures
the wall time during which at least one item was in process instead.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

_END = object()


class BusyClock:
    """Wall time (s) during which at least one of a gadget's items was in process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active = 0
        self._since = 0.0
        self._total = 0.0

    def start(self) -> None:
        with self._lock:
            if self._active == 0:
                self._since = time.perf_counter()
            self._active += 1

    def stop(self) -> None:
        with self._lock:
            self._active -= 1
            if self._active == 0:
                self._total += time.perf_counter() - self._since

    @property
    def seconds(self) -> float:
        with self._lock:
            running = time.perf_counter() - self._since if self._active else 0.0
            return self._total + running


def ordered_concurrent_map(function: Callable[[Any], Any], items: Iterable[Any], workers: int,
                           clock: BusyClock | None = None, name: str = "gadget") -> Iterator[Any]:
    """Yield ``function(item)`` for every item, in input order, with up to ``workers`` calls at a time.

    A feeder thread reads ``items`` (blocking reads, e.g. a chain queue) and submits each to a pool
    of ``workers`` threads; at most ``workers`` items are read ahead of the oldest unfinished one,
    so memory stays bounded. An exception of ``function`` (or of reading ``items``) is raised here,
    at its item's turn; the items after it are not processed further.

    Args:
        function: the per-item work (must be safe to run in several threads at once).
        items: the input; read from one thread only (the feeder).
        workers: calls in flight at most (>= 1).
        clock: if given, started and stopped around every call (the gadget's busy time).
        name: the feeder and worker threads' name prefix.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, found {workers}")
    pending: queue.Queue[Any] = queue.Queue()
    slots = threading.Semaphore(workers)
    closing = threading.Event()

    def timed(item: Any) -> Any:
        if clock is not None:
            clock.start()
        try:
            return function(item)
        finally:
            if clock is not None:
                clock.stop()

    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"{name}-worker")

    def feed() -> None:
        try:
            for item in items:
                slots.acquire()
                if closing.is_set():
                    return
                pending.put(pool.submit(timed, item))
        except BaseException as error:  # handed to the consumer, raised at its turn
            pending.put(error)
        finally:
            pending.put(_END)

    feeder = threading.Thread(target=feed, name=f"{name}-feeder", daemon=True)
    feeder.start()
    try:
        while True:
            head = pending.get()
            if head is _END:
                return
            if isinstance(head, BaseException):
                raise head
            assert isinstance(head, Future)
            try:
                result = head.result()
            except BaseException:
                slots.release()
                raise
            yield result
            slots.release()  # after the output has gone on: the read-ahead stays within ``workers``
    finally:
        closing.set()
        for _ in range(workers):  # a feeder waiting for a slot sees ``closing`` and ends
            slots.release()
        pool.shutdown(wait=True, cancel_futures=True)
