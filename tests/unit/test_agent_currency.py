"""An agent decides whether a task's attempt is still current from the run record; when
the record cannot be read (JetStream restarting), it must not guess "current"."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import nats.errors
import pytest
from cadenza import Agent
from cadenza._agent import abandoned
from cadenza._protocol import dumps
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
