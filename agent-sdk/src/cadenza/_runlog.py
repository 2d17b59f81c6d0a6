"""An attempt's `task.log` lines, sent to the run's log (LOGS_STREAM) as well as stderr.

On a shared agent pod the lines of one step are lost among every other task's; sent to
JetStream on `cadenza.log.<ns>.<agent>.<run>.<step>.<item>.<attempt>`, `cadenza logs RUN
STEP` and the console read exactly them. A structlog processor (inserted before the
renderer of whatever chain is configured, so the stderr line is unchanged) takes each
event; what it sends is bounded so a handler can never flood the stream or itself:

- a line's message and each bound value are cut at MAX_TEXT characters, the record at
  MAX_RECORD_BYTES, with a marker saying how much was cut;
- an attempt sends at most `max_lines` lines, then one record counting the lines dropped
  (they are on stderr all the same);
- a line is published, not awaited (its PubAck is awaited with the others by `close()`,
  before the attempt's outcome goes out, so the log is complete once the run has ended),
  and a line that cannot be stored (NATS away, no log stream) costs one warning on stderr:
  logging never blocks or fails a handler.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import re
import threading
import time
from collections.abc import Callable, Coroutine, MutableMapping
from typing import Any

import structlog

from ._protocol import dumps, log_subject, log_token

MAX_LINES = 1000
"""Lines one attempt sends to the run's log by default (CADENZA_RUN_LOG_LINES)."""
MAX_TEXT = 8192
"""Characters of a message, or of one bound value as JSON, kept in the run's log."""
MAX_RECORD_BYTES = 16 * 1024
"""Bytes of one record as JSON (the stream's max_msg_size is above it)."""
FLUSH_TIMEOUT = 5.0
"""Seconds `close()` waits for the lines' PubAcks before the outcome goes out regardless."""

_OWN_KEYS = frozenset({"event", "level", "timestamp", "run", "step", "item", "attempt", "agent", "worker"})

Publish = Callable[[str, bytes], Coroutine[Any, Any, Any]]


