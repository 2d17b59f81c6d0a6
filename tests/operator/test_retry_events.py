"""A retry of a run that a WorkflowRun follows leaves a `Retried` Event on that WorkflowRun,
naming the retry's WorkflowRun: once per retry, however often the operator is told of it (a
request asked again, two engines answering it), and none on a WorkflowRun that does not follow
the retried run. A retry started by a program calling `RunClient.retry` itself (no engine's
hook told) is found in the runs bucket by the operator's run feed, and mirrored the same way.
The real operator, the Kubernetes API emulator and a real nats-server."""

from __future__ import annotations

import asyncio
import types
from typing import Any

import nats
import pytest
from cadenza.wire import RUNS_BUCKET
from cadenza_operator.engine.client import RunClient
from cadenza_operator.engine.state import RunState
from cadenza_operator.kube.events import MAX_NAME, once_name
from cadenza_operator.kube.feed import RunFeed
from cadenza_operator.kube.runs import RUN_ID_ANNOTATION, mirror_started_run, mirrored_run_name
from cadenza_operator.local.nats_server import NatsServer

from ..kube.emulator import KubeEmulator
from ..kube.fixtures import wait_for
from .harness import (
    EVENTS,
    NAMESPACE,
    WORKFLOWRUNS,
    RunningOperator,
    ask_control,
    gate_workflow,
    get,
    manifest,
    rejected_workflowrun,
    status_of,
    step_phase,
)

pytestmark = pytest.mark.timeout(120)


def _retried(emulator: KubeEmulator) -> list[dict[str, Any]]:
    """Every `Retried` Event in the namespace, whichever object it is about."""
    return [e for e in emulator.list_objects(EVENTS, NAMESPACE) if e.get("reason") == "Retried"]


async def test_a_retry_posts_one_retried_event_on_the_retried_workflowrun(
    kube_emulator: KubeEmulator, operator: RunningOperator
) -> None:
    await gate_workflow(kube_emulator, "gated-events")
    first_run = await rejected_workflowrun(kube_emulator, "gated-events", "first")
    assert _retried(kube_emulator) == []

    # Asked twice (the engine tells its hook each time), then a second engine tells its own.
    request = {"op": "retry", "run": first_run, "from": "gate", "by": "ada", "key": "retry-1"}
    replies = [await ask_control(operator, dict(request)) for _ in range(2)]
    assert all(r["ok"] for r in replies), replies
    (new_run,) = {r["newRun"] for r in replies}

    async def second_engine(ctx: Any) -> None:
        state = await ctx.client.get(new_run)
        wf = await ctx.client.definition(state.definition)
        info = {"source": "retry", "retryOf": first_run, "from": "gate", "by": "ada"}
        await mirror_started_run(ctx, wf, new_run, info)

    await operator.call(second_engine)

    # Posted before the engine replied (the hook runs first): there now, and only once.
    (event,) = _retried(kube_emulator)
    first = get(kube_emulator, WORKFLOWRUNS, "first")
    assert first is not None
    involved = event["involvedObject"]
    assert (involved["kind"], involved["name"], involved["uid"]) == (
        "WorkflowRun",
        "first",
        first["metadata"]["uid"],
    )
    assert event["type"] == "Normal"
    mirror = mirrored_run_name(new_run)
    assert get(kube_emulator, WORKFLOWRUNS, mirror) is not None
    message = event["message"]
    assert f"WorkflowRun {mirror}" in message and new_run in message, message
    assert "--from gate" in message and "by ada" in message, message

    # Another retry of the same run (another key) is another Event, naming its own WorkflowRun.
    other = await ask_control(operator, {"op": "retry", "run": first_run, "by": "bo", "key": "retry-2"})
    assert other["ok"] and other["newRun"] != new_run, other
    events = _retried(kube_emulator)
    assert len(events) == 2
    (second,) = [e for e in events if e["metadata"]["name"] != event["metadata"]["name"]]
    assert f"WorkflowRun {mirrored_run_name(other['newRun'])}" in second["message"]
    assert "--from" not in second["message"] and "by bo" in second["message"]
    assert second["involvedObject"]["name"] == "first"


