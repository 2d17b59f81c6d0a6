"""Every write to the run records, whichever engine made it, for the runs being mirrored.

Engines in all operator replicas (and standalone `cadenza engine` processes) advance
runs; the replica that owns the WorkflowRun objects must see all of their writes, not
only its own engine's. So this watches the runs bucket itself: one ordered JetStream
consumer on the bucket's subjects, delivering only new writes (a restart reads the
current record of each followed run with one KV get instead of replaying the bucket).

A follower keeps the latest record of its run (raw) and wakes its reader, the
WorkflowRun's mirror daemon, which reads it at most once per status interval.

The same writes show the runs no engine hook told the operator of: a retry started by a
program calling `RunClient.retry` itself, or answered by a standalone `cadenza engine`,
reaches no operator's `on_run_started`. The first write of each run the feed sees is
looked at (once: a bounded set of runs seen; a bytes search before any parse), and a
retry is handed to `on_retry`, after `RETRY_GRACE` so that the hook of the engine that
was asked (which knows `--from` and who asked) goes first.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import structlog
from cadenza.wire import RUNS_BUCKET

from ..engine.state import RunState
from .status import RunEvent, phases_of, transitions

log = structlog.get_logger("cadenza.operator")

_PREFIX = f"$KV.{RUNS_BUCKET}."

RetrySeen = Callable[[RunState], Awaitable[None]]
"""Told of a retry (a run record with `retryOf`) the feed saw start or go on."""
SEEN_RUNS = 10_000
"""Runs whose first write was looked at, remembered so that later writes are not: beyond
this many the oldest is forgotten, and looked at again on its next write (a second telling
is harmless: the mirror and its Event are created once)."""
RETRY_GRACE = 3.0
"""Seconds a retry seen in the bucket waits before `on_retry` is told: the hook of the
engine asked for it runs at once and knows more (the step, who asked)."""
_RETRY_MARK = b'"retryOf"'


class RunFollower:
    """The latest record of one run (kept raw until read), and a wake-up flag.

    Records are parsed only when the mirror reads one, at most once per status interval:
    a 1,000-item fan-out writes its record thousands of times, and parsing each write
    would cost the engine sharing this event loop more than the run itself.
    """

    def __init__(self, run: str, known_phases: Mapping[str, str]) -> None:
        self.run = run
        self.revision = 0
        self.changed = asyncio.Event()
        self._raw: bytes | None = None
        self._phases = dict(known_phases)

    def push(self, data: bytes, revision: int) -> None:
        if revision <= self.revision:
            return  # the KV get and the watch may both deliver a record: keep the newest
        self.revision = revision
        self._raw = data
        self.changed.set()

    def poke(self) -> None:
        if self._raw is not None:
            self.changed.set()

    def take(self) -> tuple[RunState | None, list[RunEvent]]:
        """The latest record and the Events its transitions since the last take call for.

        Transitions between two takes are seen as one: a step that failed stays Failed, a
        run that ended stays ended, so no failure or ending goes unreported."""
        self.changed.clear()
        if self._raw is None:
            return None, []
        state = RunState.from_bytes(self._raw)
        events = transitions(self._phases, state)
        self._phases = phases_of(state)
        return state, events


class RunFeed:
    """Fans the runs bucket's writes out to the followers of individual runs."""

    def __init__(
        self, js: Any, on_retry: RetrySeen | None = None, *, retry_grace: float = RETRY_GRACE
    ) -> None:
        self.js = js
        self._followers: dict[str, RunFollower] = {}
        self._sub: Any = None
        self._kv: Any = None
        self._on_retry = on_retry
        self._retry_grace = retry_grace
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._telling: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        from nats.js.api import DeliverPolicy

        self._kv = await self.js.key_value(RUNS_BUCKET)
        self._sub = await self.js.subscribe(
            f"{_PREFIX}>", cb=self._on_write, ordered_consumer=True, deliver_policy=DeliverPolicy.NEW
        )

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None
        for task in list(self._telling):
            task.cancel()
        await asyncio.gather(*self._telling, return_exceptions=True)

    def follow(self, run: str, known_phases: Mapping[str, str]) -> RunFollower:
        """Start following a run; `known_phases` are the phases already reported (no Events for them)."""
        follower = RunFollower(run, known_phases)
        self._followers[run] = follower
        return follower

    def unfollow(self, follower: RunFollower) -> None:
        if self._followers.get(follower.run) is follower:
            del self._followers[follower.run]

    def poke(self) -> None:
        """Wake every follower holding a record, so that its mirror writes status again:
        something outside the run changed what it shows (an agent began or stopped
        crash-looping). A mirror whose status comes out the same writes nothing."""
        for follower in self._followers.values():
            follower.poke()

    async def refresh(self, follower: RunFollower) -> None:
        """Read the run's current record (after `follow`, so no write falls in between)."""
        from nats.js.errors import KeyNotFoundError

        try:
            entry = await self._kv.get(follower.run)
        except KeyNotFoundError:
            return
        if entry.value:
            follower.push(entry.value, entry.revision or 0)

    async def _on_write(self, msg: Any) -> None:
        if not msg.data:
            return  # a delete marker
        run = msg.subject[len(_PREFIX) :]
        if self._on_retry is not None and run not in self._seen:
            self._first_seen(self._on_retry, run, msg.data)
        follower = self._followers.get(run)
        if follower is not None:
            follower.push(msg.data, msg.metadata.sequence.stream)

    def _first_seen(self, on_retry: RetrySeen, run: str, data: bytes) -> None:
        """The first write of `run` seen here: a retry's is handed on, after the grace."""
        self._seen[run] = None
        if len(self._seen) > SEEN_RUNS:
            self._seen.popitem(last=False)
        if _RETRY_MARK not in data:  # records leave out a retryOf of None
            return
        try:
            state = RunState.from_bytes(data)
        except ValueError:
            return  # not a run record
        if not state.retryOf:
            return
        task = asyncio.create_task(self._tell(on_retry, state))
        self._telling.add(task)
        task.add_done_callback(self._telling.discard)

    async def _tell(self, on_retry: RetrySeen, state: RunState) -> None:
        await asyncio.sleep(self._retry_grace)
        try:
            await on_retry(state)
        except Exception as exc:
            log.warning("a retry seen in the runs bucket was not mirrored", run=state.run, error=repr(exc))
