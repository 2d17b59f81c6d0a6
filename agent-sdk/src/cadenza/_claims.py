"""One claim per attempt: who may start it, an agent or nobody.

While an attempt waits in its Agent's queue the engine may give it up: its queueTimeout
expires, the run is cancelled or fails, its step is cancelled. Checking the run record
and then starting is not atomic (the engine can give it up in between, a shared read can
be older than that commit, and a fresh task is not checked at all), so both sides meet
at one key instead: `<namespace>.<agent>.<task id>` in the KV bucket `cadenza_claims`
(`claim_key`: an agent's credential reaches its own Agent's claims only).

- The agent creates it (compare-and-swap on non-existence) with its worker id and the
  time, before it starts the handler; a key that exists says who holds it, and
  `abandoned` means the attempt may not start.
- The engine writes `abandoned` before it commits a decision that gives attempts up
  (`give_up`, unconditionally: a redelivery of one already started may not start again),
  along with the commit of one where attempts finish (a redelivered task of a finished
  attempt is not started again: an agent need not read the run record to tell), and for a queue
  timer creates it (`claim` with no worker): whoever was first wins, so an agent that
  started first counts as started instead of timing out.

Every start thus comes before the commit that gave its attempt up, or not at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ._protocol import CLAIMS_BUCKET, dumps, loads

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


async def claim(kv: Any, key: str, worker: str | None, at: float | None = None, pub: Any = None) -> Claim:
    """Create the claim `key` for `worker` (None: the engine abandons the attempt) unless
    it exists; return who holds it now. With a `Publisher` (`pub`), the create is one of
    its pipelined publishes (no request machinery per claim: one claim per task is on
    every agent's hot path). Raises what the KV raises when NATS does not answer."""
    from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

    value = ABANDONED if worker is None else dumps({"worker": worker, "at": at})
    for _ in range(5):
        try:
            if pub is not None:
                await pub.kv_update(CLAIMS_BUCKET, key, value, last=0)
            else:
                await kv.create(key, value)
            return _parse(value)
        except KeyWrongLastSequenceError:
            pass
        try:
            return _parse((await kv.get(key)).value)
        except KeyNotFoundError:
            continue  # expired (CLAIM_MAX_AGE) between the two: try again
    raise RuntimeError(f"claim {key}: neither created nor found")


async def give_up(pub: Any, key: str) -> None:
    """The engine gives the attempt `key` up, whoever holds its claim: no agent may start
    it from now on (one already started is stopped by the engine's cancel notice).
    `pub`: a `Publisher`."""
    await pub.acked(await send_give_up(pub, key))


async def send_give_up(pub: Any, key: str) -> Any:
    """`give_up`, put on the connection: the future of its PubAck (`Publisher.acked`), so
    that a write sent after it reaches the server after it."""
    return await pub.send(f"$KV.{CLAIMS_BUCKET}.{key}", ABANDONED)
