"""Gadget runtime: threads, bounded queues, pass-through, end-of-stream, failure handling."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from perfline.core.gadget import Gadget, GadgetSettings, PureGadget
from perfline.core.runtime import ChainStopped, GadgetFailed, UnexpectedOutput, run_gadgets, start_chain


class Doubler(PureGadget):
    name = "test-doubler"
    accepts = (int,)
    produces = (int,)

    def process_item(self, item: int) -> int:
        return 2 * item


class SumAtEnd(Gadget):
    """Accumulates every int and emits the sum only when the stream ends."""

    name = "test-sum-at-end"
    accepts = (int,)
    produces = (int,)

    def process(self, items: Iterator[int]) -> Iterator[int]:
        yield sum(items)


class FailOn(PureGadget):
    name = "test-fail-on"
    accepts = (int,)
    produces = (int,)

    def process_item(self, item: int) -> int:
        if item == 3:
            raise ValueError("three is not allowed")
        return item


class Liar(PureGadget):
    name = "test-liar"
    accepts = (int,)
    produces = (int,)

    def process_item(self, item: int) -> str:
        return "not an int"


class SlowCounter(PureGadget):
    """Slow consumer that records the largest number of items fed ahead of it."""

    name = "test-slow-counter"
    accepts = (int,)
    produces = (int,)

    def __init__(self, settings: GadgetSettings | None = None, context=None) -> None:
        super().__init__(settings, context)
        self.seen = 0

    def process_item(self, item: int) -> int:
        self.seen += 1
        time.sleep(0.002)
        return item


def test_items_flow_in_order_through_threads() -> None:
    assert run_gadgets([Doubler(), Doubler()], range(100)) == [4 * i for i in range(100)]


def test_unaccepted_items_pass_through_unchanged() -> None:
    outputs = run_gadgets([Doubler()], [1, "text", 2.5, 3])
    assert outputs == [2, "text", 2.5, 6]


def test_end_of_stream_lets_an_accumulating_gadget_flush() -> None:
    assert run_gadgets([SumAtEnd(), Doubler()], range(10)) == [90]


def test_failing_gadget_stops_the_chain_and_names_itself() -> None:
    with pytest.raises(GadgetFailed, match="test-fail-on.*ValueError: three is not allowed") as info:
        run_gadgets([FailOn(), Doubler(), Doubler()], [1, 2, 3] + list(range(10, 1000)))
    assert info.value.gadget == "test-fail-on"
    assert isinstance(info.value.__cause__, ValueError)


def test_only_the_failing_gadget_is_logged(caplog) -> None:
    with pytest.raises(GadgetFailed):
        run_gadgets([SumAtEnd(), FailOn(), SumAtEnd()], [1, 2])  # sum 3 fails downstream
    failures = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert failures == ["gadget 'test-fail-on' failed: ValueError: three is not allowed"]


def test_failure_wakes_a_blocked_producer_and_ends_every_thread() -> None:
    gadgets = [FailOn(), SumAtEnd()]
    chain = start_chain(gadgets, queue_size=1)
    with pytest.raises(ChainStopped):
        for item in [1, 2, 3] + list(range(4, 10_000)):
            chain.put(item)
    with pytest.raises(GadgetFailed):
        list(chain.outputs())
    chain.join(timeout=5)
    assert not any(thread.is_alive() for thread in chain._threads)


def test_undeclared_output_type_is_an_error() -> None:
    with pytest.raises(GadgetFailed, match="yielded str, but declares produces"):
        run_gadgets([Liar()], [1])
    assert issubclass(UnexpectedOutput, Exception)


def test_bounded_queues_apply_backpressure() -> None:
    """With queue_size 2 the feeder can never be more than a few items ahead of the slow gadget."""
    slow = SlowCounter()
    chain = start_chain([slow], queue_size=2)
    max_ahead = 0
    outputs: list[int] = []
    drain = threading.Thread(target=lambda: outputs.extend(chain.outputs()))
    drain.start()
    for item in range(200):
        chain.put(item)
        max_ahead = max(max_ahead, item + 1 - slow.seen)
    chain.close()
    drain.join(timeout=30)
    assert outputs == list(range(200))
    # queue of 2 + the item in process_item + the one blocked in put
    assert max_ahead <= 4


def test_abort_stops_everything() -> None:
    chain = start_chain([SumAtEnd()])
    chain.put(1)
    chain.abort("client vanished")
    with pytest.raises(ChainStopped, match="client vanished"):
        list(chain.outputs())
    with pytest.raises(ChainStopped):
        chain.put(2)
    chain.join(timeout=5)
    assert not any(thread.is_alive() for thread in chain._threads)
