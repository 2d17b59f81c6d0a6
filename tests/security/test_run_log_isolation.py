"""Run logs on the authenticated bus (issue 14), against the real nats-server in operator
mode: an agent writes only its own Agent's log lines of its namespace, a client reads only
its namespace's; each refusal has its positive control under the same kind of credential."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import pytest
from cadenza import Task
from cadenza._publish import Publisher
from cadenza._runlog import attempt_log
from cadenza.wire import LOGS_STREAM, RUNS_BUCKET, log_subject
from cadenza_operator.engine.infra import ensure_infrastructure
from cadenza_operator.observe.runlogs import follow_logs, log_filter, read_logs
from cadenza_operator.security.nats_auth import agent_permissions, client_permissions, engine_permissions

from ..integration.harness import poll
from .conftest import Connection, SecureBus

NS, OTHER_NS = "team-a", "team-b"
RUN = "wf-logs-1"
READ_RUN = "wf-logs-read"

Connect = Callable[[str | None], Any]


@pytest.fixture
async def bus(secure_bus: SecureBus, connect: Connect) -> dict[str, Any]:
    engine: Connection = await connect(secure_bus.creds("engine", engine_permissions()))
    await ensure_infrastructure(engine.nc.jetstream())
    return {
        "engine": engine,
        "agent_a": await connect(secure_bus.creds("agent-a", agent_permissions(NS, "a"))),
        "client_a": await connect(secure_bus.creds("alice", client_permissions(NS, "alice"))),
        "client_b": await connect(secure_bus.creds("bob", client_permissions(OTHER_NS, "bob"))),
    }


async def log_as_agent(conn: Connection, run: str, line: str) -> int:
    """A line logged by a handler of Agent `a` of NS, sent as the SDK sends it; the number
    of lines not stored."""
    pub = Publisher(conn.nc)
    task = Task(input=None, run_id=run, step="work", agent="a", namespace=NS)
    task._runlog = attempt_log(pub.publish, NS, "a", "host:1", task, asyncio.get_running_loop())
    try:
        task.log.info(line, secret="s3cr3t")
        return await task._runlog.close()
    finally:
        await pub.close()


@pytest.mark.parametrize(
    "subject",
    [
        log_subject(NS, "b", RUN, "work", None, 1),  # as another Agent of its namespace
        log_subject(OTHER_NS, "a", RUN, "work", None, 1),  # as its namesake in another namespace
    ],
    ids=["other-agent", "other-namespace"],
)
async def test_an_agent_cannot_log_as_another(bus: dict[str, Any], subject: str) -> None:
    agent: Connection = bus["agent_a"]
    forged = {"time": 1.0, "level": "info", "event": "forged", "fields": {}}
    await agent.nc.publish(subject, json.dumps(forged).encode(), reply=agent.nc.new_inbox())
    await agent.refused(subject)
    # positive control: its own lines go in, under its credential, as the SDK sends them
    run = f"{RUN}-{subject.split('.')[3]}"
    assert await log_as_agent(agent, run, "mine") == 0
    records = await read_logs(bus["engine"].nc.jetstream(), NS, run)
    assert [(r.event, r.agent) for r in records] == [("mine", "a")]
    assert await read_logs(bus["engine"].nc.jetstream(), NS, RUN) == []  # nothing forged
    assert await read_logs(bus["engine"].nc.jetstream(), OTHER_NS, RUN) == []


async def test_a_client_reads_its_own_namespaces_logs_only(bus: dict[str, Any]) -> None:
    assert await log_as_agent(bus["agent_a"], READ_RUN, "for team-a only") == 0
    # positive control: a client of team-a reads the line under its credential
    alice: Connection = bus["client_a"]
    (record,) = await read_logs(alice.nc.jetstream(), NS, READ_RUN)
    assert (record.event, record.fields) == ("for team-a only", {"secret": "s3cr3t"})

    # a client of team-b asking the same way is refused by the server
    bob: Connection = bus["client_b"]
    subject = f"$JS.API.CONSUMER.CREATE.{LOGS_STREAM}.peek.{log_filter(NS, READ_RUN)}"
    config = {"name": "peek", "filter_subject": log_filter(NS, READ_RUN), "deliver_subject": "x"}
    await bob.nc.publish(subject, json.dumps({"stream_name": LOGS_STREAM, "config": config}).encode())
    await bob.refused(subject)
    assert bob.nc.is_connected  # and its own namespace's logs it may read (none yet)
    assert await read_logs(bob.nc.jetstream(), OTHER_NS, READ_RUN) == []


@pytest.mark.parametrize(
    ("subject", "config"),
    [
        # the create subject names its own namespace, the body another's filter
        (
            f"$JS.API.CONSUMER.CREATE.{LOGS_STREAM}.sly.cadenza.log.{OTHER_NS}.>",
            {"name": "sly", "filter_subject": f"cadenza.log.{NS}.>"},
        ),
        # an unnamed consumer: its filter only in the body
        (f"$JS.API.CONSUMER.CREATE.{LOGS_STREAM}", {"filter_subject": f"cadenza.log.{NS}.>"}),
        # a durable one, the same
        (f"$JS.API.CONSUMER.DURABLE.CREATE.{LOGS_STREAM}.d", {"durable_name": "d"}),
    ],
    ids=["body-filter", "unnamed", "durable"],
)
async def test_a_client_cannot_get_around_the_filter_in_the_subject(
    bus: dict[str, Any], subject: str, config: dict[str, Any]
) -> None:
    await log_as_agent(bus["agent_a"], f"{RUN}-private", "still private")
    bob: Connection = bus["client_b"]
    body = json.dumps(
        {"stream_name": LOGS_STREAM, "config": {**config, "deliver_subject": bob.nc.new_inbox()}}
    ).encode()
    if subject.endswith(".>"):  # allowed by its subject: the server holds the body to it
        reply = await bob.nc.request(subject, body, timeout=10)
        assert "error" in json.loads(reply.data)
        assert bob.errors == []
    else:
        await bob.nc.publish(subject, body, reply=bob.nc.new_inbox())
        await bob.refused(subject)


@pytest.mark.parametrize(
    "subject",
    [
        f"$JS.API.STREAM.MSG.GET.{LOGS_STREAM}",
        f"$JS.API.DIRECT.GET.{LOGS_STREAM}",
        f"$JS.API.STREAM.INFO.{LOGS_STREAM}",
    ],
)
async def test_a_client_cannot_read_logs_by_sequence_or_list_their_subjects(
    bus: dict[str, Any], subject: str
) -> None:
    bob: Connection = bus["client_b"]
    await bob.nc.publish(subject, json.dumps({"seq": 1}).encode(), reply=bob.nc.new_inbox())
    await bob.refused(subject)


async def test_an_agent_cannot_read_logs(bus: dict[str, Any]) -> None:
    agent: Connection = bus["agent_a"]
    subject = f"$JS.API.CONSUMER.CREATE.{LOGS_STREAM}.peek.cadenza.log.{NS}.>"
    await agent.nc.publish(subject, b"{}", reply=agent.nc.new_inbox())
    await agent.refused(subject)


async def test_a_client_follows_its_namespaces_logs_under_its_credential(bus: dict[str, Any]) -> None:
    """--follow's reads (the live consumer, then the exact read from the last sequence seen,
    the run record's phase) are all allowed to a client credential."""
    run = f"{RUN}-follow"
    engine_js = bus["engine"].nc.jetstream()
    runs = await engine_js.key_value(RUNS_BUCKET)
    await runs.put(run, json.dumps({"run": run, "namespace": NS, "phase": "Running"}).encode())
    alice: Connection = bus["client_a"]
    seen: list[str] = []

    async def follow() -> None:
        async for record in follow_logs(alice.nc.jetstream(), NS, run, poll=0.1):
            seen.append(record.event)

    following = asyncio.create_task(follow())
    assert await log_as_agent(bus["agent_a"], run, "first") == 0
    await poll(lambda: _now(seen == ["first"]))
    assert await log_as_agent(bus["agent_a"], run, "last") == 0
    await runs.put(run, json.dumps({"run": run, "namespace": NS, "phase": "Succeeded"}).encode())
    await asyncio.wait_for(following, 30)  # ends by itself once the run has
    assert seen == ["first", "last"] and alice.errors == []


async def _now(value: bool) -> bool:
    return value
