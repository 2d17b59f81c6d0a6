"""Where the engine keeps values too large for the run record.

The run record is one KV value, rewritten with compare-and-swap on every event, and a KV
value (like any NATS message) can never exceed the server's max_payload, 1 MiB by
default. So the record stays small whatever the values of a run are:

* A value decide stores apart (`Decision.stores`: a large step or run output, a forEach
  item's output; a large run input) goes to the outputs bucket under its key; above
  OFFLOAD_BYTES it goes to the object store and the bucket entry holds its reference,
  which whoever loads the key resolves (`store_apart`).
* The commands of a decision travel in the record's outbox with their payloads (a task's
  input, a child run's input, a child's output for its parent). While the record is
  larger than RECORD_BYTES, the largest payloads go to the object store and the commands
  carry references, which agents and engines resolve when they receive them
  (`fit_record`). A record of the usual size costs nothing more than before.
"""

from __future__ import annotations

from typing import Any

from cadenza.nats import store_payload
from cadenza.wire import OFFLOAD_BYTES, OUTPUTS_BUCKET, dumps, is_ref

from .state import RunState

RECORD_BYTES = 256 * 1024
"""A run record larger than this sends the largest payloads of its outbox by reference;
well under the 1 MiB a KV value may have, as the record holds more than its outbox."""
MIN_PAYLOAD_APART = 1024
"""Smaller payloads stay in the record: a reference saves little and costs a write."""


async def store_apart(js: Any, pub: Any, key: str, value: Any, namespace: str) -> None:
    """Put `value` under `key` in the outputs bucket, or in the object store when it is too
    large for a KV value, the bucket entry then holding its reference (the object in the
    run's namespace's store)."""
    data = dumps(value)
    if len(data) > OFFLOAD_BYTES:
        data = dumps(await store_payload(js, key, data, namespace=namespace))
    await pub.kv_put(OUTPUTS_BUCKET, key, data)


async def fit_record(js: Any, state: RunState) -> bytes:
    """The record as it is to be written: `state.to_bytes()`, after sending the largest
    payloads of its outbox by reference while it is larger than RECORD_BYTES."""
    data = state.to_bytes()
    excess = len(data) - RECORD_BYTES
    if excess <= 0:
        return data
    payloads = []
    for cmd in state.outbox:
        slot = _payload_slot(cmd)
        if slot is not None and not is_ref(slot[0][slot[1]]):
            holder, field, name = slot
            raw = dumps(holder[field])
            payloads.append((len(raw), holder, field, name, raw))
    payloads.sort(key=lambda p: p[0], reverse=True)
    for size, holder, field, name, raw in payloads:
        if excess <= 0 or size < MIN_PAYLOAD_APART:
            break
        holder[field] = await store_payload(js, name, raw, namespace=state.namespace)
        excess -= size - len(dumps(holder[field]))
    return state.to_bytes()


def _payload_slot(cmd: dict[str, Any]) -> tuple[dict[str, Any], str, str] | None:
    """Where a command's payload is, and the object name it goes by: (dict, key, name).

    Each name is derived from the command's own id, so a record written again after a
    conflict, or carried out again after a crash, refers to the same object.
    """
    op = cmd.get("op")
    if op == "dispatch":  # a task for an agent: the SDK resolves its input
        return cmd["body"], "input", f"{cmd['msgId']}.input"
    if op == "startChild":  # a child run: the engine resolves its input when it starts
        return cmd, "input", f"{cmd['run']}.input"
    if op == "publish" and "output" in cmd["body"]:  # a child's result: its parent keeps the reference
        return cmd["body"], "output", f"{cmd['msgId']}.output"
    return None
