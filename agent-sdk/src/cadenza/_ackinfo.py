"""What a JetStream message's ack subject says about it, read without nats-py's metadata.

``$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ns>.<pending>``, or with
``<domain>.<account hash>`` after ACK and a random token last (the newer form). nats-py's
``msg.metadata`` parses all of it into objects and a datetime: on every event that was a
few percent of the engine's CPU, for one number.
"""

from __future__ import annotations

from typing import Any


def _token(msg: Any, old: int, new: int) -> str | None:
    tokens = (getattr(msg, "reply", None) or "").split(".")
    if len(tokens) == 9:
        return tokens[old]
    if len(tokens) >= 11:
        return tokens[new]
    return None


def deliveries(msg: Any) -> int:
    """How many times JetStream has delivered `msg` (1 when it cannot tell)."""
    try:
        return int(_token(msg, 4, 6) or 1)
    except ValueError:
        return 1


def stream_sequence(msg: Any) -> str:
    return _token(msg, 5, 7) or "0"


def stored_at(msg: Any, default: float) -> float:
    """When JetStream stored `msg` (its server's clock), or `default`."""
    try:
        token = _token(msg, 7, 9)
        return int(token) / 1e9 if token is not None else default
    except ValueError:
        return default
