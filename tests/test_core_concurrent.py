"""Items of one gadget processed concurrently (core.concurrent): order, bounds, errors, busy time."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from perfline.core import concurrent
from perfline.core.concurrent import BusyClock, ordered_concurrent_map
from perfline.core.gadget import PureGadget
from perfline.core.runtime import GadgetFailed, start_chain


class _InFlight:
    """Counts calls in flight; each call waits until ``release`` lets ``n`` calls through."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now = 0
        self.most = 0
        self.started = threading.Semaphore(0)

    def __call__(self, item: int) -> int:
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
        self.started.release()
        time.sleep(0.02 * (5 - item % 5))  # later items finish first
        with self.lock:
            self.now -= 1
        return 10 * item


def test_outputs_keep_the_input_order_with_at_most_workers_in_flight() -> None:
    work = _InFlight()
    assert list(ordered_concurrent_map(work, range(12), 3)) == [10 * i for i in range(12)]
    assert work.most == 3
    serial = _InFlight()
    assert list(ordered_concurrent_map(serial, range(4), 1)) == [0, 10, 20, 30]
    assert serial.most == 1
    with pytest.raises(ValueError, match="workers"):
        list(ordered_concurrent_map(work, range(3), 0))


def test_the_input_is_read_at_most_workers_ahead_of_the_oldest_unfinished_item() -> None:
    read: list[int] = []
    gate = threading.Event()

    def items():
        for i in range(10):
            read.append(i)
            yield i

    def blocked(item: int) -> int:
        if item == 0:
            gate.wait(5.0)
        return item

    outputs = ordered_concurrent_map(blocked, items(), 2)
    consumer = threading.Thread(target=lambda: list(outputs))
    consumer.start()
    time.sleep(0.2)  # item 0 blocks: the feeder holds items 0 and 1 and waits for a slot
    assert read == [0, 1, 2] or read == [0, 1]
    gate.set()
    consumer.join(5.0)
    assert read == list(range(10))


def test_an_error_is_raised_at_its_items_turn_after_the_earlier_outputs() -> None:
    def failing(item: int) -> int:
        if item == 3:
            raise RuntimeError("item 3 is bad")
        return item

    got: list[int] = []
    with pytest.raises(RuntimeError, match="item 3 is bad"):
        for output in ordered_concurrent_map(failing, range(8), 2):
            got.append(output)
    assert got == [0, 1, 2]

    def broken_input():
        yield 1
        raise OSError("input stream cut")

    with pytest.raises(OSError, match="input stream cut"):
        list(ordered_concurrent_map(lambda item: item, broken_input(), 2))


def test_busy_clock_counts_the_union_of_the_items_in_process(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [0.0]
    monkeypatch.setattr(concurrent.time, "perf_counter", lambda: now[0])
    clock = BusyClock()
    clock.start()          # t = 0: item A
    now[0] = 1.0
    clock.start()          # t = 1: item B, overlapping
    now[0] = 2.0
    clock.stop()           # t = 2: A done
    now[0] = 3.0
    clock.stop()           # t = 3: B done -> busy 3 s, not 2 + 2
    now[0] = 10.0          # idle
    clock.start()
    now[0] = 10.5
    assert clock.seconds == pytest.approx(3.5)  # an item still in process counts up to now
    clock.stop()
    assert clock.seconds == pytest.approx(3.5)


class _TwoAtATime(PureGadget):
    name = "test-two-at-a-time"
    accepts = (int,)
    produces = (int,)

    def item_workers(self) -> int:
        return 2

    def process_item(self, item: int) -> int | None:
        time.sleep(0.01 * (4 - item % 4))
        if item == 99:
            raise ValueError("item 99")
        return None if item == 5 else item + 1  # None drops an item, as in a serial gadget


def test_a_concurrent_gadget_in_a_chain_keeps_the_stream_and_reports_its_busy_time() -> None:
    chain = start_chain([_TwoAtATime()], queue_size=2)
    outputs = chain.run(list(range(8)) + ["text passes through"])
    # the gadget's outputs keep the input order; an item it does not accept passes through when the feeder
    # reads it, so it may overtake the items still in process (at most ``workers`` of them)
    assert [o for o in outputs if isinstance(o, int)] == [1, 2, 3, 4, 5, 7, 8]
    assert outputs.index("text passes through") >= 7 - 2
    (timing,) = chain.stage_timings()
    assert (timing.items_in, timing.items_out) == (8, 7)
    assert 0.0 < timing.busy_s < 10.0
    with pytest.raises(GadgetFailed, match="item 99"):
        start_chain([_TwoAtATime()], queue_size=2).run([1, 99, 2])


def test_moco_workers_give_the_serial_series() -> None:
    """perfusion-moco with workers = 2 gives every series exactly as with 1, in the input order."""
    from perfline.gadgets.perfusion_items import ImageGeometry, SliceSeries
    from perfline.gadgets.perfusion_preprocessing import MotionCorrectionSettings, PerfusionMotionCorrection

    rng = np.random.default_rng(0)
    rows, cols = np.mgrid[:48, :48]
    items = []
    for index in range(3):
        frames = []
        for shift in rng.uniform(-1.5, 1.5, size=(8, 2)):
            blob = np.exp(-((rows - 24 - shift[0]) ** 2 + (cols - 22 - shift[1]) ** 2) / 60.0)
            frames.append(100.0 * blob + 5.0 + rng.normal(0.0, 0.5, size=blob.shape))
        items.append(SliceSeries(slice_index=index, data=np.asarray(frames, np.float32), time_s=np.arange(8.0),
                                 units="signal", n_pd_frames=0,
                                 geometry=ImageGeometry(field_of_view_mm=(90.0, 90.0, 8.0))))
    serial = start_chain([PerfusionMotionCorrection(MotionCorrectionSettings(interpolation="cubic"))]).run(items)
    paired = start_chain([PerfusionMotionCorrection(MotionCorrectionSettings(interpolation="cubic", workers=2))]
                         ).run(items)
    assert [s.slice_index for s in paired] == [0, 1, 2]
    for one, two in zip(serial, paired):
        np.testing.assert_array_equal(one.data, two.data)
    assert any(np.abs(s.data - i.data).max() > 1.0 for s, i in zip(serial, items))  # it did correct motion
