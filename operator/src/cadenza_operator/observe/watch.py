"""`cadenza get RUN --watch`: each new record of one run, until the run ends.

Changes come from a watch of the run's key in the runs bucket (an ordered consumer: each
revision is delivered as it is committed, none is missed). A client credential may not
create a consumer on the runs bucket (security/nats_auth.client_permissions: reads by key
only), so under one the key is read every `POLL_SECONDS` instead and a state is yielded
when its revision is new; states committed between two reads are not seen, the last one
always is, since the watch ends only on a terminal record.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Mapping
from contextlib import aclosing
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.tree import Tree

from ..engine.state import RunState
from ..engine.view import RunView
from .tree import run_tree

POLL_SECONDS = 1.0
"""How often a credential that may not watch the runs bucket reads the run's record."""


class RunRemoved(LookupError):
    """The run's record was deleted while watched (the bucket's TTL, or by hand)."""


async def run_records(kv: Any, run: str, *, poll: bool = False) -> AsyncGenerator[RunState, None]:
    """Each new committed record of `run`, the current one first; the iteration ends after
    the first with a terminal phase, or at once when the bucket holds no such run. Raises
    RunRemoved when the record is deleted while watched. `poll`: read the key every
    POLL_SECONDS instead of watching it."""
    # closed here, not by the event loop's finalizer later (after the connection is)
    async with aclosing(_polled(kv, run) if poll else _watched(kv, run)) as source:
        async for state in source:
            yield state
            if state.terminal:
                return
            _cancelled_yet()  # the caller's reads (of inputs, outputs) may have lost a Ctrl-C


def _cancelled_yet() -> None:
    """Raise CancelledError in a task asked to cancel that is still running. Python 3.11's
    asyncio.wait_for (which nats-py's requests use) drops a cancellation that arrives as
    its result does (gh-86296): Ctrl-C would leave the watch running, the task only marked
    `cancelling()`. Checked between states; 3.12's wait_for keeps the cancellation."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def _watched(kv: Any, run: str) -> AsyncGenerator[RunState, None]:
    from nats.js.errors import InvalidKeyError, KeyNotFoundError

    try:
        watcher = await kv.watch(run)
    except InvalidKeyError:  # not a run id at all: no such run
        return
    seen = 0  # the revision last yielded
    try:
        # the watcher's own iteration, not updates(timeout): that one is a wait_for, which
        # on 3.11 can drop a Ctrl-C that comes with an entry (_cancelled_yet)
        async for entry in watcher:
            _cancelled_yet()
            if entry is None:  # nats-py's "nothing current": maybe no such run
                if seen:
                    continue
                # That marker can come before a value the server has already sent
                # (engine/infra.current_entries says why), so the key is read to tell.
                try:
                    current = await kv.get(run)
                except KeyNotFoundError:  # no such run, or its delete marker
                    return
                if not current.value:
                    return
                seen = current.revision
                yield RunState.from_bytes(current.value)
                continue
            if entry.operation in ("DEL", "PURGE"):
                raise RunRemoved(f"run {run} was removed while watched")
            if entry.value and entry.revision > seen:  # not the one read by key again
                seen = entry.revision
                yield RunState.from_bytes(entry.value)
    finally:
        await watcher.stop()


async def _polled(kv: Any, run: str) -> AsyncGenerator[RunState, None]:
    from nats.js.errors import InvalidKeyError, KeyNotFoundError

    revision = None
    while True:
        _cancelled_yet()
        try:
            entry = await kv.get(run)
        except (KeyNotFoundError, InvalidKeyError):
            if revision is None:
                return
            raise RunRemoved(f"run {run} was removed while watched") from None
        if entry.revision != revision and entry.value:
            revision = entry.revision
            yield RunState.from_bytes(entry.value)
        await asyncio.sleep(POLL_SECONDS)


class LiveTree:
    """The run's tree redrawn in place on a terminal: on each new state, and every second
    for the clocks of what is waiting or executing. Left on the screen when it stops."""

    def __init__(self, console: Console | None = None):
        self.view: RunView | None = None
        self.inputs: Mapping[str, Mapping[str, Any]] = {}
        self.live = Live(
            get_renderable=self._render,
            console=console,
            screen=False,
            transient=False,
            auto_refresh=True,
            refresh_per_second=1,
        )

    def _render(self) -> Tree:
        if self.view is None:
            return Tree("…")
        return run_tree(self.view, now=time.time(), inputs=self.inputs)

    def show(self, view: RunView, inputs: Mapping[str, Mapping[str, Any]]) -> None:
        self.view, self.inputs = view, inputs
        self.live.refresh()

    def __enter__(self) -> LiveTree:
        self.live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.live.stop()


__all__: list[str] = ["POLL_SECONDS", "LiveTree", "RunRemoved", "run_records"]
