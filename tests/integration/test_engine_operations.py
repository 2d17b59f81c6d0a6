"""Control operations a process adds to its engine (`Engine.operations`, the diagnose
report): answered beside the requests that change runs, never in their way; a bounded
number held at once; an answer too large for the server refused with a reason, not lost.
Real nats-server, a real engine, requests over NATS as the CLI sends them."""

from __future__ import annotations

import asyncio
from typing import Any

import nats
from cadenza._protocol import dumps, loads
from cadenza_operator.engine.control import MAX_ADDED_WAITING, control_subject
from cadenza_operator.local.nats_server import NatsServer

from .harness import running_engine, unique_namespace

WAIT = 60  # bounded waits for what must happen, not timings


async def test_a_long_added_operation_does_not_hold_up_the_commands_behind_it(
    nats_server: NatsServer,
) -> None:
    namespace = unique_namespace()
    release, first = asyncio.Event(), asyncio.Event()
    asked: list[dict[str, Any]] = []

    async def hold(client: Any, request: dict[str, Any]) -> dict[str, Any]:
        asked.append(request)
        first.set()
        await release.wait()
        return {"ok": True, "held": request["n"]}

    async with running_engine(nats_server.url, namespace) as engine:
        engine.operations["hold"] = hold
        nc = await nats.connect(nats_server.url)
        try:
            subject = control_subject(namespace)
            held = [
                asyncio.create_task(nc.request(subject, dumps({"op": "hold", "n": n}), timeout=WAIT))
                for n in range(MAX_ADDED_WAITING)
            ]
            await asyncio.wait_for(first.wait(), WAIT)  # the first is being answered
            # A command sent after them is answered while they are all still held.
            cancel = await nc.request(subject, dumps({"op": "cancel", "run": "nosuch-1"}), timeout=WAIT)
            assert not loads(cancel.data)["ok"] and "no run" in loads(cancel.data)["error"], cancel.data
            assert not any(task.done() for task in held)
            assert len(asked) == 1  # one at a time: the others wait their turn
            # One more than the engine holds is refused at once, as busy.
            busy = loads((await nc.request(subject, dumps({"op": "hold", "n": 99}), timeout=WAIT)).data)
            assert busy["ok"] is False and "busy" in busy["error"], busy
            release.set()
            answers = [loads((await task).data) for task in held]
            assert sorted(a["held"] for a in answers) == list(range(MAX_ADDED_WAITING))
            assert {a["engine"] for a in answers} == {engine.settings.name}
            assert [r["namespace"] for r in asked] == [namespace] * MAX_ADDED_WAITING  # the subject's
        finally:
            release.set()
            await nc.close()


async def test_an_answer_larger_than_the_server_takes_is_refused_with_the_reason(
    nats_server: NatsServer,
) -> None:
    namespace = unique_namespace()

    async def huge(client: Any, request: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True, "blob": "x" * (client.nc.max_payload + 1)}

    async with running_engine(nats_server.url, namespace) as engine:
        engine.operations["huge"] = huge
        nc = await nats.connect(nats_server.url)
        try:
            reply = loads(
                (await nc.request(control_subject(namespace), dumps({"op": "huge"}), timeout=WAIT)).data
            )
        finally:
            await nc.close()
    assert reply["ok"] is False and "exceeds the NATS server's max_payload" in reply["error"], reply
    assert reply["engine"] == engine.settings.name


async def test_an_engine_stopped_with_added_operations_in_flight_stops(nats_server: NatsServer) -> None:
    """Their tasks are the responder's: cancelled and awaited with it, none left running."""
    namespace = unique_namespace()
    started = asyncio.Event()

    async def forever(client: Any, request: dict[str, Any]) -> dict[str, Any]:
        started.set()
        await asyncio.Event().wait()
        raise AssertionError("never answered")

    nc = await nats.connect(nats_server.url)
    try:
        async with running_engine(nats_server.url, namespace) as engine:
            engine.operations["forever"] = forever
            await nc.publish(control_subject(namespace), dumps({"op": "forever"}), reply=nc.new_inbox())
            await asyncio.wait_for(started.wait(), WAIT)
        assert not [t for t in asyncio.all_tasks() if "forever" in repr(t.get_coro())]
    finally:
        await nc.close()
