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
