"""Triggers of several engines at once (real nats-server, two engines in one process).

The runs a workflow's triggers started are tracked in one key of the triggers bucket; the
concurrency policies (Forbid, Replace, maxActiveRuns) read it. Two engines handling events
of the same workflow at the same time must both land their runs in it.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import pytest
from cadenza_operator.engine.runtime import Engine, EngineSettings
from cadenza_operator.engine.triggers import TRIGGERS_STREAM, Triggers
from cadenza_operator.local.nats_server import NatsServer
from cadenza_operator.manifests import load

from .harness import poll, unique_namespace, write_project

EVENTS = 24

# No agent: an approval step keeps every run active without agent processes.
WORKFLOW = """
apiVersion: cadenza.dev/v1alpha1
kind: Workflow
metadata: {{name: paged}}
spec:
  triggers:
    - nats: {{subject: "{subject}"}}
  concurrencyPolicy: Allow
  steps:
    - name: gate
      approval: {{}}
"""


@contextlib.asynccontextmanager
async def engine_with_triggers(url: str, started: list[str]) -> AsyncIterator[Triggers]:
    """An engine and its triggers; `started` collects the runs its triggers start."""
    nc = await nats.connect(url)
    engine = Engine(nc, EngineSettings())
    await engine.open()
    await engine.start()
    triggers = Triggers(engine, on_started=lambda _wf, run, _how: started.append(run))
    await triggers.start()
    try:
        yield triggers
    finally:
        await triggers.stop()
        await engine.stop()
        await nc.close()


async def publish_when_both_pull(js: Any, durable: str, subject: str) -> None:
    """EVENTS events at once, once both engines wait on the workflow's trigger consumer
    (so both take events at the same time)."""

    async def both_pulling() -> bool:
        return bool((await js.consumer_info(TRIGGERS_STREAM, durable)).num_waiting >= 2)

    await poll(both_pulling, 60.0)
    for i in range(EVENTS):
        await js.publish(subject, json.dumps({"i": i}).encode())


async def test_concurrent_trigger_events_on_two_engines_track_every_run(
    tmp_path: Path, fresh_nats: NatsServer
) -> None:
    namespace = unique_namespace()
    subject = f"alerts.{namespace}"
    bundle = load([write_project(tmp_path / "p", "", WORKFLOW.format(subject=subject))], namespace=namespace)
    wf = bundle.compiled["paged"]
    durable = f"trigger_{namespace}_paged"
    by_one: list[str] = []
    by_two: list[str] = []
    async with (
        engine_with_triggers(fresh_nats.url, by_one) as one,
        engine_with_triggers(fresh_nats.url, by_two) as two,
    ):
        await one.set_workflow(wf)
        await two.set_workflow(wf)  # the same durable consumer: the two engines compete for events
        nc = await nats.connect(fresh_nats.url)
        js = nc.jetstream()
        try:
            await publish_when_both_pull(js, durable, subject)

            async def all_handled() -> bool:
                info = await js.consumer_info(TRIGGERS_STREAM, durable)
                return bool(
                    info.num_pending == 0
                    and info.num_ack_pending == 0
                    and info.ack_floor.consumer_seq >= EVENTS
                )

            await poll(all_handled, 60.0)
            info = await js.stream_info(TRIGGERS_STREAM)
            started = {f"paged-t{seq}" for seq in range(info.state.first_seq, info.state.last_seq + 1)}
            assert len(started) == EVENTS

            async def all_started() -> bool:
                return all([await one.engine.client.get(run) is not None for run in started])

            await poll(all_started, 60.0)
            # Both engines started runs (else nothing here ran concurrently)...
            assert by_one and by_two
            assert sorted(by_one + by_two) == sorted(started)
            # ...and every run they started is tracked: none lost to a concurrent write.
            assert sorted(await one.active_runs(wf)) == sorted(started)
            assert sorted(await two.active_runs(wf)) == sorted(started)
        finally:
            await nc.close()


POLICED = """
apiVersion: cadenza.dev/v1alpha1
kind: Workflow
metadata: {{name: paged}}
spec:
  triggers:
    - nats: {{subject: "{subject}"}}
  concurrencyPolicy: {policy}
  {limit}
  steps:
    - name: gate
      approval: {{}}
"""


@pytest.mark.parametrize("policy", ["Forbid", "Allow"])
async def test_two_engines_never_admit_more_runs_than_the_policy_allows(
    tmp_path: Path, fresh_nats: NatsServer, policy: str
) -> None:
    """Forbid, or maxActiveRuns: 1: one run, however many events arrive at once on two
    engines. Before admission and tracking were one compare-and-swap, both engines read
    the runs active before the other's start, and both started."""
    namespace = unique_namespace()
    subject = f"alerts.{namespace}"
    limit = "maxActiveRuns: 1" if policy == "Allow" else ""
    manifest = POLICED.format(subject=subject, policy=policy, limit=limit)
    wf = load([write_project(tmp_path / "p", "", manifest)], namespace=namespace).compiled["paged"]
    durable = f"trigger_{namespace}_paged"
    started: list[str] = []
    async with (
        engine_with_triggers(fresh_nats.url, started) as one,
        engine_with_triggers(fresh_nats.url, started) as two,
    ):
        await one.set_workflow(wf)
        await two.set_workflow(wf)
        nc = await nats.connect(fresh_nats.url)
        js = nc.jetstream()
        try:
            await publish_when_both_pull(js, durable, subject)

            async def decided() -> bool:
                info = await js.consumer_info(TRIGGERS_STREAM, durable)
                if policy == "Forbid":  # every event started or skipped, and acknowledged
                    return bool(info.num_pending == 0 and info.num_ack_pending == 0)
                return bool(info.num_ack_pending == 2)  # each engine holds an event that waits

            await poll(decided, 60.0)
            assert len(started) == 1, started
            assert await one.active_runs(wf) == started
        finally:
            await nc.close()
