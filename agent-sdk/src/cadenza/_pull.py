"""Continuous consumption from a durable JetStream pull consumer.

nats-py's `fetch(batch=N)` returns only after N messages or its expiry, which would add
that wait to every hop. This keeps a budget of outstanding pull requests
($JS.API.CONSUMER.MSG.NEXT with batch and expires) on a private inbox instead, as the
Go and JavaScript clients' `Consume()` do: at most `concurrency` messages are requested
or being handled at any time, and each is handed to `handler` the moment it arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections.abc import Awaitable, Callable
from typing import Any

from ._deadletter import MAX_DELIVERIES
from ._protocol import consumer_name, task_subject

SERVER_DELIVERY_SLACK = 3
"""The server stops redelivering this many deliveries after the client's own limit: the
client dead-letters a message when it sees it past its limit, and this backstop bounds
deliveries even if that never happens (a process killed at that very moment)."""


def agent_consumer_config(namespace: str, agent: str, ack_wait: float) -> Any:
    """The durable pull consumer an Agent's replicas share (competing consumers).

    Whoever comes first creates it, the engine, the operator or the agent itself:
    all of them build it here, so it is the same consumer whoever made it.
    """
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    return ConsumerConfig(
        durable_name=consumer_name(namespace, agent),
        filter_subject=task_subject(namespace, agent),
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=ack_wait,
        # Retries are the engine's decisions (new attempts, new messages); redeliveries of
        # one attempt are crashes and lost acks. Past MAX_DELIVERIES the agent dead-letters.
        max_deliver=MAX_DELIVERIES + SERVER_DELIVERY_SLACK,
        max_ack_pending=-1,
        max_waiting=512,
    )


RECONNECT_CHECK = 0.25
"""Seconds between two looks at the connection's reconnect count."""


class PullConsumer:
    TASK_PREFIX = "cadenza-task:"

    def __init__(
        self,
        nc: Any,
        stream: str,
        durable: str,
        handler: Callable[[Any], Awaitable[None]],
        *,
        concurrency: int = 256,
        expires: float = 5.0,
    ) -> None:
        self.nc = nc
        self.stream = stream
        self.durable = durable
        self.handler = handler
        self.concurrency = concurrency
        self.expires = expires
        self.requested = 0  # asked for, not yet delivered or expired
        self.jobs: set[asyncio.Task[None]] = set()
        self._sub: Any = None
        self._inbox = ""
        self._paused = False
        self._watchdog: asyncio.Task[None] | None = None
        self._ids = itertools.count()
        self._heard = 0.0  # loop time of the last message or status from the server

    async def start(self) -> None:
        self._inbox = self.nc.new_inbox()
        self._sub = await self.nc.subscribe(
            self._inbox, cb=self._on_message, pending_msgs_limit=-1, pending_bytes_limit=-1
        )
        await self._top_up()
        self._watchdog = asyncio.get_running_loop().create_task(self._renew())

    async def _top_up(self) -> None:
        if self._paused:
            return
        want = self.concurrency - len(self.jobs) - self.requested
        # Ask in chunks of at least a quarter of the budget: fewer requests under load,
        # and still an immediate request when a single slot frees up on small budgets.
        if want <= 0 or (want < max(1, self.concurrency // 4) and self.requested > 0):
            return
        self.requested += want
        body = json.dumps({"batch": want, "expires": int(self.expires * 1e9)}).encode()
        await self.nc.publish(
            f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.{self.durable}", body, reply=self._inbox
        )

    async def _on_message(self, msg: Any) -> None:
        self._heard = asyncio.get_running_loop().time()
        status = msg.headers.get("Status") if msg.headers else None
        if status:
            if status == "100":  # idle heartbeat / flow control
                return
            # 404/408/409: a request ended (no messages, expired, limits): reclaim what it left.
            left = msg.headers.get("Nats-Pending-Messages")
            self.requested = max(0, self.requested - int(left)) if left else 0
            if status == "503":  # no JetStream (yet): the watchdog asks again shortly
                return
        else:
            self.requested = max(0, self.requested - 1)
            job = asyncio.get_running_loop().create_task(
                self._run(msg), name=f"{self.TASK_PREFIX}{next(self._ids)}"
            )
            self.jobs.add(job)
        await self._top_up()

    async def _run(self, msg: Any) -> None:
        try:
            await self.handler(msg)
        finally:
            self.jobs.discard(asyncio.current_task())  # type: ignore[arg-type]
            with contextlib.suppress(Exception):
                await self._top_up()

    async def _renew(self) -> None:
        """Pending requests always end with a message or a 408 within `expires`. Silence for
        longer means they were dropped (a consumer update): ask afresh. A reconnection
        (a server restart) drops them too, and is seen at once: ask afresh right away
        rather than idle for `expires` seconds while tasks wait. A request refused with
        503 (JetStream not ready yet) is asked again at the next look, not in a loop."""
        loop = asyncio.get_running_loop()
        self._heard = loop.time()
        stats = getattr(self.nc, "stats", None) or {}
        reconnects = stats.get("reconnects", 0)
        while True:
            await asyncio.sleep(RECONNECT_CHECK)
            if stats.get("reconnects", 0) != reconnects:
                reconnects = stats.get("reconnects", 0)
                self.requested = 0
            elif self.requested and loop.time() - self._heard > self.expires + 2:
                self.requested = 0
            with contextlib.suppress(Exception):
                await self._top_up()

    async def pause(self) -> None:
        """Stop asking for messages; those already requested are returned by the handler."""
        self._paused = True
        if self._watchdog:
            self._watchdog.cancel()

    async def stop(self) -> None:
        await self.pause()
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None
