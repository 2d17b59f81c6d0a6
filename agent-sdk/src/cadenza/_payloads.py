"""Moving large inputs and outputs through the JetStream object store.

A value whose JSON is larger than OFFLOAD_BYTES travels as {"$cadenzaRef": NAME}; the
receiver resolves it. Agent authors never see references: the SDK resolves task inputs
and offloads outputs for them.
"""

from __future__ import annotations

import io
from typing import Any

from nats.js.client import JetStreamContext

from ._errors import FatalError
from ._protocol import OFFLOAD_BYTES, PAYLOADS_STORE, REF_KEY, dumps, is_ref, loads, too_large


class ValueTooLarge(FatalError):
    """A value larger than the most Cadenza carries (CADENZA_MAX_VALUE_BYTES): retrying
    would make it no smaller, so the attempt fails for good, saying so."""


async def store(js: JetStreamContext, name: str, data: bytes) -> dict[str, str]:
    """Put JSON `data` in the object store under `name`; return the reference to it."""
    objects = await js.object_store(PAYLOADS_STORE)
    await objects.put(name, data)
    return {REF_KEY: name}


async def offload(
    js: JetStreamContext,
    name: str,
    value: Any,
    *,
    limit: int = OFFLOAD_BYTES,
    max_bytes: int | None = None,
    what: str = "the value",
) -> Any:
    """Return `value`, or a reference to it stored under `name` when its JSON exceeds `limit`.

    Above `max_bytes` it raises ValueTooLarge, naming the value as `what`.
    """
    try:
        data = dumps(value)
    except (TypeError, ValueError) as exc:  # a handler's bug: another attempt returns the same
        raise FatalError(f"{what} cannot be sent as JSON: {exc}") from exc
    if max_bytes is not None and len(data) > max_bytes:
        raise ValueTooLarge(f"{what} is {too_large(len(data), max_bytes)}")
    if len(data) <= limit:
        return value
    return await store(js, name, data)


async def resolve(js: JetStreamContext, value: Any) -> Any:
    """Return the value a reference points to (or `value` itself when it is not one)."""
    if not is_ref(value):
        return value
    objects = await js.object_store(PAYLOADS_STORE)
    # Into a buffer: without one nats-py appends each 128 KiB chunk to an immutable bytes
    # object, which copies the whole value once per chunk (11 s for 64 MiB, 1.5 s this way).
    buffer = io.BytesIO()
    await objects.get(value[REF_KEY], writeinto=buffer)
    return loads(buffer.getvalue())
