"""`get --watch` when nats-py's "nothing current" marker comes before the run's record
(nats.py issue 842, seen once in CI as a watch of a running run that printed nothing):
the key is read to tell "no such run" from that, and the record that then arrives from
the watch is not printed twice. A stand-in bucket gives the watch in that order; the
same path on a real nats-server is tests/integration/test_cli_get_watch.py."""

from __future__ import annotations

import asyncio
import types
from typing import Any

from cadenza_operator.engine.state import RunState
from cadenza_operator.observe.watch import run_records
from nats.js.errors import KeyNotFoundError


def entry(state: RunState | None, revision: int, operation: str | None = None) -> Any:
    value = state.to_bytes() if state is not None else b""
    return types.SimpleNamespace(
        key=state.run if state else "r1", value=value, revision=revision, operation=operation
    )


class Bucket:
    """A bucket whose watch gives `updates` in that order, and whose `get` gives `current`."""

    def __init__(self, updates: list[Any], current: Any) -> None:
        self.updates, self.current = updates, current

    async def watch(self, key: str) -> Any:
        updates = self.updates

        class Watcher:
            def __aiter__(self) -> Any:
                return self

            async def __anext__(self) -> Any:
                if not updates:
                    await asyncio.Event().wait()  # a watch never ends by itself
                return updates.pop(0)

            async def stop(self) -> None:
                return None

        return Watcher()

    async def get(self, key: str) -> Any:
        if self.current is None:
            raise KeyNotFoundError
        return self.current


def state(phase: str) -> RunState:
    return RunState(run="r1", workflow="w", definition="d", createdAt=1.0, phase=phase)


async def collect(kv: Bucket) -> list[str]:
    return [str(s.phase) async for s in run_records(kv, "r1")]


async def test_the_marker_before_the_record_does_not_end_the_watch() -> None:
    running, done = state("Running"), state("Succeeded")
    kv = Bucket([None, entry(running, 5), entry(done, 6)], current=entry(running, 5))
    assert await asyncio.wait_for(collect(kv), 10) == ["Running", "Succeeded"]


async def test_the_marker_for_a_run_that_is_not_there_ends_it_at_once() -> None:
    assert await asyncio.wait_for(collect(Bucket([None], current=None)), 10) == []
    deleted = entry(None, 7, "DEL")
    assert await asyncio.wait_for(collect(Bucket([None], current=deleted)), 10) == []
