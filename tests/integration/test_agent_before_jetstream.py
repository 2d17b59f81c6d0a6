"""An agent that reaches NATS before JetStream answers (a server restarting accepts
connections before its streams are back) waits for it instead of exiting, then serves.

Found by the soak: a worker replica started during a NATS restart crashed on the
run-status bucket's lookup (`nats: timeout`), and its supervisor counted an exit."""

from __future__ import annotations

import asyncio
import json
from asyncio.subprocess import DEVNULL
from typing import Any

import nats
from cadenza import Agent as SdkAgent
from cadenza import AgentSettings, Task
from cadenza_operator.engine.definition import compile_workflow
from cadenza_operator.local.nats_server import NatsServer, free_port, nats_server_binary
from cadenza_operator.models import WorkflowSpec

from .harness import poll, running_engine, unique_namespace

UNAVAILABLE = json.dumps(
    {"error": {"code": 503, "description": "JetStream system temporarily unavailable"}}
).encode()


async def test_an_agent_waits_for_jetstream_then_serves(tmp_path: Any) -> None:
    port = free_port()
    # A server without JetStream on the port, and a stand-in that answers every JetStream
    # request as a restarting server does: 503, temporarily unavailable.
    plain = await asyncio.create_subprocess_exec(
        nats_server_binary(), "-a", "127.0.0.1", "-p", str(port), stdout=DEVNULL, stderr=DEVNULL
    )
    url = f"nats://127.0.0.1:{port}"
    namespace = unique_namespace()
    agent = SdkAgent("waiter")

    @agent.handler
    async def handle(task: Task) -> Any:
        return {"echo": task.input["x"]}

    stop = asyncio.Event()
    server: NatsServer | None = None
    serving: asyncio.Task[None] | None = None
    try:

        async def connected() -> Any:
            try:
                return await nats.connect(url, allow_reconnect=False)
            except Exception:
                return None

        stand_in = await poll(connected, timeout=20)
        asked: list[str] = []

        async def unavailable(msg: Any) -> None:
            asked.append(msg.subject)
            await msg.respond(UNAVAILABLE)

        await stand_in.subscribe("$JS.API.>", cb=unavailable)
        await stand_in.flush()
        settings = AgentSettings(nats_url=url, namespace=namespace)
        serving = asyncio.create_task(agent.serve(settings, stop=stop))

        async def asked_again() -> bool | None:
            assert not serving.done(), serving  # it must not give up (nor crash) meanwhile
            return len(asked) >= 3 or None

        await poll(asked_again, timeout=30)
        await stand_in.close()

        # The server comes back with JetStream on the same port: the agent reconnects,
        # finds the task stream and its consumer (made by the engine), and serves.
        plain.terminate()
        await asyncio.wait_for(plain.wait(), 10)
        server = NatsServer(port=port).start()
        async with running_engine(server.url, namespace, "waiter") as engine:
            spec = {"steps": [{"name": "s", "agent": "waiter", "input": {"x": "${{ input.x }}"}}]}
            wf = compile_workflow("waits", WorkflowSpec.model_validate(spec), namespace)
            run = await engine.client.start(wf, {"x": 7})

            async def ended() -> Any:
                state = await engine.client.get(run)
                return state if state is not None and state.terminal else None

            state = await poll(ended, timeout=60)
            assert state.phase == "Succeeded", state
            assert state.steps["s"].output == {"echo": 7}
            assert not serving.done()
    finally:
        stop.set()
        try:
            if serving is not None:
                await asyncio.wait_for(serving, 30)  # ends cleanly: no exception
        finally:  # the servers go even when the agent's serve raised
            if plain.returncode is None:
                plain.kill()
                await plain.wait()
            if server is not None:
                server.stop()
