"""The traces of a forEach as a tracing backend receives them: a real nats-server, `cadenza
engine` processes and an agent process exporting by OTLP/HTTP to the test receiver. Three
items; item 1 fails once and is retried; the engine is killed while item 2 works and
another one finishes the run. Each attempt of each item must be a span under the step,
and the agent's handler for it must nest under that span, including the handler whose
task the first engine sent and whose attempt span the second engine made. And an outbox
carried out again by the next engine repeats the item attempt spans, with the same ids."""

from __future__ import annotations

import asyncio
import os
import signal
import textwrap
from collections import defaultdict
from pathlib import Path

import nats
from cadenza_operator.engine import commands
from cadenza_operator.engine.audit import read_audit
from cadenza_operator.engine.definition import compile_workflow
from cadenza_operator.engine.infra import ensure_agent_consumer
from cadenza_operator.engine.runtime import Engine
from cadenza_operator.engine.state import ForEachState, RunState, StepState
from cadenza_operator.engine.tracing import Tracer, span_id
from cadenza_operator.local.nats_server import NatsServer
from cadenza_operator.models import WorkflowSpec
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from ..integration.harness import poll, start_engine, unique_namespace
from .otlp_receiver import STATUS_ERROR, OtlpReceiver, Span
from .test_traces import OTEL, by_id, inside, one, start_agent

AGENT_CODE = """
import asyncio
import os
import pathlib

from cadenza import Agent

agent = Agent("worker")


@agent.handler
async def handle(task):
    if task.item == 1 and task.attempt == 1:
        raise RuntimeError("item 1 fails once")
    if task.item == 2:
        pathlib.Path(os.environ["TEST_MARKER"]).write_text("started")
        while not pathlib.Path(os.environ["TEST_GO"]).exists():
            await asyncio.sleep(0.05)
    return {"item": task.item}


agent.run()
"""

FAN = {
    "steps": [
        {
            "name": "each",
            "agent": "worker",
            "forEach": "input.xs",
            "maxParallel": 3,
            "input": {"x": "${{ item }}"},
            "retry": {"limit": 1, "backoff": {"initial": "10ms"}},
        }
    ]
}


