"""`task.record_usage`: each model call's usage goes to the engine as a `usage` event.

The engine adds it to the attempt, the step and the run, and holds the run's budget
against it (a run over budget is paused before its next dispatch). The publish is
started, not awaited, so recording costs a handler nothing; `settle()` awaits them all
before the attempt's outcome goes out, so the engine has counted the usage of an attempt
by the time it sees the attempt end. A handler running in a thread (a sync handler)
records through the agent's event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

from ._protocol import dumps


class UsageRecorder:
    """`record_usage` for one attempt: publishes one `usage` event per call."""

    def __init__(
        self,
        publish: Callable[[bytes, dict[str, str]], Coroutine[Any, Any, Any]],
        base: dict[str, Any],
        loop: asyncio.AbstractEventLoop,
        log: Any,
    ) -> None:
        self._publish = publish
        self._base = base
        self._loop = loop
        self._log = log
        self._pending: list[asyncio.Future[Any]] = []
        self._threaded: list[concurrent.futures.Future[Any]] = []

    def __call__(self, model: str, input_tokens: int, output_tokens: int, cost: float | None) -> None:
        # Unique per call: JetStream drops a repeated publish of it, the engine a
        # redelivered event; two real calls never share one.
        call = uuid.uuid4().hex
        body = {
            "type": "usage",
            **self._base,
            "id": call,
            "model": model,
            "inputTokens": input_tokens,
            "outputTokens": output_tokens,
            "cost": cost,
            "calls": 1,
        }
        data, headers = dumps(body), {"Nats-Msg-Id": f"usage:{call}"}
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            self._pending.append(asyncio.ensure_future(self._publish(data, headers)))
        else:  # a sync handler's thread: the publish runs on the agent's loop
            self._threaded.append(asyncio.run_coroutine_threadsafe(self._publish(data, headers), self._loop))

    async def settle(self) -> None:
        if not (self._pending or self._threaded):
            return
        pending, self._pending = self._pending, []
        pending += [asyncio.wrap_future(f) for f in self._threaded]
        self._threaded = []
        for outcome in await asyncio.gather(*pending, return_exceptions=True):
            if isinstance(outcome, BaseException):
                self._log.warning("model usage not recorded", error=repr(outcome))
