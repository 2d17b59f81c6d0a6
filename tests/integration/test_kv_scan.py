"""`engine.infra.current_entries`: every current value of a bucket's keys, once each, also
while other keys are written as fast as three clients can (where reading nats-py's watch
up to its first None missed keys in about 6 scans of 100, once all of them). Used by
`cadenza list` and `diagnose`, the console, the timer sweep, and the engine's loading of
forEach outputs. Real nats-server; bounded in scans and writes."""

from __future__ import annotations

import asyncio
from contextlib import aclosing
from typing import Any

import nats
import pytest
from cadenza_operator.engine.infra import current_entries
from cadenza_operator.local.nats_server import NatsServer

from .harness import poll

STABLE, HOT_WRITERS, HOT_KEYS, SCANS = 40, 3, 50, 30


async def scan(js: Any, bucket: str, kv: Any, keys: str = ">", **options: Any) -> list[Any]:
    async with aclosing(current_entries(js, bucket, kv, keys, **options)) as entries:
        return [entry async for entry in entries]


@pytest.mark.parametrize("history", [1, 8])
async def test_every_key_is_seen_once_while_others_are_written(fresh_nats: NatsServer, history: int) -> None:
    nc = await nats.connect(fresh_nats.url)
    js = nc.jetstream()
    kv = await js.create_key_value(bucket="scanned", history=history)
    for i in range(STABLE):
        await kv.put(f"stable.{i}", b"s")
    for w in range(HOT_WRITERS):
        for k in range(HOT_KEYS):
            await kv.put(f"hot.{w}.{k}", b"0")
    expected = {f"stable.{i}" for i in range(STABLE)} | {
        f"hot.{w}.{k}" for w in range(HOT_WRITERS) for k in range(HOT_KEYS)
    }
    stop = asyncio.Event()

    async def writer(w: int) -> int:
        own = await nats.connect(fresh_nats.url)
        own_kv = await own.jetstream().key_value("scanned")
        n = 0
        try:
            while not stop.is_set():  # every key of its own, again and again
                await own_kv.put(f"hot.{w}.{n % HOT_KEYS}", str(n).encode())
                n += 1
        finally:
            await own.close()
        return n

    writers = [asyncio.create_task(writer(w)) for w in range(HOT_WRITERS)]
    try:
        for _ in range(SCANS):
            entries = await scan(js, "scanned", kv)
            keys = [entry.key for entry in entries]
            assert len(keys) == len(set(keys)), "a key given twice"
            assert set(keys) == expected, sorted(expected - set(keys))[:10]
            revisions = [entry.revision for entry in entries]
            assert revisions == sorted(revisions)
    finally:
        stop.set()
        written = await asyncio.gather(*writers)
        await nc.close()
    assert min(written) > 0  # the writers did write while the scans ran


async def test_a_filter_deletes_and_an_empty_bucket(fresh_nats: NatsServer) -> None:
    nc = await nats.connect(fresh_nats.url)
    js = nc.jetstream()
    try:
        kv = await js.create_key_value(bucket="outputs-like", history=1)
        assert await scan(js, "outputs-like", kv) == []  # nothing: at once, no wait for a marker
        for i in range(5):
            await kv.put(f"run1.fan.{i}", str(i).encode())
        await kv.put("run1.other", b"x")
        await kv.put("run2.fan.0", b"y")
        await kv.delete("run1.fan.3")
        await kv.put("run1.fan.1", b"again")
        items = await scan(js, "outputs-like", kv, "run1.fan.*")
        assert {e.key: e.value for e in items} == {
            "run1.fan.0": b"0",
            "run1.fan.1": b"again",
            "run1.fan.2": b"2",
            "run1.fan.4": b"4",
        }
        with_deletes = await scan(js, "outputs-like", kv, "run1.fan.*", deletes=True)
        assert [(e.key, e.operation) for e in with_deletes if e.key == "run1.fan.3"] == [
            ("run1.fan.3", "DEL")
        ]
        assert await scan(js, "outputs-like", kv, "nosuch.*") == []
    finally:
        await nc.close()


class WatchedLate:
    """A bucket handle whose watch starts only after `before` has run: the interleaving
    of a scan that learns where it ends, then finds that message gone before its turn."""

    def __init__(self, kv: Any, before: Any) -> None:
        self._kv, self._before = kv, before

    async def watch(self, *args: Any, **kwargs: Any) -> Any:
        await self._before()
        return await self._kv.watch(*args, **kwargs)


@pytest.mark.parametrize("written_meanwhile", [False, True])
async def test_a_scan_whose_end_expires_before_its_turn_still_ends(
    fresh_nats: NatsServer, written_meanwhile: bool
) -> None:
    nc = await nats.connect(fresh_nats.url)
    js = nc.jetstream()
    try:
        kv = await js.create_key_value(bucket="aging", history=1, ttl=1.0)  # max age 1 s
        for key in ("a", "b"):
            await kv.put(key, b"old")

        async def expired() -> None:
            async def gone() -> bool:  # the server removes both by age about a second on
                return not (await js.stream_info("KV_aging")).state.messages

            await poll(gone, timeout=30)
            if written_meanwhile:
                await kv.put("c", b"new")

        # Without asking again where the scan ends, it would wait for message 2 forever.
        # Bounded past the wait for expiry inside, so that wait's own message is what fails.
        entries = await asyncio.wait_for(scan(js, "aging", WatchedLate(kv, expired)), timeout=60)
        assert [(e.key, e.value) for e in entries] == ([("c", b"new")] if written_meanwhile else [])
    finally:
        await nc.close()
