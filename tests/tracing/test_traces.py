"""Traces of a run as a tracing backend receives them: a real nats-server, a `cadenza
engine` process and an agent process exporting by OTLP/HTTP to a receiver written here
(otlp_receiver.py), which decodes what it gets. The workflow: a step whose handler makes
a span of its own and a model call (a real OpenAI-compatible server), a step that fails
once and is retried, and a child workflow whose step the engine is killed during (a new
engine carries the run on). The spans must form one tree, with the same ids wherever a
span was made twice."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections import defaultdict
from pathlib import Path

import nats
from cadenza_operator.engine.definition import compile_workflow
from cadenza_operator.engine.infra import ensure_agent_consumer
from cadenza_operator.engine.runtime import Engine
from cadenza_operator.local.nats_server import NatsServer
from cadenza_operator.models import WorkflowSpec

from ..integration.chat_server import INPUT_TOKENS, OUTPUT_TOKENS, ChatServer
from ..integration.harness import poll, start_engine, unique_namespace
from .otlp_receiver import STATUS_ERROR, OtlpReceiver, Span

AGENT_CODE = """
import asyncio
import os
import pathlib

from cadenza import Agent
from opentelemetry import trace

agent = Agent("worker")


@agent.handler
async def handle(task):
    if task.step == "talk":
        with trace.get_tracer("test-agent").start_as_current_span("own work"):
            reply = await task.model("fast").chat([{"role": "user", "content": "hi"}])
        return {"text": reply.text}
    if task.step == "flaky" and task.attempt == 1:
        raise RuntimeError("the first attempt fails")
    if task.step == "slow":
        pathlib.Path(os.environ["TEST_MARKER"]).write_text("started")
        while not pathlib.Path(os.environ["TEST_GO"]).exists():
            await asyncio.sleep(0.05)
    return {"step": task.step}


