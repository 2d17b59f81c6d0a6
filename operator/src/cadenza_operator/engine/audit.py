"""Reading the audit trail: one JetStream message per decision, holding its records."""

from __future__ import annotations

from typing import Any

from cadenza._protocol import AUDIT_STREAM, audit_subject, loads


async def read_audit(js: Any, namespace: str, run: str = "*", idle: float = 0.5) -> list[dict[str, Any]]:
    """Every audit record of a run (or of all runs of a namespace with run='>'), in order."""
    subject = audit_subject(namespace, run)
    sub = await js.subscribe(subject, stream=AUDIT_STREAM, ordered_consumer=True)
    records: list[dict[str, Any]] = []
    try:
        info = await js.stream_info(AUDIT_STREAM)
        if not info.state.messages:
            return records
        while True:
            try:
                msg = await sub.next_msg(timeout=idle)
            except TimeoutError:
                break
            body = loads(msg.data)
            records.extend(body if isinstance(body, list) else [body])
    finally:
        await sub.unsubscribe()
    return records
