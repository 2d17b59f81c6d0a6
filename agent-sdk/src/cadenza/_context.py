"""Shared context: data agents of one run read and write, kept apart from execution state.

The engine owns the run record (phases, attempts, timers); agents never write it. What
agents want to share (a customer profile, a draft, notes) goes here instead, in its own
JetStream KV bucket, so the two change at their own rates and cannot corrupt each other.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Coroutine
from typing import Any, Protocol, TypeVar

from ._protocol import CONTEXT_BUCKET, dumps, loads

_KEY = re.compile(r"^[-_=a-zA-Z0-9]+$")
T = TypeVar("T")


def _check_key(key: str) -> str:
    if not _KEY.match(key):
        raise ValueError(f"context key {key!r} may hold only letters, digits, '-', '_' and '='")
    return key


class Context(Protocol):
    """What a handler sees as `task.context`."""

    async def get(self, key: str, default: Any = None) -> Any: ...
    async def put(self, key: str, value: Any) -> None: ...
    async def keys(self) -> list[str]: ...


class _SyncMixin:
    """Blocking variants for synchronous handlers, which run in a worker thread."""

    _loop: asyncio.AbstractEventLoop | None = None

    def _block(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._loop is None:
            raise RuntimeError("no event loop to run the context operation on")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def get_sync(self, key: str, default: Any = None) -> Any:
        return self._block(self.get(key, default))  # type: ignore[attr-defined]

    def put_sync(self, key: str, value: Any) -> None:
        self._block(self.put(key, value))  # type: ignore[attr-defined]


class KVContext(_SyncMixin):
    """The run's context in the JetStream KV bucket `cadenza_context`, keys `<scope>.<key>`."""

    def __init__(self, kv: Any, scope: str, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._kv = kv
        self._scope = scope
        self._loop = loop

    async def get(self, key: str, default: Any = None) -> Any:
        from nats.js.errors import KeyNotFoundError

        try:
            entry = await self._kv.get(f"{self._scope}.{_check_key(key)}")
        except KeyNotFoundError:
            return default
        return default if entry.value is None else loads(entry.value)

    async def put(self, key: str, value: Any) -> None:
        await self._kv.put(f"{self._scope}.{_check_key(key)}", dumps(value))

    async def keys(self) -> list[str]:
        from nats.js.errors import NoKeysError

        prefix = f"{self._scope}."
        try:
            names = await self._kv.keys(filters=[f"{prefix}>"])
        except NoKeysError:
            return []
        return sorted(k[len(prefix) :] for k in names)


class MemoryContext(_SyncMixin):
    """An in-memory context for `cadenza.testing`."""

    def __init__(self, data: dict[str, Any] | None = None) -> None:
        self.data: dict[str, Any] = dict(data or {})

    async def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(_check_key(key), default)

    async def put(self, key: str, value: Any) -> None:
        self.data[_check_key(key)] = loads(dumps(value))

    async def keys(self) -> list[str]:
        return sorted(self.data)

    def get_sync(self, key: str, default: Any = None) -> Any:
        return self.data.get(_check_key(key), default)

    def put_sync(self, key: str, value: Any) -> None:
        self.data[_check_key(key)] = loads(dumps(value))


__all__ = ["CONTEXT_BUCKET", "Context", "KVContext", "MemoryContext"]