agent.run()
"""

PARENT = {
    "steps": [
        {"name": "talk", "agent": "worker"},
        {
            "name": "flaky",
            "agent": "worker",
            "dependsOn": ["talk"],
            "retry": {"limit": 1, "backoff": {"initial": "10ms"}},
        },
        {"name": "child", "dependsOn": ["flaky"], "workflow": "child"},
    ]
}
CHILD = {"steps": [{"name": "slow", "agent": "worker"}]}

OTEL = {"OTEL_BSP_SCHEDULE_DELAY": "50", "OTEL_EXPORTER_OTLP_TIMEOUT": "5"}


def start_agent(folder: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """The agent process (agents.py in `folder`); its output in folder/agent.log."""
    with open(folder / "agent.log", "ab") as log:
        return subprocess.Popen(
            [sys.executable, "agents.py"],
            cwd=folder,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )


def by_id(spans: list[Span]) -> dict[str, Span]:
    """Each span once; one made twice (an outbox carried out again) must be the same."""
    seen: dict[str, Span] = {}
    for span in spans:
        if span.span_id in seen:
            assert seen[span.span_id].key() == span.key(), (seen[span.span_id], span)
        seen[span.span_id] = span
    return seen


def one(spans: dict[str, Span], name: str, **attrs: object) -> Span:
    found = [
        s
        for s in spans.values()
        if s.name == name and all(s.attributes.get(k) == v for k, v in attrs.items())
    ]
    assert len(found) == 1, (name, attrs, found)
    return found[0]


def inside(child: Span, parent: Span) -> None:
    assert parent.start <= child.start <= child.end <= parent.end, (child, parent)


async def test_a_run_its_retry_its_child_run_and_the_agent_work_form_one_trace(
    fresh_nats: NatsServer, tmp_path: Path
) -> None:
    namespace = unique_namespace()
    marker, go = tmp_path / "started", tmp_path / "go"
    (tmp_path / "agents.py").write_text(textwrap.dedent(AGENT_CODE))
    async with OtlpReceiver() as receiver, ChatServer() as chat:
        otel = {**OTEL, "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url}
        nc = await nats.connect(fresh_nats.url)
        engine = start_engine(fresh_nats.url, "engine-0", tmp_path, **otel)
        agent_env = {
            **os.environ,
            **otel,
            "CADENZA_NATS_URL": fresh_nats.url,
            "CADENZA_NAMESPACE": namespace,
            "CADENZA_MODELS": json.dumps({"fast": {"baseURL": chat.url, "model": "tiny"}}),
            "TEST_MARKER": str(marker),
            "TEST_GO": str(go),
        }
        agent = start_agent(tmp_path, agent_env)
        try:
            side = Engine(nc)  # a client only: this process exports nothing
            await side.open()
            assert side.tracer is None
            await ensure_agent_consumer(nc.jetstream(), namespace, "worker")
            parent_wf = compile_workflow("parent", WorkflowSpec.model_validate(PARENT), namespace)
            child_wf = compile_workflow("child", WorkflowSpec.model_validate(CHILD), namespace)
            await side.client.publish_definition(child_wf)
            await side.client.publish_definition(parent_wf)
            run = await side.client.start(parent_wf, {})

            # The engine dies while the child run's step works; another takes over.
            await poll(lambda: asyncio.sleep(0, marker.exists()), timeout=60)
            # What it made so far has reached the receiver (a kill loses a batch not sent).
            await poll(
                lambda: asyncio.sleep(0, any(s.name == "step flaky" for s in receiver.spans)), timeout=30
            )
            engine.send_signal(signal.SIGKILL)
            engine.wait(30)
            engine = start_engine(fresh_nats.url, "engine-1", tmp_path, **otel)
            go.write_text("go")

            async def finished() -> str | None:
                state = await side.client.get(run)
                return state.phase if state is not None and state.terminal else None

            assert await poll(finished, timeout=90) == "Succeeded"
            await poll(
                lambda: asyncio.sleep(0, any(s.name == "run parent" for s in receiver.spans)), timeout=30
            )
            agent.send_signal(signal.SIGTERM)  # flushes its spans
            assert agent.wait(30) == 0
            child_run = (await side.client.get(run)).steps["child"].child  # type: ignore[union-attr]
        finally:
            for proc in (engine, agent):
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(30)
            await nc.close()

        spans = by_id(receiver.spans)

    # One trace: the parent run, its child run, the agent's spans.
    assert {s.trace_id for s in spans.values()} == {one(spans, "run parent").trace_id}
    root = one(spans, "run parent")
    assert root.parent_id == "" and root.attributes["cadenza.run"] == run
    assert root.attributes["outcome"] == "Succeeded" and root.service == "cadenza-engine"
    assert root.attributes["cadenza.usage.input_tokens"] == INPUT_TOKENS

    steps = {name: one(spans, f"step {name}", **{"cadenza.run": run}) for name in ("talk", "flaky", "child")}
    for step in steps.values():
        assert step.parent_id == root.span_id
        inside(step, root)

    attempts: dict[tuple[str, str, int], Span] = {}
    for s in spans.values():
        if s.name.startswith("attempt "):
            attempts[
                (s.attributes["cadenza.run"], s.attributes["cadenza.step"], s.attributes["cadenza.attempt"])
            ] = s
    # The retried step: two attempts, the first failed (ERROR), the second not.
    first, second = attempts[(run, "flaky", 1)], attempts[(run, "flaky", 2)]
    assert first.status == STATUS_ERROR and "the first attempt fails" in first.status_message
    assert first.attributes["outcome"] == "Failed" and first.attributes["error.type"] == "RuntimeError"
    assert second.status != STATUS_ERROR and second.attributes["outcome"] == "Succeeded"
    assert first.end <= second.start
    assert {(r, st) for r, st, _ in attempts} == {
        (run, "talk"),
        (run, "flaky"),
        (run, "child"),
        (child_run, "slow"),
    }
    assert len(attempts) == 5

    children: dict[str, list[Span]] = defaultdict(list)
    for s in spans.values():
        children[s.parent_id].append(s)
    for (r, step_name, n), attempt in attempts.items():
        step = one(spans, f"step {step_name}", **{"cadenza.run": r})
        assert attempt.parent_id == step.span_id
        inside(attempt, step)
        # Waiting, then executing, inside the attempt.
        kinds = {
            c.name: c
            for c in children[attempt.span_id]
            if c.service == "cadenza-engine" and c.name != "run child"
        }
        assert set(kinds) == {"waiting", "executing"}, (step_name, n, kinds)
        inside(kinds["waiting"], attempt)
        inside(kinds["executing"], attempt)
        assert kinds["waiting"].end <= kinds["executing"].start
        assert [name for name, _ in kinds["waiting"].events] == ["queued"]

    # The child run: in the same trace, under the attempt of the step that started it.
    child = one(spans, "run child")
    assert child.attributes["cadenza.run"] == child_run
    assert child.parent_id == attempts[(run, "child", 1)].span_id
    slow = one(spans, "step slow")
    assert slow.parent_id == child.span_id

    # The agent's work: each handler under its attempt, the handler's own span and the
    # model call under the handler.
    handlers = [s for s in spans.values() if s.name.startswith("handler ")]
    assert {s.service for s in handlers} == {"worker"}
    assert len(handlers) == 4  # talk, flaky twice, slow
    for h in handlers:
        key = (h.attributes["cadenza.run"], h.attributes["cadenza.step"], h.attributes["cadenza.attempt"])
        assert h.parent_id == attempts[key].span_id, h
    failed_handler = one(spans, "handler flaky", **{"cadenza.attempt": 1})
    assert failed_handler.status == STATUS_ERROR
    talk_handler = one(spans, "handler talk")
    own = one(spans, "own work")
    assert own.parent_id == talk_handler.span_id
    model = one(spans, "chat tiny")
    assert model.parent_id == own.span_id
    assert model.attributes["gen_ai.request.model"] == "tiny"
    assert model.attributes["gen_ai.usage.input_tokens"] == INPUT_TOKENS
    assert model.attributes["gen_ai.usage.output_tokens"] == OUTPUT_TOKENS
    assert model.attributes["outcome"] == "Succeeded"
    inside(model, talk_handler)
