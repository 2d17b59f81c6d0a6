"""`task.record_usage`: each model call's usage goes to the engine as a `usage` event.

The engine adds it to the attempt, the step and the run, and holds the run's budget
against it (a run over budget is paused before its next dispatch). Sent as one of the
attempt's side events (`_events`): settled before the attempt's outcome goes out, so the
engine has counted an attempt's usage by the time it sees the attempt end.
"""

from __future__ import annotations

import uuid
from typing import Any

from ._events import AttemptEvents


def record_usage(
    events: AttemptEvents,
    model: str,
    input_tokens: int,
    output_tokens: int,
    cost: float | None,
    measured: dict[str, Any] | None = None,
) -> None:
    """One `usage` event for one call; `measured`: what `task.model()` measured of it
    (`requests` by outcome, `waited`, `latency`: the engine's model metrics)."""
    # Unique per call: JetStream drops a repeated publish of it, the engine a redelivered
    # event; two real calls never share one.
    call = uuid.uuid4().hex
    body = {
        "type": "usage",
        "id": call,
        "model": model,
        "inputTokens": input_tokens,
        "outputTokens": output_tokens,
        "cost": cost,
        "calls": 1,
        **(measured or {}),
    }
    events.send(body, f"usage:{call}", "model usage not recorded")
