"""Moving large inputs and outputs through the JetStream object store.

A value whose JSON is larger than OFFLOAD_BYTES travels as {"$cadenzaRef": NAME}; the
receiver resolves it. Agent authors never see references: the SDK resolves task inputs
and offloads outputs for them.

Each namespace has its own object store (`payloads_store(namespace)`), so that an Agent's
credential can be given its namespace's bucket and no other. A reference names only the
object: whoever resolves it does so in the namespace of the run it belongs to.
"""

from __future__ import annotations

import io
from typing import Any

from nats.js.api import StorageType
from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError

from ._errors import FatalError
from ._protocol import OFFLOAD_BYTES, PAYLOADS_STORE, REF_KEY, dumps, is_ref, loads, payloads_store, too_large


class ValueTooLarge(FatalError):
    """A value larger than the most Cadenza carries (CADENZA_MAX_VALUE_BYTES): retrying
    would make it no smaller, so the attempt fails for good, saying so."""


async def store(js: JetStreamContext, name: str, data: bytes, *, namespace: str) -> dict[str, str]:
    """Put JSON `data` in the namespace's object store under `name`; return the reference.

    The store is made when missing (the engine makes it with an Agent's consumer; on an
    open bus whoever stores first does)."""
    bucket = payloads_store(namespace)
    try:
        objects = await js.object_store(bucket)
    except NotFoundError:
        objects = await js.create_object_store(bucket, storage=StorageType.FILE)
    await objects.put(name, data)
    return {REF_KEY: name}


async def offload(
    js: JetStreamContext,
    name: str,
    value: Any,
    *,
    namespace: str,
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
    return await store(js, name, data, namespace=namespace)


async def resolve(js: JetStreamContext, value: Any, *, namespace: str) -> Any:
    """Return the value a reference points to (or `value` itself when it is not one), from
    the namespace's object store, or from the one all namespaces shared before (a run
    started before the upgrade; an Agent's credential cannot read that one, only the engine)."""
    if not is_ref(value):
        return value
    # Into a buffer: without one nats-py appends each 128 KiB chunk to an immutable bytes
    # object, which copies the whole value once per chunk (11 s for 64 MiB, 1.5 s this way).
    buffer = io.BytesIO()
    try:
        objects = await js.object_store(payloads_store(namespace))
        await objects.get(value[REF_KEY], writeinto=buffer)
    except NotFoundError:  # the bucket, or the object in it
        buffer = io.BytesIO()
        objects = await js.object_store(PAYLOADS_STORE)
        await objects.get(value[REF_KEY], writeinto=buffer)
    return loads(buffer.getvalue())
