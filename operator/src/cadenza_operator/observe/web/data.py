"""What the console's pages show, read from the engine's client (the I/O side).

Every value shown is bounded (`shown`): a step's output may be megabytes, a forEach's a
thousand items; the page carries at most SHOWN_BYTES of each, marked truncated.
Values kept by reference (the outputs bucket, the object store) are fetched once per key
and the bounded text kept (`RefCache`): a finished step's output never changes under its
key, and the live fragment asks again every few seconds.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cadenza.nats import resolve_payload
from cadenza.wire import REF_KEY, loads

if TYPE_CHECKING:
    from ...engine.client import RunClient
    from ...engine.state import RunState

SHOWN_BYTES = 64 * 1024
MAX_LISTED = 500
"""Runs the list shows (the newest first); the rest are counted."""
AUDIT_IDLE = 0.2
"""Seconds of quiet that end a read of a run's audit trail (it is read per page view)."""


@dataclass(frozen=True)
class Shown:
    text: str
    truncated: bool
    size: int

    @property
    def empty(self) -> bool:
        return self.text == ""


def shown(value: Any) -> Shown:
    """`value` as indented JSON, cut at SHOWN_BYTES."""
    if value is None:
        return Shown("", False, 0)
    text = value if isinstance(value, str) else json.dumps(value, indent=2, default=str, ensure_ascii=False)
    size = len(text.encode())
    if size <= SHOWN_BYTES:
        return Shown(text, False, size)
    return Shown(text.encode()[:SHOWN_BYTES].decode(errors="ignore"), True, size)


class RefCache:
    """Bounded text of values kept apart, by key (least recently used dropped)."""

    def __init__(self, size: int = 256) -> None:
        self.size = size
        self._items: OrderedDict[str, Shown] = OrderedDict()

    async def get(self, key: str, load: Callable[[], Awaitable[Any]]) -> Shown:
        """The bounded text of the value under `key`, `load`ed once."""
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        text = shown(await load())
        self._items[key] = text
        if len(self._items) > self.size:
            self._items.popitem(last=False)
        return text


async def kept_apart(client: RunClient, ref: str, namespace: str, items: int = 0) -> Any:
    """A value the engine stored apart (engine/payloads.py, decide's `stored_apart`): an
    outputs-bucket key, `obj:<name>` in the object store, or `<run>.<step>.*`, a forEach
    step's `items` outputs under `<run>.<step>.<i>` (read until SHOWN_BYTES are had)."""
    from nats.js.errors import KeyNotFoundError

    from ...engine.decide import OBJECT_REF_PREFIX

    if ref.startswith(OBJECT_REF_PREFIX):
        return await resolve_payload(client.js, {REF_KEY: ref[len(OBJECT_REF_PREFIX) :]}, namespace=namespace)
    if ref.endswith(".*"):
        values, size = [], 0
        for i in range(items):
            value = await kept_apart(client, f"{ref[:-2]}.{i}", namespace)
            values.append(value)
            size += len(json.dumps(value, default=str))
            if size > SHOWN_BYTES and i + 1 < items:
                values.append(f"... {items - i - 1} more items not read")
                break
        return values
    try:
        entry = await client.outputs_kv.get(ref)
    except KeyNotFoundError:
        return None
    return await resolve_payload(client.js, loads(entry.value), namespace=namespace)


def matches(state: RunState, workflow: str, phase: str, namespace: str) -> bool:
    return (
        (not workflow or state.workflow == workflow)
        and (not phase or state.phase == phase)
        and (not namespace or state.namespace == namespace)
    )
