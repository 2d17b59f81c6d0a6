"""The raw JetStream baseline: the same hops as a Cadenza run, with no engine logic.

Per run, like the reference prototype in ../shared/reference/bench (jsproto):

* one KV put (file bucket ``bench_runs``, history 1) per state change: run started
  (key ``<run>``), each step or item completed (key ``<run>.<step>``), run finished; each
  put waits for its PubAck;
* each step is one task published to the work-queue stream ``BENCH_TASKS`` with a
  deterministic ``Nats-Msg-Id`` (``<run>.<step>``), waiting for the PubAck;
* a worker process (``python baseline.py worker URL``) consumes the tasks through the
  durable pull consumer ``bench_worker``, computes ``x + 1``, publishes the result to the
  work-queue stream ``BENCH_RESULTS`` (``Nats-Msg-Id`` ``<run>.<step>.res``), waits for the
  PubAck, then acks the task;
* the orchestrator (this module's `Baseline`, in the driver process) consumes the
  results through the durable pull consumer ``bench_orch``: it writes the step to KV,
  acks the result, then wakes the run, which dispatches the next step (chain), the next
  item (a windowed fan-out) or counts the join.

Both sides consume with the SDK's `PullConsumer` (the same continuous pull the engine
and the agents use). No retry, timeout or recovery code runs here: it pays only what
the happy path needs.

Transport (``--transport``): by default the baseline publishes and writes KV with
nats-py's ``js.publish`` and ``kv.put``, as the reference prototype does; that is the
baseline the targets are set against. The engine and agents publish through
``cadenza._publish.Publisher`` (PubAcks over one reply subscription, no request per
publish). ``--transport cadenza`` gives the baseline that same publish path, so the
ratio measures the engine's logic alone (decisions, the run record with CAS, the
outbox, the start hop), not the transport.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import uuid
from typing import Any

from cadenza._publish import Publisher
from cadenza._pull import PullConsumer

TASKS_STREAM = "BENCH_TASKS"
RESULTS_STREAM = "BENCH_RESULTS"
TASK_SUBJECTS = "bench.task.>"
RESULT_SUBJECTS = "bench.result.>"
WORKER_CONSUMER = "bench_worker"
ORCH_CONSUMER = "bench_orch"
RUNS_BUCKET = "bench_runs"
TRANSPORTS = ("nats-py", "cadenza")


class Transport:
    """PubAck'd publishes and KV puts, through nats-py's requests or cadenza's Publisher."""

    def __init__(self, nc: Any, kind: str) -> None:
        self.js = nc.jetstream()
        self.pub = Publisher(nc) if kind == "cadenza" else None
        self.kv: Any = None

    async def open(self) -> None:
        self.kv = await self.js.key_value(RUNS_BUCKET)

    async def publish(self, subject: str, data: bytes, msg_id: str) -> None:
        if self.pub is not None:
            await self.pub.publish(subject, data, {"Nats-Msg-Id": msg_id})
        else:
            await self.js.publish(subject, data, headers={"Nats-Msg-Id": msg_id})

    async def put(self, key: str, data: bytes) -> None:
        if self.pub is not None:
            await self.pub.kv_put(RUNS_BUCKET, key, data)
        else:
            await self.kv.put(key, data)


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


async def ensure_infrastructure(js: Any) -> None:
    """Streams, consumers and the KV bucket of the baseline (idempotent)."""
    from nats.js.api import (
        AckPolicy,
        ConsumerConfig,
        DeliverPolicy,
        KeyValueConfig,
        RetentionPolicy,
        StorageType,
        StreamConfig,
    )

    for name, subjects in ((TASKS_STREAM, TASK_SUBJECTS), (RESULTS_STREAM, RESULT_SUBJECTS)):
        cfg = StreamConfig(
            name=name,
            subjects=[subjects],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            duplicate_window=120.0,
        )
        try:
            await js.add_stream(cfg)
        except Exception:
            await js.update_stream(cfg)
    for stream, durable in ((TASKS_STREAM, WORKER_CONSUMER), (RESULTS_STREAM, ORCH_CONSUMER)):
        await js.add_consumer(
            stream,
            ConsumerConfig(
                durable_name=durable,
                ack_policy=AckPolicy.EXPLICIT,
                deliver_policy=DeliverPolicy.ALL,
                ack_wait=30,
                max_deliver=-1,
                max_ack_pending=-1,
                max_waiting=512,
            ),
        )
    with contextlib.suppress(Exception):
        await js.create_key_value(KeyValueConfig(bucket=RUNS_BUCKET, history=1, storage=StorageType.FILE))


