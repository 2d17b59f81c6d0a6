"""The engine reads an event's stored-at time from its ack subject: it must agree with nats-py."""

from __future__ import annotations

import pytest
from cadenza._ackinfo import stored_at as _stored_at
from nats.aio.msg import Msg


@pytest.mark.parametrize(
    "reply",
    [
        "$JS.ACK.CADENZA_EVENTS.engine.1.42.40.1763771234123456789.3",
        "$JS.ACK.hub.ACCHASH.CADENZA_EVENTS.engine.2.42.40.1763771234987654321.0.r4nd",
    ],
)
def test_agrees_with_nats_py(reply: str) -> None:
    msg = Msg(_client=None, subject="cadenza.event.default.r", reply=reply, data=b"")  # type: ignore[arg-type]
    assert _stored_at(msg, 0.0) == pytest.approx(msg.metadata.timestamp.timestamp(), abs=1e-6)


@pytest.mark.parametrize("reply", ["", "_INBOX.abc.def", "$JS.ACK.S.C.1.2.3.notanumber.0"])
def test_falls_back_when_there_is_no_timestamp(reply: str) -> None:
    msg = Msg(_client=None, subject="s", reply=reply, data=b"")  # type: ignore[arg-type]
    assert _stored_at(msg, 7.5) == 7.5
