"""The events an attempt sends the engine besides its outcome: shared-context writes
(for the audit trail) and model usage (for budgets).

Each publish is started, not awaited, so sending costs a handler nothing; `settle()`
awaits them all before the attempt's outcome goes out, so the engine has them by the
time it sees the attempt end, and none is lost when the process exits. A handler running
in a thread (a sync handler) sends through the agent's event loop. An event that cannot
be published is logged: what it records (the write, the call) stands.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Awaitable, Callable
from typing import Any

from ._protocol import dumps


class AttemptEvents:
    """The side events of one attempt; `identity` (run, step, item, attempt, worker) goes
    into each."""

    def __init__(
        self,
        publish: Callable[[bytes, dict[str, str]], Awaitable[Any]],
        identity: dict[str, Any],
        loop: asyncio.AbstractEventLoop,
        log: Any,
    ) -> None:
        self._publish = publish
        self._identity = identity
        self._loop = loop
        self._log = log
        self._pending: list[tuple[str, asyncio.Future[Any] | concurrent.futures.Future[Any]]] = []

    def send(self, body: dict[str, Any], msg_id: str, lost: str) -> None:
        """Publish `body` with this attempt's identity; JetStream drops a repeat by `msg_id`.
        `lost` is the warning logged if it cannot be published."""

        async def publish() -> Any:
            return await self._publish(dumps({**body, **self._identity}), {"Nats-Msg-Id": msg_id})

        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            self._pending.append((lost, asyncio.ensure_future(publish())))
        else:  # a sync handler's thread
            self._pending.append((lost, asyncio.run_coroutine_threadsafe(publish(), self._loop)))

    async def settle(self) -> None:
        if not self._pending:  # most attempts send nothing: no trip through the loop
            return
        pending, self._pending = self._pending, []
        outcomes = await asyncio.gather(
            *(asyncio.wrap_future(f) if isinstance(f, concurrent.futures.Future) else f for _, f in pending),
            return_exceptions=True,
        )
        for (lost, _), outcome in zip(pending, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                self._log.warning(lost, error=repr(outcome))