class Baseline:
    """The orchestrator side: runs chains and fan-outs over the baseline's streams."""

    name = "baseline"

    def __init__(self, nc: Any, concurrency: int = 1024, transport: str = "nats-py") -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.concurrency = concurrency
        self.transport = Transport(nc, transport)
        self._waiters: dict[tuple[str, int], asyncio.Future[int]] = {}
        self._consumer: PullConsumer | None = None

    async def start(self) -> None:
        await ensure_infrastructure(self.js)
        await self.transport.open()
        self._consumer = PullConsumer(
            self.nc, RESULTS_STREAM, ORCH_CONSUMER, self._on_result, concurrency=self.concurrency
        )
        await self._consumer.start()

    async def stop(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()

    async def _on_result(self, msg: Any) -> None:
        d = json.loads(msg.data)
        run, step = d["r"], d["s"]
        await self.transport.put(f"{run}.{step}", msg.data)  # state change: the step completed
        await msg.ack()
        fut = self._waiters.pop((run, step), None)
        if fut is not None and not fut.done():
            fut.set_result(d["y"])

    async def _step(self, run: str, step: int, x: int) -> int:
        """Dispatch one task (PubAck awaited) and wait for its result to be recorded."""
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiters[(run, step)] = fut
        await self.transport.publish(
            f"bench.task.{run}", _dumps({"r": run, "s": step, "x": x}), f"{run}.{step}"
        )
        return await fut

    async def _begin(self, shape: str, n: int) -> str:
        run = uuid.uuid4().hex[:16]
        await self.transport.put(run, _dumps({"phase": "Running", "shape": shape, "n": n}))
        return run

    async def chain(self, n: int, x: int = 0) -> int:
        """n sequential steps, each fed the previous output; returns the last output."""
        run = await self._begin("chain", n)
        for step in range(n):
            x = await self._step(run, step, x)
        await self.transport.put(run, _dumps({"phase": "Succeeded", "output": x}))
        return x

    async def fan(self, n: int, window: int | None = None, *, summary: bool = False) -> Any:
        """n items at once (at most `window` in flight), then joined in item order.

        Returns the ordered outputs, or their count when `summary` (what a 10,000-item
        fan-out keeps in its run record)."""
        run = await self._begin("fan", n)
        gate = asyncio.Semaphore(window or n)

        async def item(i: int) -> int:
            async with gate:
                return await self._step(run, i, i)

        outputs = list(await asyncio.gather(*(item(i) for i in range(n))))
        result: Any = len(outputs) if summary else outputs
        await self.transport.put(run, _dumps({"phase": "Succeeded", "output": result}))
        return result


# ---------------------------------------------------------------------- worker


async def serve_worker(
    url: str, concurrency: int, transport: str = "nats-py", creds: str | None = None
) -> None:
    """The baseline's worker process: x -> x + 1, result durable before the task's ack."""
    import nats

    options: dict[str, Any] = {"user_credentials": creds} if creds else {}
    nc = await nats.connect(url, max_reconnect_attempts=-1, name="bench-baseline-worker", **options)
    out_path = Transport(nc, transport)

    async def handle(msg: Any) -> None:
        d = json.loads(msg.data)
        out = _dumps({"r": d["r"], "s": d["s"], "y": d["x"] + 1})
        await out_path.publish(f"bench.result.{d['r']}", out, f"{d['r']}.{d['s']}.res")
        await msg.ack()

    consumer = PullConsumer(nc, TASKS_STREAM, WORKER_CONSUMER, handle, concurrency=concurrency)
    await consumer.start()
    await nc.flush()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("READY", flush=True)
    await stop.wait()
    await consumer.stop()
    with contextlib.suppress(Exception):
        await nc.drain()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="raw JetStream baseline worker")
    parser.add_argument("role", choices=["worker"])
    parser.add_argument("url")
    parser.add_argument("--concurrency", type=int, default=1024)
    parser.add_argument("--transport", choices=TRANSPORTS, default="nats-py")
    parser.add_argument("--creds", default=None, help="a NATS .creds file (run.py --secure)")
    args = parser.parse_args(argv)
    asyncio.run(serve_worker(args.url, args.concurrency, args.transport, args.creds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
