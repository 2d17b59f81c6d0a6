"""The engine's side of shared-context writes: a `context` event an agent sends after each
write becomes one audit record (key, step, item, attempt, revision; never the value) and
changes nothing else."""

from __future__ import annotations

from typing import Any

from .helpers import Driver, agent_step, compile_spec


def running(*steps: dict[str, Any]) -> Driver:
    d = Driver(compile_spec({"steps": list(steps)}))
    d.start()
    return d


def context_event(step: str, key: str = "counter", revision: int = 7, **extra: Any) -> dict[str, Any]:
    return {
        "type": "context",
        "step": step,
        "attempt": 1,
        "key": key,
        "revision": revision,
        "worker": "w1",
        **extra,
    }


def test_a_context_write_is_one_audit_record_and_changes_nothing_else() -> None:
    d = running(agent_step("a"), agent_step("b", dependsOn=["a"]))
    before = d.state.model_copy(deep=True)
    decision = d.send(context_event("a", scope="r1"))
    assert decision.commands == [] and decision.stores == {}
    [record] = decision.audit
    assert {k: record[k] for k in ("step", "event", "key", "revision", "attempt", "actor", "from", "to")} == {
        "step": "a",
        "event": "context",
        "key": "counter",
        "revision": 7,
        "attempt": 1,
        "actor": "w1",
        "from": None,
        "to": None,
    }
    assert "value" not in record and "item" not in record and "scope" not in record  # its own scope
    assert d.phases() == {"a": "Running", "b": "Pending"}
    after = d.state.model_copy(update={"auditSeq": before.auditSeq})
    assert after == before  # only the audit sequence moved


def test_an_item_and_a_parent_scope_are_recorded() -> None:
    d = running(agent_step("fan", forEach="[1, 2, 3]", maxParallel=3))
    [record] = d.send(context_event("fan", item=2, revision=3, scope="root-run")).audit
    assert (record["item"], record["revision"], record["scope"]) == (2, 3, "root-run")


def test_a_write_by_an_attempt_no_longer_current_is_still_recorded() -> None:
    d = running(agent_step("a"), agent_step("b", dependsOn=["a"]))
    d.succeed("a")  # the engine is done with attempt 1 of a; its late write still happened
    [record] = d.send(context_event("a")).audit
    assert (record["step"], record["attempt"]) == ("a", 1)


def test_a_duplicate_records_the_same_write_again_and_nothing_more() -> None:
    d = running(agent_step("a"))
    first = d.send(context_event("a"))
    again = d.replay(d.applied[-1])
    assert again.commands == []
    assert [(r["key"], r["revision"]) for r in first.audit + again.audit] == [("counter", 7)] * 2
    assert d.phases() == {"a": "Running"}


def test_context_events_for_a_finished_run_or_an_unknown_step_are_ignored() -> None:
    d = running(agent_step("a"))
    assert d.send(context_event("a")).changed  # the same event, well formed, is recorded
    assert not d.send(context_event("nope")).changed
    for bad in (
        {"revision": "7"},
        {"revision": True},
        {"revision": 0},
        {"key": "a.b"},
        {"key": ""},
        {"attempt": None},
        {"item": -1},
        {"key": "k" * 257},
    ):
        assert not d.send({**context_event("a"), **bad}).changed, bad
    d.succeed("a")
    assert d.phase == "Succeeded"
    assert not d.send(context_event("a")).changed


def test_the_engine_accepts_context_events() -> None:
    from cadenza_operator.engine.runtime import parse_event

    event = parse_event(b'{"type": "context", "run": "r1", "step": "a", "key": "k", "revision": 1}')
    assert event.type == "context"


# ------------------------------------------------------ the SDK's in-memory context


def test_the_in_memory_context_updates_lists_and_serves_sync_handlers() -> None:
    import asyncio

    from cadenza import Agent
    from cadenza.testing import MemoryContext, run_handler

    counter = Agent("counter")

    @counter.handler
    async def count(task: Any) -> Any:
        results = await asyncio.gather(
            *(task.context.update("n", lambda n: n + 1, default=0) for _ in range(20))
        )
        return {"results": sorted(results), "keys": await task.context.keys()}

    context = MemoryContext({"other": 1})
    assert run_handler(counter, {}, context=context) == {
        "results": list(range(1, 21)),
        "keys": ["n", "other"],
    }

    syncer = Agent("syncer")

    @syncer.handler
    def sync_count(task: Any) -> Any:
        return [
            task.context.update_sync("seen", lambda v: [*v, task.input], default=[]),
            task.context.keys_sync(),
        ]

    assert run_handler(syncer, "a", context=context) == [["a"], ["n", "other", "seen"]]
    assert context.data["seen"] == ["a"] and context.data["n"] == 20
