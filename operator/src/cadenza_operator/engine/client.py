"""Events any process may send to a running engine: approvals, signals, cancellation.

They travel on the run's event subject like agent results, so they are durable,
ordered with the run's other events, and idempotent in `decide`.
"""

from __future__ import annotations

import time
from typing import Any

from cadenza.wire import dumps, event_subject


async def send_approval(
    js: Any, namespace: str, run: str, step: str, approved: bool, *, by: str, comment: str | None = None
) -> None:
    body = {
        "type": "approval",
        "run": run,
        "step": step,
        "approved": approved,
        "by": by,
        "comment": comment,
        "sentAt": time.time(),
    }
    await js.publish(
        event_subject(namespace, run),
        dumps(body),
        headers={"Nats-Msg-Id": f"approval:{run}:{step}:{by}:{approved}"},
    )


async def send_signal(
    js: Any, namespace: str, run: str, name: str, payload: Any = None, *, by: str = "cli"
) -> None:
    body = {"type": "signal", "run": run, "name": name, "payload": payload, "by": by}
    await js.publish(
        event_subject(namespace, run), dumps(body), headers={"Nats-Msg-Id": f"signal:{run}:{name}"}
    )


async def send_cancel(js: Any, namespace: str, run: str, *, by: str, reason: str = "") -> None:
    body = {"type": "cancel", "run": run, "by": by, "reason": reason}
    await js.publish(event_subject(namespace, run), dumps(body), headers={"Nats-Msg-Id": f"cancel:{run}"})
