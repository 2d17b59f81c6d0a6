"""Shared context on a real nats-server with real agent processes: `keys()` lists exactly
the run's existing keys, `update()` is an atomic read-modify-write (compare-and-swap,
retried on conflict, bounded), `update_sync` serves sync handlers, and every write is in
the run's audit trail (key, step, attempt, revision; never the value)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import nats
import pytest
from cadenza._context import KVContext
from cadenza_operator.engine.infra import ensure_infrastructure
from cadenza_operator.local.nats_server import NatsServer

from ..conftest import cadenza
from .harness import agent_manifest, run_project, unique_namespace, write_project

ITEMS = 20

AGENTS = """
import os
import sys

import nats
from cadenza import Agent

ctx = Agent("ctx")
syncer = Agent("syncer")


@ctx.handler
async def handle(task):
    mode = task.input["mode"]
    if mode == "count":  # every item at once, in two processes: no increment may be lost
        return await task.context.update("counter", lambda n: n + 1, default=0)
    if mode == "absent":
        return await task.context.update("findings", lambda seen: seen + ["first"], default=[])
    if mode == "keys":
        for key in ("alpha", "beta", "gone", "purged"):
            await task.context.put(key, "s3cr3t-" + key)
        nc = await nats.connect(os.environ["CADENZA_NATS_URL"])
        try:
            kv = await nc.jetstream().key_value("cadenza_context")
            scope = f"{task.namespace}.{task.run_id}"  # the bucket's keys: <namespace>.<scope>.<key>
            await kv.delete(f"{scope}.gone")
            await kv.purge(f"{scope}.purged")
            await kv.put(f"{scope}0.prefix", b"1")  # a scope whose name has this one as prefix
            await kv.put(f"{scope}.nested.deeper", b"1")  # the key of a scope '<run>.nested'
            await kv.put(f"{task.namespace}.other-{task.run_id}.stranger", b"1")
            await kv.put(f"other-{scope}.stranger", b"1")  # the same scope in another namespace
        finally:
            await nc.close()
        return await task.context.keys()
    return {k: await task.context.get(k) for k in ("counter", "findings", "synced")}


@syncer.handler
def sync_handle(task):  # a sync handler runs in a thread: the *_sync forms
    return task.context.update_sync("synced", lambda v: {**v, "by": "sync"}, default={"n": 1})


if __name__ == "__main__":
    {"ctx": ctx, "syncer": syncer}[sys.argv[1]].run()
"""

WORKFLOW = f"""
---
apiVersion: cadenza.dev/v1alpha1
kind: Workflow
metadata: {{name: shared}}
spec:
  steps:
    - name: count
      agent: ctx
      forEach: "input.items"
      maxParallel: {ITEMS}
      input: {{mode: count}}
    - name: absent
      agent: ctx
      input: {{mode: absent}}
    - name: synced
      agent: syncer
      input: {{mode: sync}}
    - name: listing
      agent: ctx
      dependsOn: [count, absent, synced]
      input: {{mode: keys}}
    - name: final
      agent: ctx
      dependsOn: [listing]
      input: {{mode: read}}
  output:
    counts: "${{{{ steps.count.output }}}}"
    keys: "${{{{ steps.listing.output }}}}"
    final: "${{{{ steps.final.output }}}}"
    absent: "${{{{ steps.absent.output }}}}"
    synced: "${{{{ steps.synced.output }}}}"
"""


async def audit_json(nats_url: str, namespace: str, run: str) -> list[dict[str, Any]]:
    """`cadenza audit RUN --output json`, read again until it holds the run's end (the
    engine publishes a decision's records after it commits the decision)."""
    for _ in range(60):
        result = await asyncio.to_thread(
            cadenza, "audit", run, "--output", "json", "--nats", nats_url, "--namespace", namespace
        )
        assert result.returncode == 0, result.stderr
        records: list[dict[str, Any]] = json.loads(result.stdout)
        if any(r["step"] is None and r["to"] == "Succeeded" for r in records):
            return records
        await asyncio.sleep(0.2)
    raise AssertionError(f"the audit trail of {run} never showed its end")


