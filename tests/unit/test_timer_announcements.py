"""Timer announcements arrive from several engines in any order; the sweeper reads
committed records. Both are checked here without a server: what an engine schedules
after any interleaving of announcements, and which timers a sweep finds overdue."""

from __future__ import annotations

import asyncio
from typing import Any

from cadenza._protocol import dumps
from cadenza_operator.engine.runtime import Engine, _overdue_timers
from hypothesis import given, settings
from hypothesis import strategies as st


class _NoNats:
    def jetstream(self) -> None:
        return None


def _engine() -> Engine:
    return Engine(_NoNats())


# Each record revision arms a set of timers (id -> due time) for one run.
revisions = st.lists(
    st.dictionaries(
        st.sampled_from(["retry:b:2", "timeout:a:1", "approval:gate", "deadline"]), st.floats(1e9, 2e9)
    ),
    min_size=1,
    max_size=8,
)


@settings(max_examples=200, deadline=None)
@given(revisions, st.randoms(use_true_random=False))
def test_any_order_of_announcements_schedules_the_newest_revision(
    armed_by_revision: list[dict[str, float]], rng: Any
) -> None:
    """Engine A announces revision 5 after engine B announced revision 6: whatever order
    they arrive in, an engine ends with exactly the timers of the newest revision."""

    async def scenario() -> dict[str, float]:
        engine = _engine()
        announcements = list(enumerate(armed_by_revision, start=1))
        rng.shuffle(announcements)
        for revision, armed in announcements:
            engine._schedule("run-1", "default", armed, revision)
        scheduled = {tid: at for (run, tid), (handle, at) in engine._timers.items() if run == "run-1"}
        for handle, _ in engine._timers.values():
            handle.cancel()
        return scheduled

    assert asyncio.run(scenario()) == armed_by_revision[-1]


def test_overdue_timers_are_read_from_committed_records() -> None:
    record = {
        "run": "r",
        "namespace": "team-a",
        "phase": "Running",
        "timers": {
            "retry:b:2": {"at": 100.0, "kind": "retry", "step": "b", "attempt": 2},
            "approval:gate": {"at": 500.0, "kind": "approval", "step": "gate"},
        },
    }
    assert _overdue_timers(dumps(record), before=200.0) == [("retry:b:2", 100.0, "team-a")]
    assert _overdue_timers(dumps(record), before=50.0) == []
    # A finished run's leftovers and a record without timers fire nothing.
    assert _overdue_timers(dumps({**record, "phase": "Failed"}), before=1e9) == []
    assert _overdue_timers(dumps({"run": "r", "phase": "Running"}), before=1e9) == []
    assert _overdue_timers(None, before=1e9) == []
    # The namespace left out of a record (the default) is "default".
    del record["namespace"]
    assert _overdue_timers(dumps(record), before=200.0) == [("retry:b:2", 100.0, "default")]
