"""Messages given up on: bounded deliveries and the dead-letter stream.

A task or event that can never be handled (it does not parse, it names no valid run, or
it was delivered `limit` times without an outcome, as when the input makes the agent
process crash) must not be redelivered for ever: it is copied, unchanged, into
DEAD_LETTER_STREAM with the reason in its headers, then terminated in its work queue.
Nothing is lost: `cadenza dead-letters` lists them, and the body is the original message.
"""

from __future__ import annotations

from typing import Any

from ._ackinfo import deliveries, stream_sequence
from ._protocol import DEAD_LETTER_STREAM

MAX_DELIVERIES = 5
"""Deliveries of one message before it is dead-lettered (CADENZA_MAX_DELIVER overrides).

Deliveries are counted by JetStream: an attempt whose agent process died, one returned by
a replica shutting down, and one whose ack wait expired all count."""

REASON = "Cadenza-Dead-Reason"
SOURCE = "Cadenza-Dead-Source"
SUBJECT = "Cadenza-Dead-Subject"
DELIVERIES = "Cadenza-Dead-Deliveries"


def _header_text(text: str, limit: int = 2000) -> str:
    # Header values are one line of printable text.
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


async def dead_letter(js: Any, msg: Any, source: str, reason: str) -> None:
    """Copy `msg` into the dead-letter stream with `reason`, then terminate it.

    The copy's Nats-Msg-Id is the source stream and sequence, so a crash between the copy
    and the termination (the message comes back and is dead-lettered again) stores it once.
    """
    suffix = msg.subject.removeprefix("cadenza.")
    headers = {
        REASON: _header_text(reason),
        SOURCE: source,
        SUBJECT: msg.subject,
        DELIVERIES: str(deliveries(msg)),
        "Nats-Msg-Id": f"dead:{source}:{stream_sequence(msg)}",
    }
    await js.publish(f"cadenza.dead.{suffix}", msg.data or b"", headers=headers, stream=DEAD_LETTER_STREAM)
    await msg.term()
