"""JetStream publishes that await their PubAck, many in flight over one reply subscription.

nats-py's ``js.publish`` is a request: per call it draws a NUID token, creates a future
with a done-callback and wraps the wait in ``asyncio.wait_for`` (one timer each). On the
engine's hot path every event costs two or three of them (the run record's
compare-and-swap, the task publishes), and that machinery was about a tenth of the
engine's CPU in the benchmark profile. Here a publish is one ``nc.publish`` with a reply
subject under one wildcard subscription, a counter for the token, and a single timer
sweeps the requests that time out. Written here because nats-py offers no pipelined
publish; it uses only nats-py's public API and raises the exceptions ``js.publish`` and
``KeyValue.update`` raise, so callers handle errors the same way.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections import OrderedDict
from typing import Any

import nats.errors
import nats.js.errors

_WRONG_LAST_SEQUENCE = (10071, 10164)  # JSStreamWrongLastSequence(Constant)Err


class Publisher:
    """Publish to JetStream and await the PubAck; return the stream sequence."""

    def __init__(self, nc: Any, timeout: float = 5.0) -> None:
        self.nc = nc
        self.timeout = timeout
        self._prefix = ""
        self._sub: Any = None
        self._tokens = itertools.count()
        # token -> (future, deadline); insertion order is deadline order (one timeout)
        self._pending: OrderedDict[str, tuple[asyncio.Future[Any], float]] = OrderedDict()
        self._sweep: asyncio.TimerHandle | None = None
        self._lock = asyncio.Lock()

    async def _subscribe(self) -> None:
        async with self._lock:
            if self._sub is None:
                prefix = f"{self.nc.new_inbox()}."
                self._sub = await self.nc.subscribe(f"{prefix}*", cb=self._on_reply)
                self._prefix = prefix

    async def send(
        self, subject: str, data: bytes, headers: dict[str, str] | None = None
    ) -> asyncio.Future[Any]:
        """Put a publish on the connection and return the future of the server's reply,
        for `acked`. Publishes sent one after another reach the server in that order, and
        their PubAcks are awaited together afterwards: no task per publish (the engine
        sends a decision's claim marks ahead of its record write, and its tasks and audit
        message after it)."""
        if self._sub is None:
            await self._subscribe()
        token = str(next(self._tokens))
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._pending[token] = (future, loop.time() + self.timeout)
        if self._sweep is None:
            self._sweep = loop.call_later(self.timeout, self._expire)
        try:
            await self.nc.publish(subject, data, reply=self._prefix + token, headers=headers)
        except BaseException:
            self._pending.pop(token, None)
            raise
        return future

    async def send_kv_update(self, bucket: str, key: str, value: bytes, last: int) -> asyncio.Future[Any]:
        """`send` of ``KeyValue.update`` (``last=0``: create); its `acked(kv=True)` raises
        KeyWrongLastSequenceError when the key's revision is not ``last``."""
        return await self.send(
            f"$KV.{bucket}.{key}", value, {"Nats-Expected-Last-Subject-Sequence": str(last)}
        )

    async def acked(self, sent: asyncio.Future[Any], *, kv: bool = False) -> int:
        """The stream sequence of a `send` once its PubAck is in; raises what ``js.publish``
        raises (``kv``: what ``KeyValue.update`` raises)."""
        msg = await sent
        if msg.headers and msg.headers.get("Status") == "503":
            raise nats.js.errors.NoStreamResponseError
        resp = json.loads(msg.data)
        if "error" in resp:
            try:
                nats.js.errors.APIError.from_error(resp["error"])  # raises the matching subclass
            except nats.js.errors.APIError as err:
                if kv and err.err_code in _WRONG_LAST_SEQUENCE:
                    raise nats.js.errors.KeyWrongLastSequenceError(description=err.description) from None
                raise
        return int(resp["seq"])

    async def publish(self, subject: str, data: bytes, headers: dict[str, str] | None = None) -> int:
        return await self.acked(await self.send(subject, data, headers))

    async def kv_update(self, bucket: str, key: str, value: bytes, last: int) -> int:
        """``KeyValue.update`` (``last=0``: create): write only if the key's revision is ``last``."""
        return await self.acked(await self.send_kv_update(bucket, key, value, last), kv=True)

    async def kv_put(self, bucket: str, key: str, value: bytes) -> int:
        return await self.publish(f"$KV.{bucket}.{key}", value)

    @staticmethod
    def discard(sent: list[asyncio.Future[Any]]) -> None:
        """Give up waiting for the PubAcks of `sent` (what was sent stays sent): the
        caller fails before it would have awaited them, and none may be left with an
        outcome nobody observes."""
        for future in sent:
            if not future.done():
                future.cancel()
            elif not future.cancelled():
                future.exception()  # observed: asyncio does not report it as lost

    async def settle(self, sent: list[asyncio.Future[Any]]) -> None:
        """Await the PubAcks of `sent` (`send`s), all of them, then raise the first
        failure in their order, if any: none is left unobserved."""
        failure: BaseException | None = None
        for future in sent:
            try:
                await self.acked(future)
            except Exception as exc:
                failure = failure or exc
        if failure is not None:
            raise failure

    async def _on_reply(self, msg: Any) -> None:
        entry = self._pending.pop(msg.subject[len(self._prefix) :], None)
        if entry is not None and not entry[0].done():
            entry[0].set_result(msg)

    def _expire(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        while self._pending:
            token, (future, deadline) = next(iter(self._pending.items()))
            if deadline > now:
                self._sweep = loop.call_later(deadline - now, self._expire)
                return
            del self._pending[token]
            if not future.done():
                future.set_exception(nats.errors.TimeoutError())
        self._sweep = None

    async def close(self) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for future, _ in self._pending.values():
            if not future.done():
                future.cancel()
        self._pending.clear()
        if self._sub is not None:
            sub, self._sub = self._sub, None
            try:
                await sub.unsubscribe()
            except Exception:  # the connection may be closed already
                pass