async def test_a_retry_of_a_run_no_workflowrun_follows_posts_no_event(
    kube_emulator: KubeEmulator, operator: RunningOperator
) -> None:
    """A run started by `cadenza run` (no WorkflowRun): its retry is mirrored, nothing fails,
    and no Event lands on a WorkflowRun that merely has the name the run would be mirrored
    under while following a run of its own."""
    await gate_workflow(kube_emulator, "gated-direct")

    async def start(ctx: Any) -> str:
        wf = await ctx.client.latest_definition(NAMESPACE, "gated-direct")
        run: str = await ctx.client.start(wf, {"v": 1})
        return run

    first_run = await operator.call(start)
    lookalike = mirrored_run_name(first_run)
    kube_emulator.create_object(
        WORKFLOWRUNS, manifest("WorkflowRun", lookalike, {"workflowRef": "gated-direct"})
    )
    await wait_for(lambda: step_phase(kube_emulator, lookalike, "gate") == "WaitingApproval", timeout=30)
    own = (get(kube_emulator, WORKFLOWRUNS, lookalike) or {})["metadata"]["annotations"][RUN_ID_ANNOTATION]
    assert own != first_run

    async def reject(ctx: Any) -> str:
        await ctx.client.approve(NAMESPACE, first_run, "gate", False, by="ada")
        for _ in range(600):  # a bounded poll, 30 s
            state = await ctx.client.get(first_run)
            if state is not None and state.phase == "Failed":
                return str(state.phase)
            await asyncio.sleep(0.05)
        return "not failed"

    assert await operator.call(reject) == "Failed"
    reply = await ask_control(operator, {"op": "retry", "run": first_run, "by": "ada", "key": "direct"})
    assert reply["ok"], reply
    new_run = reply["newRun"]
    assert get(kube_emulator, WORKFLOWRUNS, mirrored_run_name(new_run)) is not None
    assert _retried(kube_emulator) == []

    # The same, found by the run feed: the mirror follows its run, still no Event anywhere.
    async def retry(ctx: Any) -> str:
        client = await RunClient(ctx.nc).open()
        try:
            run: str = await client.retry(NAMESPACE, first_run, by="script", key="direct-2")
        finally:
            await client.close()
        return run

    found = mirrored_run_name(await operator.call(retry))
    await wait_for(lambda: status_of(kube_emulator, WORKFLOWRUNS, found).get("runId"), timeout=30)
    assert _retried(kube_emulator) == []


async def test_a_retry_started_by_calling_the_client_is_mirrored_with_its_event(
    kube_emulator: KubeEmulator, operator: RunningOperator, fresh_nats: NatsServer
) -> None:
    """A program with its own connection calls `RunClient.retry`: no engine answers a request,
    no hook is told; the operator finds the retry's record in the runs bucket."""
    await gate_workflow(kube_emulator, "gated-client")
    first_run = await rejected_workflowrun(kube_emulator, "gated-client", "asked")

    nc = await nats.connect(fresh_nats.url)
    try:
        client = await RunClient(nc).open()
        new_run = await client.retry(NAMESPACE, first_run, "gate", by="script", key="from-a-program")
        await client.close()
    finally:
        await nc.close()

    mirror = mirrored_run_name(new_run)
    await wait_for(lambda: len(_retried(kube_emulator)) == 1, timeout=30)
    (event,) = _retried(kube_emulator)
    assert event["involvedObject"]["name"] == "asked"
    assert f"WorkflowRun {mirror}" in event["message"] and new_run in event["message"]
    made = get(kube_emulator, WORKFLOWRUNS, mirror)
    assert made is not None
    assert made["metadata"]["labels"]["cadenza.dev/retry-of"] == "asked"
    assert made["metadata"]["annotations"]["cadenza.dev/retry-of-run"] == first_run

    # The mirror follows the retry: its gate waits, is approved through it, the run succeeds.
    await wait_for(lambda: step_phase(kube_emulator, mirror, "gate") == "WaitingApproval", timeout=30)
    kube_emulator.patch_object(
        WORKFLOWRUNS, NAMESPACE, mirror, {"metadata": {"annotations": {"cadenza.dev/approve": "gate"}}}
    )
    await wait_for(
        lambda: status_of(kube_emulator, WORKFLOWRUNS, mirror).get("phase") == "Succeeded", timeout=30
    )
    assert status_of(kube_emulator, WORKFLOWRUNS, mirror)["runId"] == new_run
    assert len(_retried(kube_emulator)) == 1


def test_an_events_once_name_is_a_subdomain_the_same_for_the_same_key() -> None:
    long = "w" * 253
    name = once_name(long, "Retried", "run-1")
    assert len(name) <= MAX_NAME and name == once_name(long, "Retried", "run-1")
    assert name != once_name(long, "Retried", "run-2")
    assert once_name("first", "Retried", "run-1").startswith("first.retried-")


class _Write:
    """A runs-bucket write as the feed's subscription hands it over."""

    def __init__(self, run: str, data: bytes, sequence: int) -> None:
        self.subject = f"$KV.{RUNS_BUCKET}.{run}"
        self.data = data
        self.metadata = types.SimpleNamespace(sequence=types.SimpleNamespace(stream=sequence))


async def test_the_feed_tells_of_a_retry_once_and_of_nothing_else() -> None:
    told: list[str] = []

    async def on_retry(state: RunState) -> None:
        told.append(state.run)

    feed = RunFeed(None, on_retry, retry_grace=0)
    plain = RunState(run="plain-1", workflow="w", namespace=NAMESPACE, definition="d", createdAt=1.0)
    retry = plain.model_copy(update={"run": "again-1", "retryOf": "plain-1"})
    assert b"retryOf" not in plain.to_bytes()  # what the bytes search relies on
    writes = [_Write("plain-1", plain.to_bytes(), 1), _Write("again-1", b"", 2)]  # a delete marker
    writes += [_Write("again-1", retry.to_bytes(), n) for n in (3, 4, 5)]
    writes.append(_Write("engine.sweep", b'{"retryOf": 1}', 6))  # not a run record
    for write in writes:
        await feed._on_write(write)
    for _ in range(1000):  # a bounded poll (10 s): the telling runs as a task
        if told:
            break
        await asyncio.sleep(0.01)
    for _ in range(10):  # a second telling, made with the first, would be done by now
        await asyncio.sleep(0)
    await feed.stop()
    assert told == ["again-1"]
