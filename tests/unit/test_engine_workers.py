"""How the engine's event handler shares work: one worker per run, batches, backpressure.

`_process` (the I/O of one batch) is replaced by a recorder that waits for the test, so
this checks only the hand-off: no NATS is needed to see who processes what.
"""

from __future__ import annotations

import asyncio
from typing import Any

from cadenza._protocol import dumps
from cadenza.protocol import Event
from cadenza_operator.engine.runtime import Engine


class _Msg:
    def __init__(self, run: str, n: int) -> None:
        self.data = dumps({"type": "result", "run": run, "n": n})
        self.subject = f"cadenza.event.default.{run}"


class _Nats:
    def jetstream(self) -> None:
        return None


async def test_one_worker_per_run_batches_what_arrives_while_it_works() -> None:
    engine = Engine(_Nats())
    batches: list[tuple[str, list[int]]] = []
    release = asyncio.Event()

    async def process(run: str, batch: list[tuple[Any, Event]]) -> None:
        batches.append((run, [(ev.model_extra or {})["n"] for _, ev in batch]))
        await release.wait()

    engine._process = process  # type: ignore[method-assign]
    first = asyncio.create_task(engine._on_event(_Msg("a", 1)))
    other_run = asyncio.create_task(engine._on_event(_Msg("b", 1)))
    await asyncio.sleep(0)
    assert batches == [("a", [1]), ("b", [1])]  # each run has its worker at once

    # Events for a run being processed join its queue; their handlers return at once.
    await asyncio.wait_for(engine._on_event(_Msg("a", 2)), 1)
    await asyncio.wait_for(engine._on_event(_Msg("a", 3)), 1)
    # The first handler holds its consumer slot until the run's queue is empty.
    assert not first.done() and not other_run.done()

    release.set()
    await asyncio.wait_for(asyncio.gather(first, other_run), 1)
    assert batches == [("a", [1]), ("b", [1]), ("a", [2, 3])]
    assert engine._queues == {} and engine._workers == {}

    # A later event starts a worker afresh.
    await asyncio.wait_for(engine._on_event(_Msg("a", 4)), 1)
    assert batches[-1] == ("a", [4]) and engine._queues == {}


async def test_a_failed_batch_is_nacked_and_the_worker_goes_on() -> None:
    engine = Engine(_Nats())
    nacked: list[int] = []
    seen: list[list[int]] = []
    gate = asyncio.Event()

    async def process(run: str, batch: list[tuple[Any, Event]]) -> None:
        seen.append([(ev.model_extra or {})["n"] for _, ev in batch])
        if len(seen) == 1:
            await gate.wait()
            raise RuntimeError("KV unavailable")

    class Msg(_Msg):
        async def nak(self, delay: float = 0) -> None:
            nacked.append(int(self.data.decode().split('"n":')[1].rstrip("}")))

    engine._process = process  # type: ignore[method-assign]
    first = asyncio.create_task(engine._on_event(Msg("a", 1)))
    await asyncio.sleep(0)
    await engine._on_event(Msg("a", 2))
    gate.set()
    await asyncio.wait_for(first, 1)
    assert seen == [[1], [2]] and nacked == [1]
    assert engine._queues == {} and engine._workers == {}
