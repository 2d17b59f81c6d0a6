"""Reading the dead-letter stream: what was given up on, why, and the original message."""

from __future__ import annotations

import base64
from typing import Any

from cadenza.nats import (
    DEAD_LETTER_DELIVERIES_HEADER,
    DEAD_LETTER_REASON_HEADER,
    DEAD_LETTER_SOURCE_HEADER,
    DEAD_LETTER_SUBJECT_HEADER,
)
from cadenza.wire import DEAD_LETTER_STREAM


async def read_dead_letters(js: Any, limit: int = 100) -> list[dict[str, Any]]:
    """The newest `limit` dead letters, oldest first; empty when there are none."""
    from nats.js.errors import NotFoundError

    try:
        info = await js.stream_info(DEAD_LETTER_STREAM)
    except NotFoundError:
        return []
    first, last = max(1, info.state.first_seq), info.state.last_seq
    records: list[dict[str, Any]] = []
    seq = last
    while seq >= first and len(records) < limit:
        try:
            msg = await js.get_msg(DEAD_LETTER_STREAM, seq)
        except NotFoundError:  # deleted or aged out
            seq -= 1
            continue
        headers = msg.headers or {}
        data = msg.data or b""
        try:
            text: str | None = data.decode()
        except UnicodeDecodeError:
            text = None
        records.append(
            {
                "seq": msg.seq,
                "source": headers.get(DEAD_LETTER_SOURCE_HEADER, ""),
                "subject": headers.get(DEAD_LETTER_SUBJECT_HEADER, ""),
                "deliveries": int(headers.get(DEAD_LETTER_DELIVERIES_HEADER, "0") or 0),
                "reason": headers.get(DEAD_LETTER_REASON_HEADER, ""),
                "size": len(data),
                # The original body, unchanged: as text when it is text, else base64.
                "data": text if text is not None else None,
                "dataBase64": None if text is not None else base64.b64encode(data).decode(),
            }
        )
        seq -= 1
    records.reverse()
    return records
