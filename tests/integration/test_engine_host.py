"""EngineHost against a real nats-server: what it starts, in which order, and its stop."""

from __future__ import annotations

import asyncio
from typing import Any

import nats
from cadenza._connect import NatsUnreachable
from cadenza_operator.engine.control import control_subject
from cadenza_operator.engine.host import EngineHost
from cadenza_operator.engine.settings import EngineSettings
from cadenza_operator.local.nats_server import NatsServer

from .harness import unique_namespace


async def test_start_and_stop_in_order(fresh_nats: NatsServer, monkeypatch: Any) -> None:
    host = EngineHost(EngineSettings(name="hosted", nats_url=fresh_nats.url))
    order: list[str] = []

    def spy(name: str, fn: Any) -> Any:
        async def wrapped(*args: Any, **kwargs: Any) -> Any:
            order.append(name)
            return await fn(*args, **kwargs)

        return wrapped

    assert await host.connect()
    engine = host.engine
    assert engine is not None and host.nc.is_connected
    engine.open = spy("infrastructure", engine.open)  # type: ignore[method-assign]
    engine.start = spy("engine", engine.start)  # type: ignore[method-assign]
    assert await host.start(triggers=True)
    assert order == ["infrastructure", "engine"]
    assert host.triggers is not None and host.client.kv is not None

    # The control responder answers: a refusal for a run that does not exist.
    probe = await nats.connect(fresh_nats.url)
    try:
        namespace = unique_namespace()
        reply = await probe.request(control_subject(namespace), b'{"op": "cancel", "run": "nope"}', timeout=5)
        assert b"no run nope" in reply.data
    finally:
        await probe.close()

    nc, triggers = host.nc, host.triggers
    triggers.stop = spy("triggers", triggers.stop)  # type: ignore[method-assign]
    engine.stop = spy("engine", engine.stop)  # type: ignore[method-assign]
    order.clear()
    await host.stop()
    assert order == ["triggers", "engine"]
    assert nc.is_closed
    assert (host.nc, host.engine, host.triggers) == (None, None, None)
    await host.stop()  # twice is harmless


async def test_a_command_fails_at_once_when_nats_is_unreachable() -> None:
    host = EngineHost(EngineSettings(nats_url="nats://127.0.0.1:1"))
    try:
        await host.start()
    except NatsUnreachable as exc:
        assert "cannot reach NATS at nats://127.0.0.1:1" in str(exc)
    else:
        raise AssertionError("started without NATS")
    await host.stop()


async def test_a_long_running_host_waits_for_nats_until_stopped() -> None:
    host = EngineHost(EngineSettings(nats_url="nats://127.0.0.1:1"))
    stop = asyncio.Event()
    starting = asyncio.ensure_future(host.start(stop))
    await asyncio.sleep(0)  # let the first attempt begin
    stop.set()
    assert await starting is False
    assert host.engine is None
    await host.stop()
