"""`cadenza retry` on a real nats-server: a new run of the same definition and input that
takes the outputs of the steps the retried run finished well and runs the others again.

Agents count the tasks they are given, so a step taken as it was (a forEach of 1,000
items among them) is seen not to run again, not only to look Succeeded."""

from __future__ import annotations

import collections
from typing import Any

import pytest
from cadenza import Agent, FatalError
from cadenza_operator.engine.client import RetryRefused, RunClient
from cadenza_operator.engine.control import ControlResponder
from cadenza_operator.engine.definition import compile_workflow
from cadenza_operator.engine.state import RunState
from cadenza_operator.local.nats_server import NatsServer
from cadenza_operator.models import WorkflowSpec

from .harness import running_engine, serving, unique_namespace
from .test_poison_and_timers import phases


def _worker(calls: collections.Counter[str], failing: set[str]) -> Agent:
    agent = Agent("worker", concurrency=64)

    @agent.handler
    async def handle(task: Any) -> dict[str, Any]:
        calls[task.step] += 1
        if task.step in failing:
            raise FatalError(f"{task.step} fails this time")
        return {"step": task.step, **(task.input or {})}

    return agent


async def _finished(client: RunClient, run: str) -> RunState:
    state = (await phases(client, [run], timeout=120))[run]
    assert state is not None and state.terminal, state
    return state


FAN = {
    "steps": [
        {
            "name": "fan",
            "agent": "worker",
            "forEach": "input.items",
            "maxParallel": 200,
            "input": {"i": "${{ item }}"},
        },
        {
            "name": "join",
            "agent": "worker",
            "dependsOn": ["fan"],
            "input": {"n": "${{ size(steps.fan.output) }}", "last": "${{ steps.fan.output[999].i }}"},
        },
    ],
    "output": {"n": "${{ steps.join.output.n }}", "last": "${{ steps.join.output.last }}"},
}


async def test_a_retry_reuses_a_thousand_item_foreach_by_reference(nats_server: NatsServer) -> None:
    namespace = unique_namespace()
    wf = compile_workflow("fan", WorkflowSpec.model_validate(FAN), namespace)
    calls: collections.Counter[str] = collections.Counter()
    failing = {"join"}
    async with (
        running_engine(nats_server.url, namespace) as engine,
        serving(_worker(calls, failing), nats_server.url, namespace),
    ):
        client = engine.client
        first = await client.start(wf, {"items": list(range(1000))})
        failed = await _finished(client, first)
        assert failed.phase == "Failed", failed.message
        assert calls == {"fan": 1000, "join": 1}
        failing.clear()
        again = await client.retry(namespace, first, by="ada")
        state = await _finished(client, again)
        audit = await client.audit(namespace, again)
    assert state.phase == "Succeeded", state.message
    assert state.outputs == {"n": 1000, "last": 999}  # the re-run step saw all 1,000 outputs
    assert calls == {"fan": 1000, "join": 2}  # no item dispatched again
    assert state.retryOf == first
    fan = state.steps["fan"]
    assert fan.phase == "Succeeded" and fan.message == f"reused from {first}"
    assert fan.outputRef == f"{first}.fan.*"  # the retried run's items, not a copy
    assert fan.attempts == []
    reused = [r for r in audit if r.get("reusedFrom")]
    assert [(r["step"], r["to"], r["actor"]) for r in reused] == [("fan", "Succeeded", "ada")]


CHAIN = {
    "steps": [
        {"name": "a", "agent": "worker", "input": {"v": "${{ input.v }}"}},
        {"name": "b", "agent": "worker", "dependsOn": ["a"], "input": {"v": "${{ steps.a.output.v }}"}},
        {"name": "c", "agent": "worker", "dependsOn": ["b"], "input": {"v": "${{ steps.b.output.v }}"}},
        {"name": "side", "agent": "worker", "dependsOn": ["a"], "input": {"v": 0}},
    ],
    "output": {"v": "${{ steps.c.output.v }}"},
}


