"""An agent decides whether a task's attempt is still current from the run record; when
the record cannot be read (JetStream restarting), it must not guess "current"."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

import nats.errors
import pytest
from cadenza import Agent
from cadenza._agent import abandoned
from cadenza._protocol import dumps
from cadenza._reads import SharedReads
from nats.js.errors import KeyNotFoundError


class FlakyRuns:
    """A runs bucket that times out `failures` times, then answers with `record`."""

    def __init__(self, record: dict[str, Any] | None, failures: int) -> None:
        self.record, self.failures, self.calls = record, failures, 0

    async def get(self, key: str) -> Any:
        self.calls += 1
        if self.calls <= self.failures:
            raise nats.errors.TimeoutError
        if self.record is None:
            raise KeyNotFoundError
        return SimpleNamespace(value=dumps(self.record))


class Msg:
    def __init__(self) -> None:
        self.progress = 0

    async def in_progress(self) -> None:
        self.progress += 1


TASK = {"run": "r", "step": "a", "item": None, "attempt": 1}
RUNNING = {"phase": "Running", "steps": {"a": {"attempt": 1, "running": True}}}


@pytest.mark.parametrize(
    ("record", "why"),
    [
        (RUNNING, None),
        ({**RUNNING, "phase": "Succeeded"}, "the run is Succeeded"),
        (
            {"phase": "Running", "steps": {"a": {"attempt": 2, "running": True}}},
            "attempt 2 has superseded it",
        ),
        ({"phase": "Running", "steps": {"a": {"attempt": 1}}}, "the attempt has finished"),
        (None, "the run no longer exists"),
    ],
)
async def test_the_record_says_whether_an_attempt_is_current(record: Any, why: str | None) -> None:
    found = await abandoned(FlakyRuns(record, 0), TASK)
    assert found == why if why is None else found is not None and found.startswith(why)


async def test_an_item_that_left_the_window_is_abandoned() -> None:
    record = {"phase": "Running", "steps": {"f": {"forEach": {"next": 5, "running": {"4": {"attempt": 1}}}}}}
    item = {"run": "r", "step": "f", "attempt": 1}
    assert await abandoned(FlakyRuns(record, 0), {**item, "item": 2}) == "the item is no longer running"
    assert await abandoned(FlakyRuns(record, 0), {**item, "item": 4}) == "the attempt has finished"
    assert await abandoned(FlakyRuns(record, 0), {**item, "item": 7}) is None  # not dispatched yet here


async def test_an_unreadable_record_is_asked_again_not_taken_for_current() -> None:
    runs = FlakyRuns({**RUNNING, "phase": "Cancelled"}, failures=2)
    msg = Msg()
    assert await Agent("a")._currency(runs, TASK, msg) == "the run is Cancelled"
    assert msg.progress == 2  # the task was kept while waiting


async def test_a_record_that_stays_unreadable_raises() -> None:
    with pytest.raises(nats.errors.TimeoutError):
        await Agent("a")._currency(FlakyRuns(RUNNING, failures=100), TASK, Msg())


class CountingRuns:
    """A runs bucket whose reads take a while and are counted, each returning the record as
    it is when the read *begins*."""

    def __init__(self) -> None:
        self.reads = 0
        self.phase = "Running"

    async def get(self, key: str) -> Any:
        self.reads += 1
        record = {**RUNNING, "phase": self.phase}
        await asyncio.sleep(0.01)
        return SimpleNamespace(value=dumps(record))


async def test_a_burst_of_one_runs_tasks_shares_reads() -> None:
    runs = CountingRuns()
    shared = SharedReads(runs)
    answers = await asyncio.gather(*(abandoned(shared, TASK) for _ in range(100)))
    assert answers == [None] * 100
    assert runs.reads <= 2


async def test_a_task_never_uses_a_read_that_began_before_it_arrived() -> None:
    """The run is cancelled while a read is in flight; a task arriving after the cancel
    must not take that older read's answer."""
    runs = CountingRuns()
    shared = SharedReads(runs)
    early = asyncio.create_task(abandoned(shared, TASK))
    await asyncio.sleep(0.001)  # the first read has begun, with the run Running
    runs.phase = "Cancelled"
    late = await abandoned(shared, TASK)
    assert await early is None
    assert late == "the run is Cancelled"
    assert runs.reads == 2


async def test_a_failed_shared_read_fails_each_caller_and_the_next_read_is_fresh() -> None:
    runs = FlakyRuns(RUNNING, failures=1)
    shared = SharedReads(runs)
    with pytest.raises(nats.errors.TimeoutError):
        await abandoned(shared, TASK)
    assert await abandoned(shared, TASK) is None


def delivered(times: int, stored: float) -> Any:
    """A message as JetStream hands it out: its ack subject says how often and when."""
    reply = f"$JS.ACK.CADENZA_TASKS.agent_ns_a.{times}.17.17.{int(stored * 1e9)}.0"
    return SimpleNamespace(reply=reply)


def test_only_a_task_that_may_be_stale_costs_a_read_of_the_record() -> None:
    agent = Agent("a")
    now = time.time()
    assert not agent._may_be_stale(TASK, delivered(1, now))  # taken at once: no read
    assert agent._may_be_stale(TASK, delivered(2, now))  # delivered again: read
    assert agent._may_be_stale(TASK, delivered(1, now - 5))  # waited in the queue: read
    # A short queueTimeout makes a shorter wait suspect.
    assert agent._may_be_stale({**TASK, "queueTimeout": 0.2}, delivered(1, now - 0.15))
    # A cancel heard for the run (or the step) makes its queued tasks suspect.
    agent._note_cancel("r", None)
    assert agent._may_be_stale(TASK, delivered(1, now))
    other = Agent("a")
    other._note_cancel("r", "b")
    assert not other._may_be_stale(TASK, delivered(1, now))
    other._note_cancel("r", "a")
    assert other._may_be_stale(TASK, delivered(1, now))
