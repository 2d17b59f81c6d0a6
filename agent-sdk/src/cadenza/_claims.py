"""One claim per attempt with a queueTimeout: who may start it, the agent or nobody.

An attempt with a queueTimeout can end two ways while it waits: an agent starts it, or
its queue timer fires and the engine abandons it. Checking the run record and then
starting is not atomic (the engine can abandon in between, and a shared read can be
older than that commit), so both sides race for one key instead: the attempt's task id
in the KV bucket `cadenza_claims`, created only if it does not exist (compare-and-swap
on non-existence). The agent creates it with its worker id and the time *before* it
starts the handler; the engine creates it with `abandoned` before it decides the queue
timer. Whoever creates it first wins; the other reads who holds it, so a redelivered
task or timer gets the same answer again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ._protocol import dumps, loads

ABANDONED = b"abandoned"
"""The engine's claim: the attempt's queueTimeout expired before any agent claimed it."""


@dataclass(frozen=True)
class Claim:
    """Who holds an attempt's claim."""

    worker: str | None
    """The agent worker that may start the attempt; None when the engine abandoned it."""
    at: float | None = None
    """When the agent claimed it (its clock): the attempt's start."""

    @property
    def abandoned(self) -> bool:
        return self.worker is None


def _parse(value: bytes | None) -> Claim:
    if not value or value == ABANDONED:
        return Claim(None)
    try:
        doc = loads(value)
    except ValueError:
        return Claim(None)  # not ours to read: nobody may start it
    if not isinstance(doc, dict) or not isinstance(doc.get("worker"), str):
        return Claim(None)
    at = doc.get("at")
    return Claim(doc["worker"], float(at) if isinstance(at, int | float) else None)


async def claim(kv: Any, key: str, worker: str | None, at: float | None = None) -> Claim:
    """Create the claim `key` for `worker` (None: the engine abandons the attempt) unless
    it exists; return who holds it now. Raises what the KV raises when NATS does not answer."""
    from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

    value = ABANDONED if worker is None else dumps({"worker": worker, "at": at})
    for _ in range(5):
        try:
            await kv.create(key, value)
            return _parse(value)
        except KeyWrongLastSequenceError:
            pass
        try:
            return _parse((await kv.get(key)).value)
        except KeyNotFoundError:
            continue  # expired (CLAIM_MAX_AGE) between the two: try again
    raise RuntimeError(f"claim {key}: neither created nor found")
