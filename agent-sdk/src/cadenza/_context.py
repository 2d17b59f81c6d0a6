"""Shared context: data agents of one run read and write, kept apart from execution state.

The engine owns the run record (phases, attempts, timers); agents never write it. What
agents want to share (a customer profile, a draft, notes) goes here instead, in its own
JetStream KV bucket, so the two change at their own rates and cannot corrupt each other.

Writes are recorded in the run's audit trail (key, step, attempt, revision; never the
value): after each write the agent publishes a small `context` event to the engine, which
appends the record. The write does not wait for it; the agent awaits those publishes
together before it sends the attempt's outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import random
import secrets
import threading
from collections.abc import Callable, Coroutine
from typing import Any, Protocol, TypeVar

from ._events import AttemptEvents
from ._kvbind import bind
from ._protocol import CONTEXT_BUCKET, dumps, loads

CONTEXT_STREAM = f"KV_{CONTEXT_BUCKET}"
_KEY_CHARS = frozenset("-_=abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
MAX_KEY_CHARS = 256
"""The longest context key: a key is one subject token, and the audit trail keeps it."""
MAX_UPDATE_ATTEMPTS = 100
"""Compare-and-swap attempts of one `update` before it gives up (ContextConflict). Each
conflict means another writer won, so a key with N writers at once needs at most about N;
a hundred means something writes the key without end."""
T = TypeVar("T")
Updater = Callable[[Any], Any]
"""`fn` of `update`: takes the current value, returns the new one (or an awaitable of it)."""


_ABSENT = object()


class ContextConflict(RuntimeError):
    """`context.update` lost its compare-and-swap MAX_UPDATE_ATTEMPTS times in a row."""


def context_key(namespace: str, scope: str, key: str) -> str:
    """The bucket's key of a context key: namespace first, then the scope (the root run's
    id), so that an Agent's credential can be limited to `<namespace>.>`."""
    return f"{namespace}.{scope}.{key}"


def _check_key(key: str) -> str:
    if not key or len(key) > MAX_KEY_CHARS or not _KEY_CHARS.issuperset(key):
        raise ValueError(f"context key {key!r} must be 1 to {MAX_KEY_CHARS} letters, digits, '-', '_' or '='")
    return key


def _copy(value: Any) -> Any:
    """The value as JSON gives it back: what a reader will see, and never the caller's object."""
    return loads(dumps(value))


class Context(Protocol):
    """What a handler sees as `task.context`: the run's shared context.

    `get(key, default)`, `put(key, value)`, `keys()` (the keys that exist now, sorted) and
    `update(key, fn, default)`: an atomic read-modify-write, the way to change a value
    several attempts may change at once (a counter, a list of findings). Sync handlers use
    the `*_sync` forms.
    """

    async def get(self, key: str, default: Any = None) -> Any: ...
    async def put(self, key: str, value: Any) -> None: ...
    async def keys(self) -> list[str]: ...
    async def update(self, key: str, fn: Updater, default: Any = None) -> Any: ...


