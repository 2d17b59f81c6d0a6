"""Reading the audit trail.

Each decision's audit records (run, step, event, old -> new phase, reason, actor, time,
and a per-run `seq`) are written with the run record, in its outbox, by the same
compare-and-swap as the decision: a decision whose write lost never reaches the trail.
After the write the engine publishes them, one message per decision, to the AUDIT stream
on `cadenza.audit.<namespace>.<run>`; whoever loads a record whose outbox was not
carried out publishes them again. So a committed record cannot be lost, whatever
restarts or stalls meanwhile (the stream once copied revisions of the runs bucket, which
keeps a few per run, and lost those superseded before a stalled copy read them), and the
stream holds only audit records. A record may arrive twice: it is read once, by (run, seq).
"""

from __future__ import annotations

from typing import Any

from cadenza.wire import AUDIT_STREAM, audit_subject, loads


async def read_audit(js: Any, namespace: str, run: str = ">", idle: float = 0.5) -> list[dict[str, Any]]:
    """Every audit record of one run (or, with run='>', of every run of a namespace), once
    each, in (run, seq) order; reading ends after `idle` seconds of quiet."""
    info = await js.stream_info(AUDIT_STREAM)
    if not info.state.messages:
        return []
    records: dict[tuple[str, int], dict[str, Any]] = {}
    sub = await js.subscribe(audit_subject(namespace, run), stream=AUDIT_STREAM, ordered_consumer=True)
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=idle)
            except TimeoutError:
                break
            for rec in loads(msg.data):
                records.setdefault((rec["run"], rec["seq"]), rec)
    finally:
        await sub.unsubscribe()
    return [records[key] for key in sorted(records)]