async def test_retry_from_a_middle_step_reruns_it_and_what_depends_on_it(nats_server: NatsServer) -> None:
    namespace = unique_namespace()
    wf = compile_workflow("chain", WorkflowSpec.model_validate(CHAIN), namespace)
    calls: collections.Counter[str] = collections.Counter()
    async with (
        running_engine(nats_server.url, namespace) as engine,
        serving(_worker(calls, set()), nats_server.url, namespace),
    ):
        client = engine.client
        first = await client.start(wf, {"v": 7})
        assert (await _finished(client, first)).phase == "Succeeded"
        second = await client.retry(namespace, first, "b", by="ada")
        state = await _finished(client, second)
        # Retrying the retry: it takes what the second run reused, named after the second.
        third = await client.retry(namespace, second, "c", by="ada")
        last = await _finished(client, third)
    assert state.phase == "Succeeded" and state.outputs == {"v": 7}
    assert {n: s.message for n, s in state.steps.items() if s.message.startswith("reused")} == {
        "a": f"reused from {first}",
        "side": f"reused from {first}",
    }
    assert last.phase == "Succeeded" and last.outputs == {"v": 7} and last.retryOf == second
    assert {n for n, s in last.steps.items() if s.message == f"reused from {second}"} == {"a", "b", "side"}
    # a and side ran once (the first run); b twice; c three times.
    assert calls == {"a": 1, "side": 1, "b": 2, "c": 3}


async def test_only_a_finished_run_of_the_namespace_with_that_step_is_retried(
    nats_server: NatsServer,
) -> None:
    namespace = unique_namespace()
    spec = {
        "steps": [
            {"name": "gate", "approval": {"approvers": ["ada"]}},
            {"name": "after", "agent": "worker", "dependsOn": ["gate"], "input": {}},
        ]
    }
    wf = compile_workflow("gated", WorkflowSpec.model_validate(spec), namespace)
    calls: collections.Counter[str] = collections.Counter()
    async with (
        running_engine(nats_server.url, namespace) as engine,
        serving(_worker(calls, set()), nats_server.url, namespace),
    ):
        client = engine.client
        run = await client.start(wf, {})
        responder = ControlResponder(engine)

        async def waiting() -> bool:
            state = await client.get(run)
            return state is not None and state.steps.get("gate") is not None and state.phase == "Running"

        from .harness import poll

        await poll(waiting)
        with pytest.raises(RetryRefused, match=f"run {run} is Running: only a finished run"):
            await client.retry(namespace, run, by="ada")
        reply = await responder.answer({"op": "retry", "run": run, "namespace": namespace})
        assert not reply["ok"] and "only a finished run" in reply["error"]
        reply = await responder.answer({"op": "retry", "run": run, "namespace": "elsewhere"})
        assert reply == {"ok": False, "error": f"no run {run} in namespace elsewhere", "phase": None}
        with pytest.raises(RetryRefused, match=f"no run {run} in namespace elsewhere"):
            await client.retry("elsewhere", run, by="ada")
        await client.cancel(namespace, run, by="ada")
        assert (await _finished(client, run)).phase == "Cancelled"
        reply = await responder.answer({"op": "retry", "run": run, "namespace": namespace, "from": "nope"})
        assert reply["ok"] is False
        assert reply["error"] == "--from nope: workflow gated has no such step (steps: gate, after)"
        assert [s.run for s in await client.list(namespace)] == [run]  # nothing was started
        # what an engine lists is the namespace the request came on, no other's
        listed = await responder.answer({"op": "list", "namespace": namespace, "limit": 10})
        assert [(r["run"], r["phase"]) for r in listed["runs"]] == [(run, "Cancelled")]
        assert (await responder.answer({"op": "list", "namespace": "elsewhere"}))["runs"] == []
        listed = await responder.answer({"op": "list", "namespace": namespace, "phase": "Failed"})
        assert listed["runs"] == []


