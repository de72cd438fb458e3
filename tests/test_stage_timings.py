"""Per-gadget stage timings: accounted in the runtime, sent to clients that ask for them."""

from __future__ import annotations

import json
import time

from perfline.core.gadget import PureGadget
from perfline.core.runtime import start_chain
from perfline.server.client import send_dataset
from perfline.server.testing import running_server


class Sleeper(PureGadget):
    name = "test-sleeper"
    accepts = (int,)
    produces = (int,)

    def process_item(self, item: int) -> int:
        time.sleep(0.05)
        return item


class Echo(PureGadget):
    name = "test-echo"
    accepts = (int,)
    produces = (int,)

    def process_item(self, item: int) -> int:
        return item


def test_busy_time_counts_work_not_waiting():
    chain = start_chain([Echo(), Sleeper(), Echo()], queue_size=1)
    assert chain.run(range(6)) == list(range(6))
    first, sleeper, last = chain.stage_timings()
    assert (sleeper.gadget, sleeper.items_in, sleeper.items_out) == ("test-sleeper", 6, 6)
    # the sleeper did at least its 0.3 s of work; it cannot have waited longer than it ran
    assert sleeper.busy_s >= 0.3 - 1e-3
    # the gadgets around it spent that time waiting for it, not working
    assert last.waiting_s >= 0.2 and first.waiting_s + first.busy_s < 10
    assert last.busy_s < sleeper.busy_s


def test_server_sends_timings_only_when_asked(shepp_logan):
    shepp_logan_file = shepp_logan(matrix=64, coils=4, repetitions=2)
    with running_server() as (host, port):
        plain = send_dataset(shepp_logan_file, host, port, config="cartesian-recon")
        asked = send_dataset(shepp_logan_file, host, port, config="cartesian-recon",
                             parameters={"timings": True})
    assert plain.ok and asked.ok
    assert not any("perfline_stage_timings" in text for text in plain.texts)
    (text,) = [t for t in asked.texts if "perfline_stage_timings" in t]
    stages = json.loads(text)["perfline_stage_timings"]
    assert [s["gadget"] for s in stages] == ["cartesian-recon"]
    assert asked.stage_timings() == stages and plain.stage_timings() == []
    assert stages[0]["items_in"] > 0 and stages[0]["busy_s"] > 0
    assert len(asked.images) == len(plain.images) > 0
    # arrival times let a client measure latency from its last acquisition to a result
    assert len(asked.text_times_s) == len(asked.texts)
    assert all(asked.sent_s <= t <= asked.seconds for t in asked.text_times_s)
