"""cadenza._runlog without a server: what a record holds and how it is cut, that a
handler which does not log costs no logger and no publish, lines from a sync handler's
thread keep their order, and the subject of a run id with dots is still one token each."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from cadenza import Task
from cadenza._runlog import MAX_RECORD_BYTES, AttemptLog, attempt_log
from cadenza.wire import log_subject


class Sent:
    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.subjects: set[str] = set()

    async def __call__(self, subject: str, data: bytes) -> None:
        self.subjects.add(subject)
        self.records.append(json.loads(data))


def task_with_log(sent: Sent, loop: asyncio.AbstractEventLoop, **kw: Any) -> Task:
    task = Task(input=None, run_id=kw.pop("run", "wf-1"), step="work", agent="a", namespace="ns", **kw)
    task._runlog = attempt_log(sent, "ns", "a", "host:1", task, loop)
    return task


async def test_a_record_holds_the_line_its_values_and_the_attempt() -> None:
    sent = Sent()
    task = task_with_log(sent, asyncio.get_running_loop(), attempt=2, item=3)
    task.log.bind(user="u").warning("hello", count=2, when=object(), nested={"a": [1]})
    assert task._runlog is not None and await task._runlog.close() == 0
    (record,) = sent.records
    assert record["event"] == "hello" and record["level"] == "warning" and record["n"] == 1
    assert (record["run"], record["step"], record["item"], record["attempt"]) == ("wf-1", "work", 3, 2)
    assert (record["agent"], record["worker"]) == ("a", "host:1")
    assert record["fields"]["user"] == "u" and record["fields"]["count"] == 2
    assert record["fields"]["nested"] == {"a": [1]} and isinstance(record["fields"]["when"], str)
    assert sent.subjects == {"cadenza.log.ns.a.wf-1.work.3.2"}


async def test_an_exception_logged_carries_its_traceback() -> None:
    sent = Sent()
    task = task_with_log(sent, asyncio.get_running_loop())
    try:
        raise ValueError("bad input 42")
    except ValueError:
        task.log.exception("handler raised")
    assert task._runlog is not None and await task._runlog.close() == 0
    (record,) = sent.records
    assert record["level"] == "error" and "exc_info" not in record["fields"]
    assert "Traceback" in record["fields"]["exception"] and "bad input 42" in record["fields"]["exception"]


async def test_long_lines_and_values_are_cut_to_the_record_limit() -> None:
    sent = Sent()
    log = AttemptLog(sent, "s", {}, asyncio.get_running_loop())
    cases = [
        {"event": "x" * (1 << 20), "blob": "y" * (1 << 20), "small": 1},
        {"event": "é" * 9000, "a": "\x00" * 9000, "b": "ü" * 9000},
        {"event": "e", **{f"k{i}": "v" * 3000 for i in range(10)}},
    ]
    for case in cases:
        data = log._record(1, "info", dict(case))
        assert len(data) <= MAX_RECORD_BYTES
        record = json.loads(data)
        assert record["event"] == case["event"] or "…[truncated" in record["event"]
    first = json.loads(log._record(1, "info", dict(cases[0])))
    assert "…[truncated" in first["fields"]["blob"] and first["fields"]["small"] == 1
    last = json.loads(log._record(1, "info", dict(cases[2])))
    assert "values left out" in last["fields"]["truncated"]


async def test_a_handler_that_does_not_log_costs_no_logger_and_no_publish() -> None:
    sent = Sent()
    task = task_with_log(sent, asyncio.get_running_loop())
    assert task._runlog is not None and not task._runlog.used
    assert task.log._bound is None  # the logger is bound on first use only
    assert await task._runlog.close() == 0 and sent.records == []


async def test_lines_from_a_sync_handlers_thread_keep_their_order() -> None:
    sent = Sent()
    task = task_with_log(sent, asyncio.get_running_loop())

    def handler() -> None:
        for i in range(200):
            task.log.info("line", i=i)

    await asyncio.to_thread(handler)
    assert task._runlog is not None and await task._runlog.close() == 0
    assert [r["fields"]["i"] for r in sent.records] == list(range(200))


def test_run_ids_with_dots_are_one_token_and_bad_names_send_nothing() -> None:
    assert log_subject("ns", "a", "wf.v2-1", "s", None, 1) == "cadenza.log.ns.a.wf~v2-1.s.-.1"
    loop = asyncio.new_event_loop()
    try:
        for run, step in (("r 1", "s"), ("r.*", "s"), ("r", "s.>")):
            task = Task(input=None, run_id=run, step=step)
            assert attempt_log(Sent(), "ns", "a", "w", task, loop) is None
        assert attempt_log(Sent(), "ns", "a", "w", Task(input=None, run_id="r", step="s"), loop, 0) is None
    finally:
        loop.close()