async def test_a_run_counts_lists_and_audits_its_shared_context(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    manifests = (
        agent_manifest("ctx", replicas=2, concurrency=ITEMS // 2)
        + "---"
        + agent_manifest("syncer")
        + WORKFLOW
    )
    root = write_project(tmp_path / "proj", AGENTS, manifests)
    namespace = unique_namespace()
    summary, code = await run_project(
        root, nats_server.url, input={"items": list(range(ITEMS))}, namespace=namespace, timeout=120
    )
    assert code == 0, summary
    out = summary["outputs"]
    # Each increment saw its own value: none was lost, none was applied twice.
    assert sorted(out["counts"]) == list(range(1, ITEMS + 1))
    assert out["final"] == {"counter": ITEMS, "findings": ["first"], "synced": {"n": 1, "by": "sync"}}
    assert out["absent"] == ["first"]  # update of an absent key starts from the default
    assert out["synced"] == {"n": 1, "by": "sync"}
    # This run's existing keys only: not deleted or purged ones, nor those of other scopes.
    assert out["keys"] == ["alpha", "beta", "counter", "findings", "synced"]

    records = await audit_json(nats_server.url, namespace, summary["run"])
    writes = [r for r in records if r["event"] == "context"]
    counted = [r for r in writes if r["step"] == "count"]
    assert sorted(r["item"] for r in counted) == list(range(ITEMS))
    assert {r["key"] for r in counted} == {"counter"} and {r["attempt"] for r in counted} == {1}
    assert len({r["revision"] for r in counted}) == ITEMS  # one revision per write
    by_step = {(r["step"], r["key"]) for r in writes if r["step"] != "count"}
    assert by_step == {
        ("absent", "findings"),
        ("synced", "synced"),
        ("listing", "alpha"),
        ("listing", "beta"),
        ("listing", "gone"),
        ("listing", "purged"),
    }
    assert all(isinstance(r["revision"], int) and r["revision"] > 0 for r in writes)
    assert "s3cr3t" not in json.dumps(records)  # keys and revisions, never values
    # Written before their step ended: each write precedes its step's Succeeded.
    ended = {r["step"]: r["seq"] for r in records if r["to"] == "Succeeded" and r["step"]}
    assert all(r["seq"] < ended[r["step"]] for r in writes)


# ---------------------------------------------------------------- KVContext on its own


NS = "ctx-ns"


@pytest.fixture
async def contexts(nats_server: NatsServer) -> Any:
    """Two connections (two agent processes), and the context bucket to inspect it directly."""
    first, second = await nats.connect(nats_server.url), await nats.connect(nats_server.url)
    await ensure_infrastructure(first.jetstream())
    kv = await first.jetstream().key_value("cadenza_context")
    yield first, kv, (first, second)
    await first.close()
    await second.close()


async def test_keys_reads_neither_values_nor_other_scopes(contexts: Any) -> None:
    nc, kv, _ = contexts
    scope = unique_namespace()
    ctx = KVContext(nc, NS, scope)
    big = "x" * 200_000
    for n in range(10):
        await ctx.put(f"k{n}", big)
    await kv.delete(f"{NS}.{scope}.k3")
    await kv.purge(f"{NS}.{scope}.k4")
    await kv.put(f"{NS}.{scope}x.k5", b"1")
    await kv.put(f"{NS}.{scope}.sub.k6", b"1")
    await kv.put(f"other-{NS}.{scope}.k7", b"1")  # the same scope in another namespace
    await nc.flush()
    before = nc.stats["in_bytes"]
    assert await ctx.keys() == ["k0", "k1", "k2", "k5", "k6", "k7", "k8", "k9"]
    assert nc.stats["in_bytes"] - before < len(big)  # 2 MB of values stayed on the server
    assert await KVContext(nc, NS, f"{scope}-empty").keys() == []
    assert await KVContext(nc, f"other-{NS}", scope).keys() == ["k7"]


async def test_a_conflicting_write_makes_update_read_again_and_retry(contexts: Any) -> None:
    _, _, (nc, other_nc) = contexts
    scope = unique_namespace()
    ours, theirs = KVContext(nc, NS, scope), KVContext(other_nc, NS, scope)
    seen: list[Any] = []

    async def add_one(n: int) -> int:
        seen.append(n)
        if len(seen) == 1:  # another agent writes between our read and our write
            await theirs.put("n", 100)
        return n + 1

    assert await ours.update("n", add_one, default=0) == 101
    assert seen == [0, 100]  # read again after the conflict, not written over
    assert await theirs.get("n") == 101


async def test_two_updaters_hammering_one_key_lose_nothing(contexts: Any) -> None:
    _, _, ncs = contexts
    scope = unique_namespace()
    calls = 0

    def add_one(n: int) -> int:
        nonlocal calls
        calls += 1
        return n + 1

    each = 25
    results = await asyncio.gather(
        *(KVContext(nc, NS, scope).update("n", add_one, default=0) for nc in ncs for _ in range(each))
    )
    assert sorted(results) == list(range(1, 2 * each + 1))
    assert await KVContext(ncs[0], NS, scope).get("n") == 2 * each
    assert calls > 2 * each  # there were conflicts, and each was retried


async def test_update_gives_up_with_a_clear_error_after_many_conflicts(contexts: Any) -> None:
    _, _, (nc, other_nc) = contexts
    scope = unique_namespace()
    ours, theirs = KVContext(nc, NS, scope), KVContext(other_nc, NS, scope)
    ours.max_attempts = 5
    from cadenza import ContextConflict  # part of the SDK's surface, for handlers that catch it

    async def always_overtaken(n: int) -> int:
        await theirs.put("n", n + 10)
        return n + 1

    with pytest.raises(ContextConflict, match=r"context key 'n'.*5 times"):
        await ours.update("n", always_overtaken, default=0)


async def test_update_starts_a_deleted_key_again_from_the_default(contexts: Any) -> None:
    nc, kv, _ = contexts
    scope = unique_namespace()
    ctx = KVContext(nc, NS, scope)
    await ctx.put("list", ["old"])
    await kv.delete(f"{NS}.{scope}.list")
    assert await ctx.update("list", lambda v: [*v, "new"], default=[]) == ["new"]
    assert await ctx.keys() == ["list"]