class _SyncMixin:
    """Blocking variants for synchronous handlers, which run in a worker thread."""

    _loop: asyncio.AbstractEventLoop | None = None

    def _block(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._loop is None:
            coro.close()
            raise RuntimeError("no event loop to run the context operation on")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def get_sync(self, key: str, default: Any = None) -> Any:
        return self._block(self.get(key, default))  # type: ignore[attr-defined]

    def put_sync(self, key: str, value: Any) -> None:
        self._block(self.put(key, value))  # type: ignore[attr-defined]

    def keys_sync(self) -> list[str]:
        result: list[str] = self._block(self.keys())  # type: ignore[attr-defined]
        return result

    def update_sync(self, key: str, fn: Updater, default: Any = None) -> Any:
        """`update` for sync handlers; `fn` runs on the agent's event loop, so keep it quick."""
        return self._block(self.update(key, fn, default))  # type: ignore[attr-defined]


class KVContext(_SyncMixin):
    """The run's context in the JetStream KV bucket `cadenza_context`, keys
    `<namespace>.<scope>.<key>` (see `context_key`).

    The namespace comes first so that an Agent's credential can name its namespace's keys
    and nothing else (security.nats_auth.agent_permissions): every operation here uses a
    subject that carries the key, never one that takes it in a request body. The bucket
    is bound without a stream-info request, which would list every key of the bucket
    (`subjects_filter`), so the credential needs none.

    `on_write(key, revision)` is called after each write that was stored (the agent
    records it in the run's audit trail).
    """

    max_attempts = MAX_UPDATE_ATTEMPTS
    list_timeout = 10.0
    """Seconds `keys()` waits for each key of the listing before it gives up (TimeoutError);
    the server sends them at once, so only a server in trouble takes that long."""

    def __init__(
        self,
        nc: Any,
        namespace: str,
        scope: str,
        loop: asyncio.AbstractEventLoop | None = None,
        on_write: Callable[[str, int], None] | None = None,
    ) -> None:
        self._nc = nc
        self._js = nc.jetstream()
        # Direct gets and writes on the key's own subject, without the stream info a
        # namespace's credential may not ask for (cadenza._kvbind).
        self._kv = bind(self._js, CONTEXT_BUCKET)
        self._prefix = context_key(namespace, scope, "")
        self._loop = loop
        self._on_write = on_write

    async def get(self, key: str, default: Any = None) -> Any:
        from nats.js.errors import KeyNotFoundError

        try:
            entry = await self._kv.get(self._prefix + _check_key(key))
        except KeyNotFoundError:
            return default
        return default if entry.value is None else loads(entry.value)

    async def put(self, key: str, value: Any) -> None:
        revision = await self._kv.put(self._prefix + _check_key(key), dumps(value))
        self._written(key, revision)

    async def keys(self) -> list[str]:
        """The keys of this scope that exist now (not deleted or purged), sorted.

        As nats.go's ListKeysFiltered does, a consumer that the server filters on
        `<namespace>.<scope>.*` and that delivers the last message of each key
        (deliver-last-per-subject) with headers only, so its cost is the scope's keys and
        never their values or the rest of the bucket; a key whose last message is a
        delete or purge marker is left out. `*` and not `>`: keys are one token, so a
        scope `<run>.x` or `<run>0` is never listed.

        The consumer is ephemeral and named, so nats-py creates it on
        `$JS.API.CONSUMER.CREATE.<stream>.<name>.<filter>`, a subject a permission can
        restrict to a namespace (nats-py's own `watch` creates an unnamed one, whose filter
        is in the request body). It is not deleted: the server removes an ephemeral
        consumer once nobody listens on its deliver subject (inactive_threshold), so the
        credential needs no delete, which could not be restricted to its own consumers.
        (nats-py's `keys(filters=...)` reads every key of the bucket; the stream's
        subject counts cannot tell a deleted key from a live one.)
        """
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        subject = f"$KV.{CONTEXT_BUCKET}.{self._prefix}"
        inbox = self._nc.new_inbox()
        sub = await self._nc.subscribe(inbox)
        names: set[str] = set()
        try:
            info = await self._js.add_consumer(
                CONTEXT_STREAM,
                ConsumerConfig(
                    name=f"keys_{secrets.token_hex(8)}",
                    filter_subject=f"{subject}*",
                    deliver_subject=inbox,
                    deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
                    ack_policy=AckPolicy.NONE,
                    headers_only=True,
                    mem_storage=True,
                    num_replicas=1,
                    inactive_threshold=5.0,
                ),
            )
            pending = info.num_pending
            while pending:
                msg = await sub.next_msg(timeout=self.list_timeout)
                pending = msg.metadata.num_pending
                if (msg.headers or {}).get("KV-Operation") not in ("DEL", "PURGE"):
                    names.add(msg.subject[len(subject) :])
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        return sorted(names)

    async def update(self, key: str, fn: Updater, default: Any = None) -> Any:
        """Set `key` to `fn(current)` atomically and return the new value.

        `current` is the stored value, or a copy of `default` when the key does not exist.
        The write is a compare-and-swap on the revision read: when another writer changed
        the key meanwhile, it reads again and calls `fn` again (so `fn` must have no side
        effects), after a short random pause. After MAX_UPDATE_ATTEMPTS conflicts in a row
        it raises ContextConflict. `fn` may be async.
        """
        from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

        name = self._prefix + _check_key(key)
        for conflicts in range(self.max_attempts):
            try:
                entry = await self._kv.get(name)
                current = _copy(default) if entry.value is None else loads(entry.value)
                last = entry.revision
            except KeyNotFoundError as absent:
                # Never written (revision 0) or deleted: its marker's revision is the one to
                # compare with, as KeyValue.create does.
                current = _copy(default)
                last = absent.entry.revision if absent.entry is not None else 0
            new = fn(current)
            if inspect.isawaitable(new):
                new = await new
            data = dumps(new)
            try:
                revision = await self._kv.update(name, data, last=last)
            except KeyWrongLastSequenceError:
                # Jittered and growing a little: writers that collided do not collide again.
                await asyncio.sleep(random.uniform(0, min(0.05, 0.001 * 2**conflicts)))
                continue
            self._written(key, revision)
            return loads(data)
        raise ContextConflict(
            f"context key {key!r}: update lost its compare-and-swap {self.max_attempts} times "
            "in a row (other writers change it without end)"
        )

    def _written(self, key: str, revision: int) -> None:
        if self._on_write is not None:
            self._on_write(key, revision)


def record_writes(events: AttemptEvents, scope: str) -> Callable[[str, int], None]:
    """`on_write` for one attempt: a `context` event per write, for the audit trail (the
    key and its revision, never the value). The revision is unique in the bucket, so
    JetStream drops a repeated event by its id."""

    def written(key: str, revision: int) -> None:
        body = {"type": "context", "scope": scope, "key": key, "revision": revision}
        lost = "context write not recorded in the audit trail"
        events.send(body, f"context:{scope}.{key}:{revision}", lost)

    return written


class MemoryContext(_SyncMixin):
    """An in-memory context for `cadenza.testing`; `data` holds what handlers wrote."""

    def __init__(self, data: dict[str, Any] | None = None) -> None:
        self.data: dict[str, Any] = dict(data or {})
        self._lock = threading.Lock()  # sync handlers run in threads

    async def get(self, key: str, default: Any = None) -> Any:
        return self.get_sync(key, default)

    async def put(self, key: str, value: Any) -> None:
        self.put_sync(key, value)

    async def keys(self) -> list[str]:
        return self.keys_sync()

    async def update(self, key: str, fn: Updater, default: Any = None) -> Any:
        """Like KVContext.update: `fn(current)` is stored only if no other write came in
        between (else it runs again), as the compare-and-swap does on a server."""
        while True:
            with self._lock:
                current = _copy(self.data.get(_check_key(key), default))
                seen = self.data.get(key, _ABSENT)
            new = fn(current)
            if inspect.isawaitable(new):
                new = await new
            with self._lock:
                if self.data.get(key, _ABSENT) is seen:
                    self.data[key] = _copy(new)
                    return _copy(new)

    def get_sync(self, key: str, default: Any = None) -> Any:
        with self._lock:
            value = self.data.get(_check_key(key), _ABSENT)
        return default if value is _ABSENT else _copy(value)

    def put_sync(self, key: str, value: Any) -> None:
        with self._lock:
            self.data[_check_key(key)] = _copy(value)

    def keys_sync(self) -> list[str]:
        with self._lock:
            return sorted(self.data)

    def update_sync(self, key: str, fn: Updater, default: Any = None) -> Any:
        with self._lock:
            current = _copy(self.data.get(_check_key(key), default))
            new = fn(current)
            if inspect.isawaitable(new):
                raise TypeError("update_sync takes a plain function, not an async one")
            self.data[key] = _copy(new)
            return _copy(new)


__all__ = [
    "CONTEXT_BUCKET",
    "Context",
    "ContextConflict",
    "KVContext",
    "MemoryContext",
    "context_key",
    "record_writes",
]
