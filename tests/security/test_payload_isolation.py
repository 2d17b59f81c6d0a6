"""Namespace isolation of the payload store on the authenticated bus: each namespace has
its own object store (cadenza.wire.payloads_store), made by the engine with an Agent's
consumer, and an Agent's credential names only its namespace's. An agent of team-a can
neither read nor write team-b's objects, nor the store all namespaces shared before;
under its own credential the SDK offloads and resolves its namespace's values (the
positive control)."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

import pytest
from cadenza.nats import offload_payload, resolve_payload, store_payload
from cadenza.wire import OFFLOAD_BYTES, PAYLOADS_STORE, dumps, is_ref, payloads_store
from cadenza_operator.engine.infra import ensure_agent_consumer, ensure_infrastructure
from cadenza_operator.security.nats_auth import agent_permissions, engine_permissions

from .conftest import Connection, SecureBus

NS, OTHER_NS = "team-a", "team-b"
THEIRS = payloads_store(OTHER_NS)
NAME = "run-b.step.output"
META = f"$O.{THEIRS}.M.{base64.urlsafe_b64encode(NAME.encode()).decode()}"

Connect = Callable[[str | None], Any]


@pytest.fixture
async def bus(secure_bus: SecureBus, connect: Connect) -> dict[str, Connection]:
    """The engine makes both namespaces' stores (with their Agents' consumers) and stores
    an object of team-b's, and one in the old shared store; then agent a's credential."""
    engine: Connection = await connect(secure_bus.creds("engine", engine_permissions()))
    js = engine.nc.jetstream()
    await ensure_infrastructure(js)
    await ensure_agent_consumer(js, NS, "a")
    await ensure_agent_consumer(js, OTHER_NS, "b")
    await store_payload(js, NAME, dumps({"card": "4111"}), namespace=OTHER_NS)
    await (await js.object_store(PAYLOADS_STORE)).put("old.input", dumps({"old": True}))
    agent: Connection = await connect(secure_bus.creds("agent-a", agent_permissions(NS, "a")))
    return {"engine": engine, "agent": agent}


async def test_an_agent_offloads_and_resolves_its_namespaces_values(bus: dict[str, Connection]) -> None:
    agent = bus["agent"]
    js = agent.nc.jetstream()
    big = {"text": "x" * (OFFLOAD_BYTES + 1)}
    ref = await offload_payload(js, "run-a.step.output", big, namespace=NS)
    assert is_ref(ref)
    assert await resolve_payload(js, ref, namespace=NS) == big
    assert agent.errors == []
    # the engine finds it in team-a's store, not in team-b's
    engine_js = bus["engine"].nc.jetstream()
    assert await resolve_payload(engine_js, ref, namespace=NS) == big
    assert (await (await engine_js.object_store(payloads_store(NS))).get_info("run-a.step.output")).size > 0


@pytest.mark.parametrize(
    ("subject", "body"),
    [
        (f"$JS.API.STREAM.INFO.OBJ_{THEIRS}", b""),  # how the SDK binds a store
        (f"$JS.API.DIRECT.GET.OBJ_{THEIRS}.{META}", b""),  # the object's description
        (f"$JS.API.STREAM.MSG.GET.OBJ_{THEIRS}", json.dumps({"last_by_subj": META}).encode()),
        (f"$JS.API.CONSUMER.CREATE.OBJ_{THEIRS}", b"{}"),  # how its chunks are read
        (f"$JS.API.STREAM.INFO.OBJ_{PAYLOADS_STORE}", b""),  # the store shared before
    ],
    ids=["bind", "direct-get", "msg-get", "read-chunks", "old-shared-store"],
)
async def test_an_agent_cannot_read_another_namespaces_values(
    bus: dict[str, Connection], subject: str, body: bytes
) -> None:
    agent = bus["agent"]
    await agent.nc.publish(subject, body, reply=agent.nc.new_inbox())
    await agent.refused(subject)


@pytest.mark.parametrize("subject", [META, f"$O.{THEIRS}.C.forged", f"$O.{PAYLOADS_STORE}.M.b2xkLmlucHV0"])
async def test_an_agent_cannot_write_another_namespaces_values(
    bus: dict[str, Connection], subject: str
) -> None:
    agent = bus["agent"]
    await agent.nc.publish(subject, b'{"card": "forged"}')
    await agent.refused(subject)
    engine_js = bus["engine"].nc.jetstream()
    assert await resolve_payload(engine_js, {"$cadenzaRef": NAME}, namespace=OTHER_NS) == {"card": "4111"}


async def test_a_reference_from_before_namespaced_stores_still_resolves(bus: dict[str, Connection]) -> None:
    """A run started before the upgrade holds references into the shared store: the engine
    finds them there when its namespace's store has no such object."""
    engine_js = bus["engine"].nc.jetstream()
    assert await resolve_payload(engine_js, {"$cadenzaRef": "old.input"}, namespace=NS) == {"old": True}
