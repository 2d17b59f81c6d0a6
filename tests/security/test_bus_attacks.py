"""The attacks of issue 13, replayed against the real nats-server in operator mode with the
credentials security.nats_auth mints: each is refused by the server, and the legitimate
role can do the same thing on its own resources (the positive control)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import nats
import pytest
from cadenza.models import LIMITS_BUCKET
from cadenza.wire import (
    AUDIT_STREAM,
    CLAIMS_BUCKET,
    RUN_STATUS_BUCKET,
    RUNS_BUCKET,
    TASKS_STREAM,
    claim_key,
    consumer_name,
    task_subject,
)
from cadenza_operator.engine.infra import ensure_agent_consumer, ensure_infrastructure
from cadenza_operator.security.nats_auth import agent_permissions, client_permissions, engine_permissions

from .conftest import Connection, SecureBus

NS, OTHER_NS = "team-a", "team-b"
RUN = "run-1"

Connect = Callable[[str | None], Any]


@pytest.fixture
async def bus(secure_bus: SecureBus, connect: Connect) -> dict[str, Any]:
    """The engine's credential creates what Cadenza needs, two Agents' consumers, a task
    for each and a run record; then one credential per role."""
    engine: Connection = await connect(secure_bus.creds("engine", engine_permissions()))
    js = engine.nc.jetstream()
    await ensure_infrastructure(js)
    for agent in ("a", "b"):
        await ensure_agent_consumer(js, NS, agent)
        await js.publish(task_subject(NS, agent), json.dumps({"for": agent}).encode())
    runs = await js.key_value(RUNS_BUCKET)
    await runs.put(RUN, b'{"secret": "run record"}')
    return {
        "engine": engine,
        "agent_a": secure_bus.creds("agent-a", agent_permissions(NS, "a")),
        "client_a": secure_bus.creds("alice", client_permissions(NS, "alice")),
    }


async def test_anonymous_connect_is_refused(secure_bus: SecureBus, bus: dict[str, Any]) -> None:
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await nats.connect(secure_bus.server.url, allow_reconnect=False, max_reconnect_attempts=0)
    assert bus["engine"].nc.is_connected  # positive control: a credential connects


async def test_agent_cannot_pull_another_agents_tasks(connect: Connect, bus: dict[str, Any]) -> None:
    agent = await connect(bus["agent_a"])
    pull = json.dumps({"batch": 1, "expires": 5_000_000_000}).encode()
    # a pulled message keeps its stream subject: read it on a subscription of our own,
    # as cadenza.nats.PullConsumer does (nats-py's request() routes replies by subject)
    inbox = agent.nc.new_inbox()
    sub = await agent.nc.subscribe(inbox)
    await agent.nc.publish(
        f"$JS.API.CONSUMER.MSG.NEXT.{TASKS_STREAM}.{consumer_name(NS, 'a')}", pull, reply=inbox
    )
    own = await sub.next_msg(timeout=10)
    assert json.loads(own.data) == {"for": "a"}  # positive control: its own queue

    theirs = f"$JS.API.CONSUMER.MSG.NEXT.{TASKS_STREAM}.{consumer_name(NS, 'b')}"
    await agent.nc.publish(theirs, pull, reply=agent.nc.new_inbox())
    await agent.refused(theirs)
    info = await bus["engine"].nc.jetstream().consumer_info(TASKS_STREAM, consumer_name(NS, "b"))
    assert info.num_pending >= 1  # B's task is still there


async def test_agent_cannot_subscribe_to_all_tasks(connect: Connect, bus: dict[str, Any]) -> None:
    agent = await connect(bus["agent_a"])
    await agent.nc.subscribe("cadenza.task.>")
    await agent.refused("cadenza.task.>")


async def test_agent_cannot_publish_another_agents_events(connect: Connect, bus: dict[str, Any]) -> None:
    agent = await connect(bus["agent_a"])
    js = agent.nc.jetstream()
    ack = await js.publish(f"cadenza.event.{NS}.{RUN}.agent.a", b'{"type": "heartbeat"}')
    assert ack.seq > 0  # positive control: its own event subject, stored

    forged = f"cadenza.event.{NS}.{RUN}.agent.b"
    await agent.nc.publish(forged, b'{"type": "result", "output": {"approved": true}}')
    await agent.refused(forged)


async def test_agent_cannot_publish_the_engines_events(connect: Connect, bus: dict[str, Any]) -> None:
    agent = await connect(bus["agent_a"])
    subject = f"cadenza.event.{NS}.{RUN}"
    await agent.nc.publish(subject, b'{"type": "approval", "step": "gate", "by": "alice"}')
    await agent.refused(subject)


@pytest.mark.parametrize("command", ["approve", "cancel"])
async def test_agent_cannot_send_control_requests(
    connect: Connect, bus: dict[str, Any], command: str
) -> None:
    agent = await connect(bus["agent_a"])
    subject = f"cadenza.control.{NS}.agent-a"
    await agent.nc.publish(
        subject, json.dumps({"op": command, "run": RUN}).encode(), reply=agent.nc.new_inbox()
    )
    await agent.refused(subject)


@pytest.mark.parametrize("operation", ["DELETE", "PURGE"])
async def test_agent_cannot_delete_or_purge_a_stream(
    connect: Connect, bus: dict[str, Any], operation: str
) -> None:
    agent = await connect(bus["agent_a"])
    subject = f"$JS.API.STREAM.{operation}.{AUDIT_STREAM}"
    await agent.nc.publish(subject, b"", reply=agent.nc.new_inbox())
    await agent.refused(subject)
    engine_js = bus["engine"].nc.jetstream()
    assert (await engine_js.stream_info(AUDIT_STREAM)).config.name == AUDIT_STREAM
    # positive control: the engine's credential may (on a scratch stream)
    await engine_js.add_stream(name="SCRATCH", subjects=["scratch.>"])
    assert await engine_js.delete_stream("SCRATCH")


@pytest.mark.parametrize(
    ("subject", "body"),
    [
        (f"$JS.API.DIRECT.GET.KV_{RUNS_BUCKET}.$KV.{RUNS_BUCKET}.{RUN}", b""),
        (
            f"$JS.API.STREAM.MSG.GET.KV_{RUNS_BUCKET}",
            json.dumps({"last_by_subj": f"$KV.{RUNS_BUCKET}.{RUN}"}).encode(),
        ),
        (f"$JS.API.CONSUMER.CREATE.KV_{RUNS_BUCKET}", b"{}"),  # how a client lists the keys
    ],
    ids=["direct-get", "msg-get", "list-keys"],
)
async def test_agent_cannot_read_the_runs_bucket(
    connect: Connect, bus: dict[str, Any], subject: str, body: bytes
) -> None:
    agent = await connect(bus["agent_a"])
    await agent.nc.publish(subject, body, reply=agent.nc.new_inbox())
    await agent.refused(subject)
    # positive control: the engine reads the record
    entry = await (await bus["engine"].nc.jetstream().key_value(RUNS_BUCKET)).get(RUN)
    assert entry.value == b'{"secret": "run record"}'


async def test_client_cannot_control_another_namespace_nor_speak_as_another_user(
    connect: Connect, bus: dict[str, Any]
) -> None:
    engine = bus["engine"]

    async def answer(msg: Any) -> None:
        await msg.respond(json.dumps({"subject": msg.subject}).encode())

    await engine.nc.subscribe("cadenza.control.>", cb=answer)
    await engine.nc.flush()
    client = await connect(bus["client_a"])
    own = f"cadenza.control.{NS}.alice"
    reply = await client.nc.request(own, b'{"op": "approve"}', timeout=10)
    assert json.loads(reply.data) == {"subject": own}  # positive control

    for subject in (f"cadenza.control.{OTHER_NS}.alice", f"cadenza.control.{NS}.bob"):
        await client.nc.publish(subject, b'{"op": "cancel"}', reply=client.nc.new_inbox())
        await client.refused(subject)


async def test_client_cannot_touch_tasks_or_events(connect: Connect, bus: dict[str, Any]) -> None:
    client = await connect(bus["client_a"])
    for subject in (f"cadenza.event.{NS}.{RUN}", f"$JS.API.STREAM.DELETE.{AUDIT_STREAM}"):
        await client.nc.publish(subject, b"{}")
        await client.refused(subject)


async def test_agent_cannot_claim_another_agents_attempt(connect: Connect, bus: dict[str, Any]) -> None:
    agent = await connect(bus["agent_a"])
    js = agent.nc.jetstream()
    ack = await js.publish(f"$KV.{CLAIMS_BUCKET}.{claim_key(NS, 'a', 'r.s.1')}", b'{"worker": "a-1"}')
    assert ack.seq > 0  # positive control: its own Agent's claim

    theirs = f"$KV.{CLAIMS_BUCKET}.{claim_key(NS, 'b', 'r.s.1')}"
    await agent.nc.publish(theirs, b'"abandoned"')
    await agent.refused(theirs)


@pytest.mark.parametrize("bucket", [CLAIMS_BUCKET, RUN_STATUS_BUCKET, LIMITS_BUCKET])
async def test_agent_cannot_list_the_keys_of_buckets_namespaces_share(
    connect: Connect, bus: dict[str, Any], bucket: str
) -> None:
    """A stream's info with a subjects filter lists every key: other namespaces' run ids,
    task ids and Models. The SDK binds these buckets without asking (cadenza._kvbind)."""
    agent = await connect(bus["agent_a"])
    subject = f"$JS.API.STREAM.INFO.KV_{bucket}"
    await agent.nc.publish(subject, json.dumps({"subjects_filter": ">"}).encode(), reply=agent.nc.new_inbox())
    await agent.refused(subject)
    # positive control: the engine may
    info = await bus["engine"].nc.jetstream().stream_info(f"KV_{bucket}")
    assert info.config.name == f"KV_{bucket}"


async def test_an_agent_credential_uses_its_namespaces_model_limits(
    connect: Connect, bus: dict[str, Any]
) -> None:
    """The positive control of the above for the limits: bound without stream info, the
    agent's limiter takes and gives back a slot under its credential, nothing refused."""
    from cadenza.models import ModelLimiter, ModelSpec

    agent = await connect(bus["agent_a"])
    spec = ModelSpec.from_spec(
        "fast",
        {"baseURL": "http://127.0.0.1:9/v1", "model": "m", "limits": {"requests": 5, "concurrency": 2}},
        NS,
    )
    limiter = await ModelLimiter.open(agent.nc.jetstream(), spec, bound=True)
    lease, waited = await limiter.acquire(10)
    await limiter.release(lease, 12)
    await agent.nc.flush()
    assert waited >= 0 and agent.errors == []
