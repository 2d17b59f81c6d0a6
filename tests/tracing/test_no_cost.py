"""Traces cost nothing when the OTLP variables are not set: a process that runs an engine
and an agent through a whole run (with a model call) never imports opentelemetry, and the
tasks it sends carry no trace context. The same process with `OTEL_SDK_DISABLED=true` or
`OTEL_TRACES_EXPORTER=none` beside an endpoint stays off too."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap

import pytest
from cadenza_operator.local.nats_server import NatsServer

from ..conftest import ROOT
from ..integration.chat_server import ChatServer
from ..integration.harness import unique_namespace

SCRIPT = """
import asyncio
import json
import sys

import nats
from cadenza import Agent, AgentSettings
from cadenza_operator.engine.definition import compile_workflow
from cadenza_operator.engine.infra import ensure_agent_consumer
from cadenza_operator.engine.runtime import Engine
from cadenza_operator.models import WorkflowSpec

URL, NS = sys.argv[1], sys.argv[2]


async def main():
    nc = await nats.connect(URL)
    engine = Engine(nc)
    await engine.start()
    await ensure_agent_consumer(nc.jetstream(), NS, "worker")
    tasks = []

    async def seen(msg):
        tasks.append(json.loads(msg.data))

    sub = await nc.subscribe(f"cadenza.task.{NS}.>", cb=seen)
    agent = Agent("worker")

    @agent.handler
    async def handle(task):
        reply = await task.model("fast").chat([{"role": "user", "content": "hi"}])
        return {"text": reply.text}

    stop = asyncio.Event()
    serving = asyncio.create_task(agent.serve(AgentSettings(nats_url=URL, namespace=NS), stop=stop))
    spec = {"steps": [{"name": "a", "agent": "worker"}, {"name": "b", "agent": "worker", "dependsOn": ["a"]}]}
    wf = compile_workflow("w", WorkflowSpec.model_validate(spec), NS)
    await engine.client.publish_definition(wf)
    run = await engine.client.start(wf, {})
    for _ in range(600):
        state = await engine.client.get(run)
        if state is not None and state.terminal:
            break
        await asyncio.sleep(0.05)
    stop.set()
    await serving
    await sub.unsubscribe()
    await engine.stop()
    await nc.close()
    print(json.dumps({
        "phase": state.phase,
        "tracer": engine.tracer is not None,
        "tasks": len(tasks),
        "traceparent": [t.get("traceparent") for t in tasks if "traceparent" in t],
        "otel": sorted(m for m in sys.modules if m.split(".")[0] == "opentelemetry"),
    }))


asyncio.run(main())
"""


@pytest.mark.parametrize(
    "otel",
    [
        {},
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", "OTEL_SDK_DISABLED": "true"},
        {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:9", "OTEL_TRACES_EXPORTER": "none"},
    ],
    ids=["unset", "sdk-disabled", "exporter-none"],
)
async def test_without_the_variables_nothing_is_imported_and_tasks_carry_no_trace_context(
    nats_server: NatsServer, otel: dict[str, str]
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    async with ChatServer() as chat:
        env.update(otel, CADENZA_MODELS=json.dumps({"fast": {"baseURL": chat.url, "model": "tiny"}}))
        proc = await _run(env, nats_server.url, unique_namespace())
    assert proc.returncode == 0, proc.stderr
    outcome = json.loads(proc.stdout.strip().splitlines()[-1])
    assert outcome["phase"] == "Succeeded"
    assert outcome["tasks"] == 2  # the subscription saw the tasks it looks into
    assert outcome == {**outcome, "tracer": False, "traceparent": [], "otel": []}


async def test_with_an_endpoint_the_same_probe_sees_the_tracer_and_the_trace_context(
    nats_server: NatsServer,
) -> None:
    """The control: what the test above finds absent is there once traces are on."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:9", OTEL_EXPORTER_OTLP_TIMEOUT="1")
    async with ChatServer() as chat:
        env["CADENZA_MODELS"] = json.dumps({"fast": {"baseURL": chat.url, "model": "tiny"}})
        proc = await _run(env, nats_server.url, unique_namespace())
    assert proc.returncode == 0, proc.stderr
    outcome = json.loads(proc.stdout.strip().splitlines()[-1])
    assert outcome["phase"] == "Succeeded" and outcome["tracer"] is True
    assert len(outcome["traceparent"]) == 2 and all(t.startswith("00-") for t in outcome["traceparent"])
    assert "opentelemetry.sdk.trace" in outcome["otel"]


async def _run(env: dict[str, str], url: str, namespace: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", textwrap.dedent(SCRIPT), url, namespace],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
    )
