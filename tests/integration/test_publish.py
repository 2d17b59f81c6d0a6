"""cadenza._publish.Publisher on a real nats-server: acks, KV compare-and-swap, errors, timeouts."""

from __future__ import annotations

import asyncio
import uuid

import nats
import nats.errors
import nats.js.errors
import pytest
from cadenza._publish import Publisher
from cadenza_operator.local.nats_server import NatsServer

from .harness import poll


async def test_concurrent_publishes_each_get_their_own_ack(nats_server: NatsServer) -> None:
    nc = await nats.connect(nats_server.url)
    name = f"PUB{uuid.uuid4().hex[:8]}"
    await nc.jetstream().add_stream(name=name, subjects=[f"{name}.>"])
    pub = Publisher(nc)
    try:
        seqs = await asyncio.gather(*(pub.publish(f"{name}.x", str(i).encode()) for i in range(500)))
        assert sorted(seqs) == list(range(1, 501))
        for seq in (1, 250, 500):  # each ack names the sequence its own message got
            stored = await nc.jetstream().get_msg(name, seq)
            assert seqs[int(stored.data)] == seq
        # a Nats-Msg-Id duplicate is acknowledged with the first message's sequence
        first = await pub.publish(f"{name}.x", b"once", {"Nats-Msg-Id": "m1"})
        assert await pub.publish(f"{name}.x", b"once", {"Nats-Msg-Id": "m1"}) == first
        assert not pub._pending
    finally:
        await pub.close()
        await nc.close()


async def test_kv_compare_and_swap(nats_server: NatsServer) -> None:
    nc = await nats.connect(nats_server.url)
    bucket = f"pub_{uuid.uuid4().hex[:8]}"
    kv = await nc.jetstream().create_key_value(bucket=bucket)
    pub = Publisher(nc)
    try:
        first = await pub.kv_update(bucket, "k", b"1", last=0)
        with pytest.raises(nats.js.errors.KeyWrongLastSequenceError):
            await pub.kv_update(bucket, "k", b"again", last=0)  # create of an existing key
        second = await pub.kv_update(bucket, "k", b"2", last=first)
        with pytest.raises(nats.js.errors.KeyWrongLastSequenceError):
            await pub.kv_update(bucket, "k", b"stale", last=first)
        assert (await kv.get("k")).value == b"2"
        assert await pub.kv_put(bucket, "k", b"3") == second + 1
    finally:
        await pub.close()
        await nc.close()


async def test_errors_and_timeouts(nats_server: NatsServer) -> None:
    nc = await nats.connect(nats_server.url)
    silent = await nc.subscribe("pub.silent")  # a responder that never answers
    pub = Publisher(nc, timeout=0.3)
    try:
        with pytest.raises(nats.js.errors.NoStreamResponseError):
            await pub.publish(f"nostream.{uuid.uuid4().hex}", b"")
        results = await asyncio.gather(
            *(pub.publish("pub.silent", b"") for _ in range(3)), return_exceptions=True
        )
        assert all(isinstance(r, nats.errors.TimeoutError) for r in results)
        assert not pub._pending and pub._sweep is None  # nothing left behind to fire
    finally:
        await silent.unsubscribe()
        await pub.close()
        await nc.close()


async def test_sends_reach_the_stream_in_their_order_and_settle_together(nats_server: NatsServer) -> None:
    """What the engine relies on to mark claims ahead of its record write without a task
    per publish: sends made one after another are stored in that order, each PubAck is
    the sequence of its own message, and a lost compare-and-swap among them is the
    KeyWrongLastSequenceError of `acked(kv=True)`."""
    nc = await nats.connect(nats_server.url)
    bucket = f"pub_{uuid.uuid4().hex[:8]}"
    kv = await nc.jetstream().create_key_value(bucket=bucket)
    pub = Publisher(nc)
    try:
        marks = [await pub.send(f"$KV.{bucket}.mark{i}", b"abandoned") for i in range(200)]
        write = await pub.send_kv_update(bucket, "record", b"r1", last=0)
        revision = await pub.acked(write, kv=True)
        await pub.settle(marks)
        assert [await pub.acked(m) for m in marks] == list(range(1, 201))
        assert revision == 201  # after every mark sent before it
        stale = await pub.send_kv_update(bucket, "record", b"r2", last=0)
        with pytest.raises(nats.js.errors.KeyWrongLastSequenceError):
            await pub.acked(stale, kv=True)
        assert (await kv.get("record")).value == b"r1"
        assert not pub._pending
    finally:
        await pub.close()
        await nc.close()


async def test_settle_raises_the_first_failure_after_awaiting_all(nats_server: NatsServer) -> None:
    nc = await nats.connect(nats_server.url)
    name = f"PUB{uuid.uuid4().hex[:8]}"
    await nc.jetstream().add_stream(name=name, subjects=[f"{name}.>"])
    silent = await nc.subscribe("pub.silent2")  # never answers: its send times out
    pub = Publisher(nc, timeout=0.3)
    lost: list[dict[str, object]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, context: lost.append(context))
    try:
        sent = [
            await pub.send(f"{name}.a", b"1"),
            await pub.send(f"nostream.{uuid.uuid4().hex}", b""),  # 503: no stream
            await pub.send("pub.silent2", b""),
            await pub.send(f"{name}.b", b"2"),
        ]
        with pytest.raises(nats.js.errors.NoStreamResponseError):
            await pub.settle(sent)
        assert all(f.done() for f in sent)  # the timeout after it was awaited too
        assert (await nc.jetstream().stream_info(name)).state.messages == 2

        # Discarded: nothing is left whose failure nobody observed, whether it had timed
        # out already (its TimeoutError is observed) or not yet (cancelled: it takes none).
        expired = [await pub.send("pub.silent2", b"") for _ in range(3)]
        await asyncio.wait(expired)  # the publisher's timeout (0.3 s) sets their TimeoutError
        waiting = [await pub.send("pub.silent2", b"") for _ in range(3)]
        pub.discard(expired + waiting)

        async def swept() -> bool | None:  # the sweep has passed the cancelled ones too
            return not pub._pending or None

        await poll(swept, timeout=10)
        del expired, waiting, sent
        import gc

        gc.collect()
        await asyncio.sleep(0)
        assert not [c for c in lost if "never retrieved" in str(c.get("message"))], lost
        assert not pub._pending
    finally:
        loop.set_exception_handler(None)
        await silent.unsubscribe()
        await pub.close()
        await nc.close()
