"""An agent that stops waits for its own in-flight tasks only (real nats-server).

An agent often shares its process with other work: a second agent, an engine in
`cadenza run`, a test. Its stop must neither wait for that work nor cancel it.
"""

from __future__ import annotations

import asyncio
from typing import Any

import nats
from cadenza import Agent
from cadenza._agent import AgentSettings
from cadenza._protocol import TASKS_STREAM, consumer_name
from cadenza._pull import PullConsumer
from cadenza_operator.engine.infra import ensure_infrastructure
from cadenza_operator.local.nats_server import NatsServer
from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig

from .harness import unique_namespace


async def ready(js: Any, durable: str) -> None:
    """Until the agent pulls tasks (a bounded wait, not a performance assertion)."""
    for _ in range(600):
        try:
            if (await js.consumer_info(TASKS_STREAM, durable)).num_waiting:
                return
        except nats.js.errors.NotFoundError:
            pass
        await asyncio.sleep(0.05)
    raise AssertionError(f"the agent never pulled from {durable}")


async def test_an_agent_stops_without_waiting_for_or_cancelling_other_work(nats_server: NatsServer) -> None:
    namespace = unique_namespace()
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await ensure_infrastructure(js)
    # Unrelated work in the same process: a handler of another pull consumer, still busy.
    stream = f"UNRELATED_{namespace}".replace("-", "_")
    await js.add_stream(StreamConfig(name=stream, subjects=[f"unrelated.{namespace}"]))
    await js.add_consumer(stream, ConsumerConfig(durable_name="busy", ack_policy=AckPolicy.EXPLICIT))
    busy, release = asyncio.Event(), asyncio.Event()
    outcome: list[str] = []

    async def long_work(msg: Any) -> None:
        busy.set()
        try:
            await release.wait()
            outcome.append("finished")
        except asyncio.CancelledError:
            outcome.append("cancelled")
            raise
        await msg.ack()

    other = PullConsumer(nc, stream, "busy", long_work, concurrency=1)
    await other.start()
    agent = Agent("idle")

    @agent.handler
    async def handle(task: Any) -> dict[str, Any]:
        return {}

    stop = asyncio.Event()
    try:
        await js.publish(f"unrelated.{namespace}", b"{}")
        await asyncio.wait_for(busy.wait(), 30)
        serving = asyncio.create_task(
            agent.serve(AgentSettings(nats_url=nats_server.url, namespace=namespace, drain_timeout=0.5), stop)
        )
        await ready(js, consumer_name(namespace, "idle"))
        stop.set()
        await asyncio.wait_for(serving, 30)
        # The agent had nothing in flight: it stopped, and the other work goes on untouched.
        assert outcome == []
        release.set()
        await asyncio.wait_for(asyncio.gather(*other.jobs), 30)
        assert outcome == ["finished"]
    finally:
        release.set()
        await other.stop()
        await nc.close()