def truncate(text: str, limit: int = MAX_TEXT) -> str:
    """`text` cut at `limit` characters, with a marker saying how many were cut."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}…[truncated {len(text) - limit} characters]"


_TOKEN = re.compile(r"[A-Za-z0-9_=~-]+")  # a run id (log_token'd), step or agent: engine-checked


def attempt_log(
    publish: Publish,
    namespace: str,
    agent: str,
    worker: str,
    task: Any,
    loop: asyncio.AbstractEventLoop,
    max_lines: int = MAX_LINES,
) -> AttemptLog | None:
    """The run log of `task` (a cadenza.Task), or None when lines cannot be sent: none
    allowed (`max_lines` 0), or a run or step the engine would not have sent (not one
    subject token each), which on a subject could break the connection."""
    if max_lines <= 0 or not (_TOKEN.fullmatch(log_token(task.run_id)) and _TOKEN.fullmatch(task.step)):
        return None
    identity = {
        "run": task.run_id,
        "step": task.step,
        "item": task.item,
        "attempt": task.attempt,
        "agent": agent,
        "worker": worker,
    }
    subject = log_subject(namespace, agent, task.run_id, task.step, task.item, task.attempt)
    return AttemptLog(publish, subject, identity, loop, max_lines)


class AttemptLog:
    """The run-log side of one attempt's `task.log`; a structlog processor."""

    def __init__(
        self,
        publish: Publish,
        subject: str,
        identity: dict[str, Any],
        loop: asyncio.AbstractEventLoop,
        max_lines: int = MAX_LINES,
    ) -> None:
        self._publish = publish
        self._subject = subject
        self._identity = identity  # run, step, item, attempt, agent, worker
        self._loop = loop
        self._max_lines = max_lines
        self._lines = 0
        self._lock = threading.Lock()  # a sync handler logs from its own thread (or several)
        self._pending: list[asyncio.Future[Any] | concurrent.futures.Future[Any]] = []

    @property
    def used(self) -> bool:
        """Whether anything was logged (a handler that logs nothing costs no flush)."""
        return self._lines > 0

    def logger(self, name: str) -> Any:
        """A structlog logger of the configured chain with this processor before its renderer."""
        processors = list(structlog.get_config()["processors"])
        processors.insert(max(len(processors) - 1, 0), self)
        return structlog.wrap_logger(None, processors=processors, logger_factory_args=(name,))

    def __call__(self, logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> Any:
        try:
            with self._lock:
                self._lines += 1
                n = self._lines
            if n <= self._max_lines:
                self._send(self._record(n, method, event_dict))
        except Exception:  # never the handler's problem; the line is on stderr all the same
            pass
        return event_dict

    def _record(self, n: int, method: str, event_dict: MutableMapping[str, Any]) -> bytes:
        if event_dict.get("exc_info") and "exception" not in event_dict:
            # a chain without format_exc_info (structlog's default) renders it only at the end
            event_dict = structlog.processors.format_exc_info(None, method, dict(event_dict))
        level = str(event_dict.get("level") or method)
        record: dict[str, Any] = {
            "time": time.time(),
            "level": "error" if level == "exception" else level,
            "event": truncate(str(event_dict.get("event", ""))),
            **self._identity,
            "n": n,
            "fields": {},
        }
        budget = MAX_RECORD_BYTES - len(dumps(record)) - 128  # room for the marker below
        fields: dict[str, Any] = record["fields"]
        cut = 0
        for key, value in event_dict.items():
            if key in _OWN_KEYS:
                continue
            text = dumps(value)  # JSON-safe: what JSON cannot hold becomes a string
            kept = value
            # a long value is cut to what the record has room for (at most MAX_TEXT), with
            # its marker; one with no room left is left out and counted
            room = min(MAX_TEXT, budget - len(key) - 80)
            if len(text) + len(key) + 4 > budget or len(text) > MAX_TEXT:
                if room < 16:
                    cut += 1
                    continue
                kept = truncate(text.decode(errors="replace"), room)
                text = dumps(kept)
            budget -= len(text) + len(key) + 4
            fields[str(key)] = kept
        if cut:
            fields["truncated"] = f"{cut} values left out: the record is limited to {MAX_RECORD_BYTES} bytes"
        data = dumps(record)
        if len(data) > MAX_RECORD_BYTES:  # characters of several bytes each, cut by count
            record["event"] = truncate(record["event"], MAX_TEXT // 8)
            record["fields"] = {
                "truncated": f"values left out: the record is limited to {MAX_RECORD_BYTES} bytes"
            }
            data = dumps(record)
        return data

    def _send(self, data: bytes) -> None:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        future: asyncio.Future[Any] | concurrent.futures.Future[Any]
        if running is self._loop:
            future = asyncio.ensure_future(self._publish(self._subject, data))
        else:  # a sync handler's thread: through the agent's loop, in the order logged
            future = asyncio.run_coroutine_threadsafe(self._publish(self._subject, data), self._loop)
        future.add_done_callback(_retrieve)
        self._pending.append(future)

    async def close(self, timeout: float = FLUSH_TIMEOUT) -> int:
        """Send the count of the lines dropped (if any), then wait (at most `timeout`
        seconds) for every line's PubAck; return the number of lines not stored."""
        with self._lock:
            dropped = self._lines - self._max_lines
        if dropped > 0:
            record = {
                "time": time.time(),
                "level": "warning",
                "event": (
                    f"{dropped} lines dropped: an attempt sends at most {self._max_lines} lines to the "
                    "run's log (CADENZA_RUN_LOG_LINES); every line is on the agent's stderr"
                ),
                **self._identity,
                "n": self._max_lines + 1,
                "fields": {"dropped": dropped},
            }
            self._send(dumps(record))
        pending, self._pending = self._pending, []
        if not pending:
            return 0
        waiting = [asyncio.wrap_future(f) if isinstance(f, concurrent.futures.Future) else f for f in pending]
        done, not_done = await asyncio.wait(waiting, timeout=timeout)
        lost = len(not_done) + sum(1 for f in done if f.cancelled() or f.exception() is not None)
        if lost:
            structlog.get_logger("cadenza.agent").warning(
                "log lines not stored in the run's log", lost=lost, **self._identity
            )
        return lost


def _retrieve(future: asyncio.Future[Any] | concurrent.futures.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # a line not stored is counted by close(), not an error to report
