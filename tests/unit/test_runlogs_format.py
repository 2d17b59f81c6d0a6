"""observe/runlogs.py without a server: a record's text line, its subject parsed back,
and the filter a read uses (the run one token, as the agent wrote it)."""

from __future__ import annotations

import json

import pytest
from cadenza.wire import log_subject
from cadenza_operator.observe.runlogs import (
    LogRecord,
    LogsRequestError,
    format_record,
    log_filter,
    parse_record,
    split_step,
)


def test_a_line_names_the_item_and_attempt_and_stays_one_line() -> None:
    record = LogRecord(
        time=0.5,
        level="warning",
        event="two\nlines [red]x[/red]",
        run="r",
        step="each",
        item=3,
        attempt=2,
        agent="a",
        fields={"k": "v w", "n": {"a": 1}},
    )
    line = format_record(record)
    assert line == (
        '1970-01-01T00:00:00.500Z each#3 attempt 2 WARNING two\\nlines [red]x[/red] k=v w n={"a": 1}'
    )
    assert record.to_dict()["item"] == 3 and json.dumps(record.to_dict())


def test_a_subject_is_parsed_back_and_the_filter_matches_it() -> None:
    subject = log_subject("ns", "a", "wf.v2-1", "each", 3, 2)
    body = json.dumps({"time": 1.0, "level": "info", "event": "e", "worker": "h:1", "fields": {"x": 1}})
    record = parse_record(subject, body.encode(), 7, "wf.v2-1")
    assert record is not None
    where = (record.run, record.step, record.item, record.attempt, record.agent)
    assert where == ("wf.v2-1", "each", 3, 2, "a")
    assert (record.worker, record.fields, record.seq) == ("h:1", {"x": 1}, 7)
    pattern = log_filter("ns", "wf.v2-1", "each", 2).split(".")
    assert len(pattern) == len(subject.split("."))
    assert all(p in ("*", s) for p, s in zip(pattern, subject.split("."), strict=True))
    assert parse_record("cadenza.log.ns.a.r", b"{}", 1, "r") is None
    assert parse_record(subject, b"not json", 1, "r") is None


def test_step_hash_item_names_one_forEach_item_and_its_filter_matches_only_it() -> None:
    assert split_step("each#3") == ("each", 3) and split_step("each") == ("each", None)
    assert split_step(None) == (None, None)
    for bad in ("each#", "each#x", "each#-1", "#3", "a b#1"):
        with pytest.raises(LogsRequestError, match="STEP#ITEM"):
            split_step(bad)
    pattern = log_filter("ns", "r", "each", None, 3).split(".")

    def matches(subject: str) -> bool:
        return all(p in ("*", s) for p, s in zip(pattern, subject.split("."), strict=True))

    assert matches(log_subject("ns", "a", "r", "each", 3, 2))
    assert not matches(log_subject("ns", "a", "r", "each", 13, 1))
    assert not matches(log_subject("ns", "a", "r", "each", None, 1))