async def test_each_item_attempt_is_a_span_and_its_handler_nests_under_it_across_engines(
    fresh_nats: NatsServer, tmp_path: Path
) -> None:
    namespace = unique_namespace()
    marker, go = tmp_path / "started", tmp_path / "go"
    (tmp_path / "agents.py").write_text(textwrap.dedent(AGENT_CODE))
    async with OtlpReceiver() as receiver:
        otel = {**OTEL, "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url}
        nc = await nats.connect(fresh_nats.url)
        engine = start_engine(fresh_nats.url, "engine-0", tmp_path, **otel)
        agent_env = {
            **os.environ,
            **otel,
            "CADENZA_NATS_URL": fresh_nats.url,
            "CADENZA_NAMESPACE": namespace,
            "CADENZA_CONCURRENCY": "4",  # item 2 waits while the others run
            "TEST_MARKER": str(marker),
            "TEST_GO": str(go),
        }
        agent = start_agent(tmp_path, agent_env)

        def received(*names: str) -> bool:
            got = {s.name for s in receiver.spans}
            return all(name in got for name in names)

        try:
            side = Engine(nc)  # a client only: this process exports nothing
            await side.open()
            await ensure_agent_consumer(nc.jetstream(), namespace, "worker")
            wf = compile_workflow("fan", WorkflowSpec.model_validate(FAN), namespace)
            await side.client.publish_definition(wf)
            run = await side.client.start(wf, {"xs": ["a", "b", "c"]})

            # Items 0 and 1 (retried) are done and their spans sent; item 2 works. The
            # engine dies; another one takes the run over and ends item 2.
            await poll(lambda: asyncio.sleep(0, marker.exists()), timeout=60)
            await poll(
                lambda: asyncio.sleep(0, received("attempt each#0 #1", "attempt each#1 #2")), timeout=60
            )
            engine.send_signal(signal.SIGKILL)
            engine.wait(30)
            engine = start_engine(fresh_nats.url, "engine-1", tmp_path, **otel)
            go.write_text("go")

            async def finished() -> str | None:
                state = await side.client.get(run)
                return state.phase if state is not None and state.terminal else None

            assert await poll(finished, timeout=90) == "Succeeded"
            await poll(lambda: asyncio.sleep(0, received("run fan")), timeout=30)
            agent.send_signal(signal.SIGTERM)  # flushes its spans
            assert agent.wait(30) == 0
        finally:
            for proc in (engine, agent):
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(30)
            await nc.close()

        spans = by_id(receiver.spans)

    step = one(spans, "step each", **{"cadenza.run": run})
    assert step.parent_id == one(spans, "run fan").span_id
    assert step.attributes["cadenza.foreach.succeeded"] == 3

    attempts: dict[tuple[int, int], Span] = {}
    for s in spans.values():
        if s.name.startswith("attempt "):
            key = (s.attributes["cadenza.item"], s.attributes["cadenza.attempt"])
            assert s.name == f"attempt each#{key[0]} #{key[1]}"
            attempts[key] = s
    assert sorted(attempts) == [(0, 1), (1, 1), (1, 2), (2, 1)]
    failed = attempts[(1, 1)]
    assert failed.status == STATUS_ERROR and "item 1 fails once" in failed.status_message
    assert failed.attributes["outcome"] == "Failed" and failed.attributes["error.type"] == "RuntimeError"
    assert attempts[(1, 2)].status != STATUS_ERROR and failed.end <= attempts[(1, 2)].start

    children: dict[str, list[Span]] = defaultdict(list)
    for s in spans.values():
        children[s.parent_id].append(s)
    for (item, n), attempt in attempts.items():
        assert attempt.parent_id == step.span_id and attempt.attributes["outcome"] in ("Succeeded", "Failed")
        inside(attempt, step)
        engine_kids = {c.name: c for c in children[attempt.span_id] if c.service == "cadenza-engine"}
        assert set(engine_kids) == {"waiting", "executing"}, (item, n, engine_kids)
        for kid in engine_kids.values():
            inside(kid, attempt)
            assert kid.attributes["cadenza.item"] == item
        assert engine_kids["waiting"].end <= engine_kids["executing"].start
        # The agent's handler of this item's attempt, under it (item 2's task was sent by
        # the killed engine, its attempt span made by the one that took over).
        (handler,) = [c for c in children[attempt.span_id] if c.service == "worker"]
        assert handler.name == "handler each"
        assert (handler.attributes["cadenza.item"], handler.attributes["cadenza.attempt"]) == (item, n)
    assert len([s for s in spans.values() if s.name == "handler each"]) == 4


async def test_an_outbox_carried_out_again_makes_the_item_attempt_again_and_publishes_none(
    nats_server: NatsServer,
) -> None:
    """The engine that committed a decision dies before it made its spans: the next engine,
    carrying out the stored outbox, makes the item attempt's span with the same ids. The
    item attempts are for spans only: the audit trail gets the records alone."""
    namespace = unique_namespace()
    state = RunState(
        run="r1",
        namespace=namespace,
        workflow="fan",
        definition="fan",
        createdAt=0.0,
        steps={"each": StepState(phase="Running", startedAt=1.0, forEach=ForEachState(total=3, next=3))},
    )
    record = {"seq": 1, "run": "r1", "step": "each", "from": "Running", "to": "Running", "at": 3.0}
    record |= {"item": 1, "attempt": 1, "retry": True}
    ended = {"step": "each", "item": 1, "n": 1, "readyAt": 1.0, "queuedAt": 1.0, "startedAt": 2.0}
    ended |= {"finishedAt": 3.0, "outcome": "Failed", "error": {"type": "RuntimeError", "message": "boom"}}
    stored = commands.from_wire(commands.Audit([record], [ended]).wire())  # as the record keeps it
    assert stored is not None
    nc = await nats.connect(nats_server.url)
    made: list[list[tuple[str, int, int | None]]] = []
    try:
        for carry_out in (
            lambda e: e._execute(state, [], [record], 4.0, [ended]),  # the committing engine
            lambda e: e._execute(state, [stored]),  # the next one, from the stored outbox
        ):
            exporter = InMemorySpanExporter()
            engine = Engine(nc)
            await engine.open()
            engine.tracer = Tracer(SimpleSpanProcessor(exporter), Resource.create({}))
            await carry_out(engine)
            made.append(
                sorted(
                    (s.name, s.context.span_id, s.parent.span_id if s.parent else None)
                    for s in exporter.get_finished_spans()
                )
            )
        records = await read_audit(nc.jetstream(), namespace, "r1")
    finally:
        await nc.close()
    attempt = span_id("r1", "attempt", "each", 1, 1)
    assert made[0] == made[1]
    assert ("attempt each#1 #1", attempt, span_id("r1", "step", "each")) in made[0]
    assert {(name, parent) for name, _, parent in made[0]} >= {("waiting", attempt), ("executing", attempt)}
    assert [{k: v for k, v in r.items() if k != "committedAt"} for r in records] == [record]
