"""Per-run logs stay bounded whatever a handler does (issue 14), on a real nats-server: a
1 MiB line is cut, 100,000 lines from one attempt put 1,001 records on the stream and the
attempt still succeeds, NATS going away while a handler logs neither blocks nor fails it,
and the stream itself drops its oldest records past its size limit."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import nats
from cadenza import Agent, Task
from cadenza._publish import Publisher
from cadenza._runlog import MAX_LINES, MAX_RECORD_BYTES, attempt_log
from cadenza.wire import LOGS_STREAM, log_subject
from cadenza_operator.engine.definition import compile_workflow
from cadenza_operator.engine.infra import LOGS_MAX_AGE, LOGS_MAX_BYTES, ensure_infrastructure
from cadenza_operator.local.nats_server import NatsServer
from cadenza_operator.models import WorkflowSpec
from cadenza_operator.observe.runlogs import read_logs

from .harness import poll, running_engine, serving, unique_namespace

MIB = "x" * (1 << 20)
FLOOD = 100_000

SPEC = {
    "steps": [
        {"name": "big", "agent": "worker", "timeout": "120s"},
        {"name": "flood", "agent": "worker", "timeout": "120s"},
    ]
}


def loud_agent() -> Agent:
    agent = Agent("worker")

    @agent.handler
    async def handle(task: Task) -> str:
        if task.step == "big":
            task.log.info(MIB, blob=MIB, small=1)
        else:
            for i in range(FLOOD):
                task.log.info("line", i=i)
        return "done"

    return agent


async def test_a_huge_line_and_a_flood_of_lines_stay_bounded(nats_server: NatsServer) -> None:
    ns = unique_namespace()
    async with running_engine(nats_server.url, ns) as engine, serving(loud_agent(), nats_server.url, ns):
        wf = compile_workflow("loud", WorkflowSpec.model_validate(SPEC), ns)
        run = await engine.client.start(wf, {})

        async def ended() -> Any:
            state = await engine.client.get(run)
            return state if state is not None and state.phase.is_terminal else None

        state = await poll(ended, timeout=300)
        # logging never made the attempts fail or time out
        assert state.phase == "Succeeded", state.steps

        big = await read_logs(engine.js, ns, run, "big")
        assert len(big) == 1
        assert big[0].event.startswith("xxx") and big[0].event.endswith("characters]")
        assert "…[truncated" in big[0].event and len(big[0].event) < 10_000
        assert "…[truncated" in big[0].fields["blob"] and big[0].fields["small"] == 1

        flood = await read_logs(engine.js, ns, run, "flood", limit=FLOOD)
        # the first MAX_LINES lines in order, then one record counting the rest
        assert len(flood) == MAX_LINES + 1
        assert [r.fields["i"] for r in flood[:-1]] == list(range(MAX_LINES))
        assert flood[-1].level == "warning" and flood[-1].fields == {"dropped": FLOOD - MAX_LINES}
        assert flood[-1].event.startswith(f"{FLOOD - MAX_LINES} lines dropped")


async def test_nats_going_away_never_blocks_or_fails_the_handler(fresh_nats: NatsServer) -> None:
    nc = await nats.connect(fresh_nats.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    await ensure_infrastructure(nc.jetstream())
    pub = Publisher(nc, timeout=2.0)
    loop = asyncio.get_running_loop()
    task = Task(input=None, run_id="r-1", step="work", agent="worker", namespace="ns")
    task._runlog = attempt_log(pub.publish, "ns", "worker", "host:1", task, loop)
    try:
        task.log.info("stored")
        assert task._runlog is not None
        assert await task._runlog.close() == 0  # while NATS is there, the line is stored
        fresh_nats.kill()
        await poll(lambda: _true(not nc.is_connected), timeout=30)
        for i in range(5000):  # synchronous calls: nothing here can wait for NATS
            task.log.info("while NATS is away", i=i, payload=MIB if i == 0 else None)
        # the lines not stored are counted once, within the PubAck timeout, never raised
        lost = await asyncio.wait_for(task._runlog.close(timeout=3.0), 60)
        assert lost == MAX_LINES - 1 + 1  # lines 2..MAX_LINES and the dropped count
    finally:
        await pub.close()
        with contextlib.suppress(Exception):  # the connection to a killed server
            await nc.close()


async def _true(value: bool) -> bool:
    return value


async def test_the_stream_keeps_to_its_limits(fresh_nats: NatsServer) -> None:
    nc = await nats.connect(fresh_nats.url)
    js = nc.jetstream()
    try:
        await ensure_infrastructure(js)
        config = (await js.stream_info(LOGS_STREAM)).config
        assert (config.max_age, config.max_bytes) == (LOGS_MAX_AGE, LOGS_MAX_BYTES)
        assert config.discard == "old" and config.max_msg_size == 64 * 1024
        # settings changed (CADENZA_LOGS_MAX_*): the stream follows at the engine's start
        await ensure_infrastructure(js, logs_max_age=3600.0, logs_max_bytes=256 * 1024)
        config = (await js.stream_info(LOGS_STREAM)).config
        assert (config.max_age, config.max_bytes) == (3600.0, 256 * 1024)

        subject = log_subject("ns", "worker", "r-2", "work", None, 1)
        record = {"time": 1.0, "level": "info", "event": "x" * 10_000, "fields": {}}
        for n in range(100):  # about 1 MB into a 256 KiB stream
            await js.publish(subject, json.dumps({**record, "n": n}).encode())
        info = await js.stream_info(LOGS_STREAM)
        assert info.state.bytes <= 256 * 1024
        kept = await read_logs(js, "ns", "r-2")
        assert 0 < len(kept) < 100 and kept[-1].fields == {} and kept[0].seq > 1  # the oldest went
        too_big = {**record, "event": "x" * (MAX_RECORD_BYTES * 5)}  # past the SDK, the server refuses
        reply = await nc.request(subject, json.dumps(too_big).encode(), timeout=10)
        assert "error" in json.loads(reply.data)
    finally:
        await nc.close()
