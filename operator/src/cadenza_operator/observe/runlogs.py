"""The logs of one run (`cadenza logs`, the console): what its attempts' handlers logged
through `task.log`, read from the run-log stream (cadenza._runlog writes it).

A read is an ephemeral named consumer delivering to this client's own inbox, created on
`$JS.API.CONSUMER.CREATE.CADENZA_LOGS.<name>.<filter>`: the subject names the filter (its
namespace's logs), which a client credential is limited to (security/nats_auth.py), and the
server removes the consumer once the inbox is gone, so nothing is deleted. The run, step,
item, attempt and agent of a record are taken from its subject, which an agent's
credential pins to its own name, not from the body it wrote.
"""

from __future__ import annotations

import contextlib
import secrets
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from cadenza.wire import LOGS_STREAM, RUNS_BUCKET, TERMINAL_RUN_PHASES, loads, log_token

from ..models import STEP_NAME_PATTERN

READ_TIMEOUT = 5.0
"""Seconds a read waits for the next record the server said it holds before giving up."""


@dataclass(frozen=True)
class LogRecord:
    """One line a handler logged, with where it came from."""

    time: float
    """When it was logged (the agent's clock, seconds since the epoch)."""
    level: str
    event: str
    """The message."""
    run: str
    step: str
    item: int | None
    attempt: int
    agent: str
    worker: str = ""
    """host:pid of the agent process."""
    fields: dict[str, Any] = field(default_factory=dict)
    """The key/values bound to or passed with the line (JSON-safe)."""
    seq: int = 0
    """Its sequence in the stream: records sort by it in the order they were stored."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def log_filter(
    namespace: str, run: str, step: str | None = None, attempt: int | None = None, item: int | None = None
) -> str:
    """The subjects of a run's records (of one step, one forEach item of it, one attempt):
    cadenza.wire.log_subject."""
    items = "*" if item is None else item
    attempts = "*" if attempt is None else attempt
    return f"cadenza.log.{namespace}.*.{log_token(run)}.{step or '*'}.{items}.{attempts}"


def split_step(step: str | None) -> tuple[str | None, int | None]:
    """`STEP` or `STEP#ITEM` (a forEach item, as a record's line names it) as (step, item);
    LogsRequestError for anything else."""
    import re

    if step is None:
        return None, None
    name, hashed, item = step.partition("#")
    if not re.fullmatch(STEP_NAME_PATTERN, name) or (hashed and not item.isdecimal()):
        raise LogsRequestError(
            f"STEP {step!r} is not a step name ({STEP_NAME_PATTERN}), nor STEP#ITEM (a forEach item: each#3)"
        )
    return name, int(item) if hashed else None


def parse_record(subject: str, data: bytes, seq: int, run: str) -> LogRecord | None:
    """A record from its subject and body; None for one that is not a record."""
    parts = subject.split(".")
    if len(parts) != 8:
        return None
    _, _, _, agent, _, step, item, attempt = parts
    try:
        body = loads(data)
        if not isinstance(body, dict):
            return None
        fields = body.get("fields")
        return LogRecord(
            time=float(body.get("time") or 0.0),
            level=str(body.get("level") or "info"),
            event=str(body.get("event", "")),
            run=run,
            step=step,
            item=None if item == "-" else int(item),
            attempt=int(attempt),
            agent=agent,
            worker=str(body.get("worker") or ""),
            fields=fields if isinstance(fields, dict) else {},
            seq=seq,
        )
    except ValueError:
        return None


class _Reader:
    """One ephemeral consumer over the records of `filter_subject` from `start` on."""

    def __init__(self, js: Any, filter_subject: str, start: int = 0) -> None:
        self.js = js
        self.nc = js._nc  # nats-py's JetStreamContext keeps its connection (for the inbox)
        self.filter_subject = filter_subject
        self.start = start
        self.sub: Any = None
        self.pending = 0

    async def open(self) -> _Reader:
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        inbox = self.nc.new_inbox()
        self.sub = await self.nc.subscribe(inbox)
        config = ConsumerConfig(
            name=f"logs_{secrets.token_hex(8)}",
            filter_subject=self.filter_subject,
            deliver_subject=inbox,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE if self.start else DeliverPolicy.ALL,
            opt_start_seq=self.start or None,
            ack_policy=AckPolicy.NONE,
            mem_storage=True,
            num_replicas=1,
            inactive_threshold=5.0,
        )
        try:
            info = await self.js.add_consumer(LOGS_STREAM, config)
        except BaseException:
            await self.close()
            raise
        self.pending = info.num_pending
        return self

    async def next(self, timeout: float) -> Any:
        msg = await self.sub.next_msg(timeout=timeout)
        self.pending = msg.metadata.num_pending
        return msg

    async def close(self) -> None:
        if self.sub is not None:
            with contextlib.suppress(Exception):
                await self.sub.unsubscribe()
            self.sub = None


async def _records(js: Any, filter_subject: str, run: str, start: int = 0) -> AsyncIterator[LogRecord]:
    """The records the stream holds now, from stream sequence `start` on, in order."""
    from nats.errors import TimeoutError as NatsTimeout

    reader = await _Reader(js, filter_subject, start).open()
    try:
        while reader.pending:
            try:
                msg = await reader.next(READ_TIMEOUT)
            except NatsTimeout:
                return  # removed meanwhile (age or size limits)
            record = parse_record(msg.subject, msg.data, msg.metadata.sequence.stream, run)
            if record is not None:
                yield record
    finally:
        await reader.close()


async def read_logs(
    js: Any,
    namespace: str,
    run: str,
    step: str | None = None,
    attempt: int | None = None,
    limit: int = 10_000,
    *,
    item: int | None = None,
) -> list[LogRecord]:
    """The run's records (of `step`, of its forEach `item`, of `attempt`) the stream holds,
    oldest first: the newest `limit` of them."""
    kept: deque[LogRecord] = deque(maxlen=max(limit, 0))
    async for record in _records(js, log_filter(namespace, run, step, attempt, item), run):
        kept.append(record)
    return list(kept)


async def follow_logs(
    js: Any,
    namespace: str,
    run: str,
    step: str | None = None,
    attempt: int | None = None,
    *,
    item: int | None = None,
    ended: Callable[[], Awaitable[bool]] | None = None,
    poll: float = 0.5,
) -> AsyncIterator[LogRecord]:
    """The run's records, the stored ones first, then each as it is stored, until the run
    has ended (`ended()`, by default the run record's phase is terminal).

    An agent stores an attempt's lines before its outcome, so once the run has ended its
    log is complete: what was not delivered yet is read by a last exact read from the
    sequence after the last one seen, then the iteration ends."""
    from nats.errors import TimeoutError as NatsTimeout

    ended = ended or run_ended(js, run)
    filter_subject = log_filter(namespace, run, step, attempt, item)
    last = 0
    reader = await _Reader(js, filter_subject).open()
    try:
        while True:
            try:
                msg = await reader.next(poll)
            except NatsTimeout:
                if await ended():
                    break
                continue
            last = msg.metadata.sequence.stream
            record = parse_record(msg.subject, msg.data, last, run)
            if record is not None:
                yield record
    finally:
        await reader.close()
    async for record in _records(js, filter_subject, run, start=last + 1):
        yield record


def run_ended(js: Any, run: str) -> Callable[[], Awaitable[bool]]:
    """Whether the run's record is in a terminal phase (or gone), read on each call."""
    kv: Any = None

    async def ended() -> bool:
        from nats.js.errors import KeyNotFoundError

        nonlocal kv
        if kv is None:
            kv = await js.key_value(RUNS_BUCKET)
        try:
            entry = await kv.get(run)
        except KeyNotFoundError:
            return True
        return not entry.value or loads(entry.value).get("phase") in TERMINAL_RUN_PHASES

    return ended


class LogsRequestError(ValueError):
    """A `cadenza logs` request that names no run, or not a step name: exit 2."""


async def show_logs(
    js: Any,
    namespace: str,
    run: str,
    step: str | None,
    attempt: int | None,
    *,
    follow: bool = False,
    output: str = "text",
    write: Callable[[str], None],
) -> int:
    """`cadenza logs`: each record written as a line (text, or one JSON object per line),
    read once or followed until the run ends; the number written. `step` may be
    `STEP#ITEM`: one forEach item's lines. Raises LogsRequestError for a step that is not a
    step name, a run no NATS holds or one of another namespace."""
    import json

    step, item = split_step(step)
    if attempt is not None and attempt < 1:
        raise LogsRequestError(f"--attempt {attempt}: attempts count from 1")
    where = await run_namespace(js, run)
    if where is None:
        raise LogsRequestError(f"no run {run!r} (RUN is a run id, as `cadenza run` and the audit print it)")
    if where != namespace:
        raise LogsRequestError(
            f"no run {run!r} in namespace {namespace} (it is in namespace {where}: -n {where})"
        )

    written = 0

    def emit(record: LogRecord) -> None:
        nonlocal written
        write(json.dumps(record.to_dict(), default=str) if output == "json" else format_record(record))
        written += 1

    from nats.js.errors import NotFoundError

    try:
        if follow:
            async for record in follow_logs(js, namespace, run, step, attempt, item=item):
                emit(record)
        else:
            for record in await read_logs(js, namespace, run, step, attempt, item=item):
                emit(record)
    except NotFoundError:  # the stream: NATS holds runs, but no engine of this version started
        raise LogsRequestError(
            f"no run logs on this NATS server: the {LOGS_STREAM} stream does not exist (an engine "
            "creates it when it starts: upgrade the engines)"
        ) from None
    return written


async def run_namespace(js: Any, run: str) -> str | None:
    """The namespace of a run the runs bucket holds, or None when it holds no such run."""
    from nats.js.errors import BucketNotFoundError, InvalidKeyError, KeyNotFoundError

    try:
        kv = await js.key_value(RUNS_BUCKET)
        entry = await kv.get(run)
    except (BucketNotFoundError, KeyNotFoundError, InvalidKeyError):  # no engine ran here, no run
        return None
    if not entry.value:
        return None
    return str(loads(entry.value).get("namespace") or "default")


def format_record(record: LogRecord) -> str:
    """`TIME STEP[#ITEM] attempt N LEVEL message key=value ...`, one line (newlines in the
    message or values escaped), plain text: the caller prints it without markup."""
    from datetime import UTC, datetime

    when = datetime.fromtimestamp(record.time, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    where = record.step if record.item is None else f"{record.step}#{record.item}"
    pairs = " ".join(f"{key}={_show(value)}" for key, value in record.fields.items())
    line = f"{when} {where} attempt {record.attempt} {record.level.upper()} {_one_line(record.event)}"
    return f"{line} {pairs}" if pairs else line


def _show(value: Any) -> str:
    import json

    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return _one_line(text)


def _one_line(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")


__all__ = [
    "LogRecord",
    "LogsRequestError",
    "follow_logs",
    "format_record",
    "log_filter",
    "read_logs",
    "run_ended",
    "run_namespace",
    "show_logs",
    "split_step",
]
