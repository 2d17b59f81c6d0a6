"""Moving large inputs and outputs through the JetStream object store.

A value whose JSON is larger than OFFLOAD_BYTES travels as {"$cadenzaRef": NAME}; the
receiver resolves it. Agent authors never see references: the SDK resolves task inputs
and offloads outputs for them.
"""

from __future__ import annotations

from typing import Any

from nats.js.client import JetStreamContext

from ._protocol import OFFLOAD_BYTES, PAYLOADS_STORE, REF_KEY, dumps, is_ref, loads


async def offload(js: JetStreamContext, name: str, value: Any, *, limit: int = OFFLOAD_BYTES) -> Any:
    """Return `value`, or a reference to it stored under `name` when its JSON exceeds `limit`."""
    data = dumps(value)
    if len(data) <= limit:
        return value
    store = await js.object_store(PAYLOADS_STORE)
    await store.put(name, data)
    return {REF_KEY: name}


async def resolve(js: JetStreamContext, value: Any) -> Any:
    """Return the value a reference points to (or `value` itself when it is not one)."""
    if not is_ref(value):
        return value
    store = await js.object_store(PAYLOADS_STORE)
    result = await store.get(value[REF_KEY])
    assert result.data is not None
    return loads(result.data)
