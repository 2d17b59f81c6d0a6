"""Reading the audit trail.

Each decision's audit records (run, step, event, old -> new phase, reason, actor, time)
are written with the run record, in its outbox. The AUDIT stream sources every revision
of the runs bucket, server-side, so the trail costs the engine no message of its own and
holds exactly the decisions that were committed: a decision whose write lost its
compare-and-swap never reaches it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from cadenza.nats import stored_at
from cadenza.wire import AUDIT_STREAM, RUNS_BUCKET, loads


async def revisions(
    js: Any, namespace: str, run: str = ">", idle: float = 0.5
) -> AsyncIterator[tuple[dict[str, Any], float]]:
    """Every committed revision of one run's record (or every run's, with run='>') in a
    namespace, in order, with the time it was committed; ends after `idle` seconds of quiet."""
    info = await js.stream_info(AUDIT_STREAM)
    if not info.state.messages:
        return
    sub = await js.subscribe(f"$KV.{RUNS_BUCKET}.{run}", stream=AUDIT_STREAM, ordered_consumer=True)
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=idle)
            except TimeoutError:
                break
            if not msg.data:
                continue  # a deleted or purged run
            state = loads(msg.data)
            if state.get("namespace", "default") == namespace:
                yield state, stored_at(msg, 0.0)
    finally:
        await sub.unsubscribe()


async def read_audit(js: Any, namespace: str, run: str = ">", idle: float = 0.5) -> list[dict[str, Any]]:
    """Every audit record of one run (or, with run='>', of every run of a namespace), in order."""
    records: list[dict[str, Any]] = []
    async for state, _ in revisions(js, namespace, run, idle):
        for command in state.get("outbox", []):
            if command.get("op") == "audit":
                records.extend(command["records"])
    return records