async def test_a_retry_asked_twice_of_two_engines_starts_one_run(nats_server: NatsServer) -> None:
    namespace = unique_namespace()
    wf = compile_workflow("chain", WorkflowSpec.model_validate(CHAIN), namespace)
    calls: collections.Counter[str] = collections.Counter()
    failing = {"c"}
    async with (
        running_engine(nats_server.url, namespace) as one,
        running_engine(nats_server.url, namespace) as two,
        serving(_worker(calls, failing), nats_server.url, namespace),
    ):
        first = await one.client.start(wf, {"v": 1})
        assert (await _finished(one.client, first)).phase == "Failed"
        failing.clear()
        request = {"op": "retry", "run": first, "namespace": namespace, "by": "ada", "key": "req-1"}
        # The same request delivered twice, each time to another engine (a client that
        # asked again after a lost reply, or a redelivery).
        replies = []
        for e in (one, two, one):
            replies.append(reply := await ControlResponder(e).answer(dict(request)))
            # Answered once the new run has a record: what the answer names can be read
            # at once (`cadenza get`, the console's redirect to its page).
            assert reply["ok"] and await e.client.get(reply["newRun"]) is not None, reply
        new = {r["newRun"] for r in replies}
        assert len(new) == 1
        (again,) = new
        state = await _finished(two.client, again)
        runs = await one.client.list(namespace)
    assert state.phase == "Succeeded" and state.outputs == {"v": 1}
    assert sorted(s.run for s in runs) == sorted([first, again])
    assert calls == {"a": 1, "b": 1, "side": 1, "c": 2}  # c once per run, not per request


async def test_a_retry_of_large_values_keeps_its_start_event_small(nats_server: NatsServer) -> None:
    """A large input is passed on as the retried run kept it; reused outputs that would make
    the start event too large (ten of 30 KB each) go to the outputs bucket, by reference."""
    namespace = unique_namespace()
    steps: list[dict[str, Any]] = [
        {"name": "s0", "agent": "worker", "input": {"v": "${{ size(input.big) }}"}}
    ]
    for i in range(1, 10):
        steps.append(
            {
                "name": f"s{i}",
                "agent": "worker",
                "dependsOn": [f"s{i - 1}"],
                "input": {"v": f"${{{{ steps.s{i - 1}.output.v }}}}"},
            }
        )
    steps.append(
        {"name": "last", "agent": "worker", "dependsOn": ["s9"], "input": {"v": "${{ steps.s9.output.v }}"}}
    )
    wf = compile_workflow(
        "big",
        WorkflowSpec.model_validate({"steps": steps, "output": {"v": "${{ steps.last.output.v }}"}}),
        namespace,
    )
    calls: collections.Counter[str] = collections.Counter()
    failing = {"last"}
    agent = Agent("worker", concurrency=8)

    @agent.handler
    async def handle(task: Any) -> dict[str, Any]:
        calls[task.step] += 1
        if task.step in failing:
            raise FatalError("not yet")
        return {"v": task.input["v"], "pad": "y" * 30_000}

    async with (
        running_engine(nats_server.url, namespace) as engine,
        serving(agent, nats_server.url, namespace),
    ):
        client = engine.client
        first = await client.start(wf, {"big": "z" * 40_000})
        old = await _finished(client, first)
        assert old.phase == "Failed" and old.inputRef is not None
        failing.clear()
        again = await client.retry(namespace, first, by="ada")
        state = await _finished(client, again)
    assert state.phase == "Succeeded", state.message
    assert state.outputs == {"v": 40_000}
    apart = [n for n, s in state.steps.items() if s.outputRef == f"{again}.{n}"]
    assert apart and len(apart) < 10, apart  # past 256 KB of inline outputs only
    assert {n: calls[n] for n in ("s0", "s9", "last")} == {"s0": 1, "s9": 1, "last": 2}
