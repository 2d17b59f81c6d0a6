"""Namespace isolation of the shared context on the authenticated bus: an Agent of one
namespace can neither read, write nor list (keys, watch, stream info) the context of
another namespace's run; the same operations on its own namespace's run, made by the
SDK's KVContext under its own credential, work (the positive control)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from typing import Any

import pytest
from cadenza._context import KVContext
from cadenza.wire import CONTEXT_BUCKET
from cadenza_operator.engine.infra import ensure_infrastructure
from cadenza_operator.security.nats_auth import agent_permissions, engine_permissions

from .conftest import Connection, SecureBus

NS, OTHER_NS = "team-a", "team-b"
RUN, OTHER_RUN = "run-a", "run-b"
STREAM = f"KV_{CONTEXT_BUCKET}"
THEIR_KEY = f"$KV.{CONTEXT_BUCKET}.{OTHER_NS}.{OTHER_RUN}.secret"

Connect = Callable[[str | None], Any]


@pytest.fixture
async def agents(secure_bus: SecureBus, connect: Connect) -> tuple[Connection, Connection]:
    """Agent a of team-a and agent b of team-b, each on its own credential; b has written
    its run's context through the SDK (under b's credential: the SDK needs no more)."""
    engine: Connection = await connect(secure_bus.creds("engine", engine_permissions()))
    await ensure_infrastructure(engine.nc.jetstream())
    ours: Connection = await connect(secure_bus.creds("agent-a", agent_permissions(NS, "a")))
    theirs: Connection = await connect(secure_bus.creds("agent-b", agent_permissions(OTHER_NS, "b")))
    ctx = KVContext(theirs.nc, OTHER_NS, OTHER_RUN)
    await ctx.put("secret", {"card": "4111"})
    await ctx.put("count", 0)  # the bus is the module's: start again each test
    assert await ctx.update("count", lambda n: n + 1, default=0) == 1
    assert await ctx.keys() == ["count", "secret"]
    assert theirs.errors == []
    return ours, theirs


async def test_an_agent_uses_its_own_namespaces_context(agents: tuple[Connection, Connection]) -> None:
    ours, _ = agents
    ctx = KVContext(ours.nc, NS, RUN)
    await ctx.put("draft", "v1")  # written again each time: the bus is the module's
    assert await ctx.get("draft") == "v1"
    assert await ctx.update("draft", lambda v: v + "+v2") == "v1+v2"
    assert await ctx.keys() == ["draft"]
    # the same run id in another namespace is another context: nothing of b's shows
    assert await KVContext(ours.nc, NS, OTHER_RUN).keys() == []
    assert await KVContext(ours.nc, NS, OTHER_RUN).get("secret") is None
    assert ours.errors == []


@pytest.mark.parametrize(
    ("subject", "body"),
    [
        (f"$JS.API.DIRECT.GET.{STREAM}.{THEIR_KEY}", b""),
        (f"$JS.API.DIRECT.GET.{STREAM}", json.dumps({"last_by_subj": THEIR_KEY}).encode()),
        (f"$JS.API.STREAM.MSG.GET.{STREAM}", json.dumps({"last_by_subj": THEIR_KEY}).encode()),
    ],
    ids=["direct-get", "direct-get-body", "msg-get"],
)
async def test_an_agent_cannot_read_another_namespaces_context(
    agents: tuple[Connection, Connection], subject: str, body: bytes
) -> None:
    ours, theirs = agents
    await ours.nc.publish(subject, body, reply=ours.nc.new_inbox())
    await ours.refused(subject)
    assert await KVContext(theirs.nc, OTHER_NS, OTHER_RUN).get("secret") == {"card": "4111"}


async def test_an_agent_cannot_write_another_namespaces_context(
    agents: tuple[Connection, Connection],
) -> None:
    ours, theirs = agents
    await ours.nc.publish(THEIR_KEY, b'{"card": "forged"}')
    await ours.refused(THEIR_KEY)
    assert await KVContext(theirs.nc, OTHER_NS, OTHER_RUN).get("secret") == {"card": "4111"}


@pytest.mark.parametrize(
    ("subject", "body"),
    [
        # KVContext.keys() as it would list b's scope
        (
            f"$JS.API.CONSUMER.CREATE.{STREAM}.peek.$KV.{CONTEXT_BUCKET}.{OTHER_NS}.{OTHER_RUN}.*",
            json.dumps({"stream_name": STREAM, "config": {"name": "peek"}}).encode(),
        ),
        # nats-py's kv.watch() and kv.keys(): an unnamed consumer, its filter in the body
        (
            f"$JS.API.CONSUMER.CREATE.{STREAM}",
            json.dumps({"stream_name": STREAM, "config": {"filter_subject": THEIR_KEY}}).encode(),
        ),
        # the stream's per-subject counts name every key of the bucket
        (f"$JS.API.STREAM.INFO.{STREAM}", json.dumps({"subjects_filter": ">"}).encode()),
    ],
    ids=["named-consumer", "watch", "stream-info-subjects"],
)
async def test_an_agent_cannot_list_another_namespaces_context(
    agents: tuple[Connection, Connection], subject: str, body: bytes
) -> None:
    ours, theirs = agents
    await ours.nc.publish(subject, body, reply=ours.nc.new_inbox())
    await ours.refused(subject)
    assert await KVContext(theirs.nc, OTHER_NS, OTHER_RUN).keys() == ["count", "secret"]


async def test_a_consumer_named_for_its_own_namespace_cannot_filter_another(
    agents: tuple[Connection, Connection],
) -> None:
    """The create subject names the filter, and the server holds the body to it: a request
    allowed by its subject (its own namespace) cannot ask for b's keys in the body."""
    ours, _ = agents
    subject = f"$JS.API.CONSUMER.CREATE.{STREAM}.sly.$KV.{CONTEXT_BUCKET}.{NS}.>"
    config = {"name": "sly", "filter_subject": f"$KV.{CONTEXT_BUCKET}.{OTHER_NS}.>", "ack_policy": "none"}
    reply = await ours.nc.request(
        subject, json.dumps({"stream_name": STREAM, "config": config}).encode(), timeout=10
    )
    assert "error" in json.loads(reply.data)
    assert ours.errors == []


async def test_an_agent_cannot_overhear_the_replies_to_another_namespaces_reads(
    agents: tuple[Connection, Connection],
) -> None:
    """Replies go to inbox subjects; a credential may subscribe only to the inboxes named
    after its own user key (cadenza.nats.inbox_prefix), not to `_INBOX.>`."""
    ours, theirs = agents
    overheard: list[bytes] = []
    secret_heard = asyncio.Event()

    async def keep(msg: Any) -> None:
        overheard.append(msg.data)
        if b"4111" in msg.data:
            secret_heard.set()

    await ours.nc.subscribe("_INBOX.>", cb=keep)
    await ours.nc.flush()
    assert await KVContext(theirs.nc, OTHER_NS, OTHER_RUN).get("secret") == {"card": "4111"}
    # The server copies the reply to us on its own path (no flush orders it after b's):
    # wait for it, boundedly; once the gap is closed this waits out the bound and passes.
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(secret_heard.wait(), 5)
    assert not secret_heard.is_set()  # refused, or never routed to us
