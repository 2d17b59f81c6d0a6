"""`cadenza_pending_approvals` equals the steps waiting for approval, whatever the decisions
(real nats-server and engine; the gauge read from prometheus_client's registry)."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable
from pathlib import Path

import nats
from cadenza._protocol import EVENTS_STREAM
from cadenza_operator.engine.client import RunClient
from cadenza_operator.engine.infra import ENGINE_CONSUMER
from cadenza_operator.local.dev import DevServer
from cadenza_operator.local.nats_server import NatsServer
from cadenza_operator.manifests import load

from .harness import poll, unique_namespace, write_project
from .metrics import summed

# No agents: `go` waits for a signal, and `boom` then fails on its `when` (the run fails
# while `gate` still waits); `gate` waits for ada, or times out after `timeout`.
WORKFLOW = """
apiVersion: cadenza.dev/v1alpha1
kind: Workflow
metadata: {{name: {name}}}
spec:
  steps:
    - name: gate
      approval: {{approvers: [ada], {timeout}}}
    - name: go
      waitFor: {{signal: go}}
    - name: boom
      dependsOn: [go]
      waitFor: {{signal: never}}
      when: "input.missing.field == 1"
"""


def pending(workflow: str) -> float:
    return summed("cadenza_pending_approvals", {"workflow": workflow})


def runs_waiting(workflow: str) -> tuple[float, float]:
    """(active runs, those waiting only on an approval or a signal): cadenza_runs_waiting."""
    return (
        summed("cadenza_active_runs", {"workflow": workflow}),
        summed("cadenza_runs_waiting", {"workflow": workflow}),
    )


async def test_the_pending_approvals_gauge_counts_the_steps_waiting(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    namespace = unique_namespace()
    name, timed = f"g{uuid.uuid4().hex[:8]}", f"t{uuid.uuid4().hex[:8]}"
    root = write_project(
        tmp_path / "p",
        "",
        WORKFLOW.format(name=name, timeout="onTimeout: reject")
        + "---"
        + WORKFLOW.format(name=timed, timeout="timeout: 1s, onTimeout: reject"),
    )
    bundle = load([root], namespace=namespace)
    async with DevServer(bundle, nats_server.url, namespace) as dev:
        nc = await nats.connect(dev.url)
        js = nc.jetstream()
        engine = dev.engine

        async def idle() -> bool:
            """The engine has handled every event sent so far."""
            info = await js.consumer_info(EVENTS_STREAM, ENGINE_CONSUMER)
            return info.num_pending == 0 and info.num_ack_pending == 0

        async def waiting(runs: list[str]) -> int:
            await poll(idle)
            count = 0
            for run in runs:
                state = await engine.client.get(run)
                assert state is not None
                count += sum(st.phase == "WaitingApproval" for st in state.steps.values())
            return count

        async def counted(workflow: str, runs: list[str]) -> tuple[float, int]:
            """The gauge and the steps waiting, the gauge read once the engine is idle: a
            record is written before its decision is observed, so reading it first races."""
            steps = await waiting(runs)
            return pending(workflow), steps

        async def phase_of(run: str, step: str) -> str:
            state = await engine.client.get(run)
            return state.steps[step].phase if state and step in state.steps else ""

        try:
            wf = bundle.compiled[name]
            runs = [await engine.client.start(wf, {}, run_id=f"{name}-{i}") for i in range(5)]
            for run in runs:
                await poll(lambda run=run: _is(phase_of(run, "gate"), "WaitingApproval"))
            assert await counted(name, runs) == (5, 5)
            assert runs_waiting(name) == (5, 5)  # each waits for its approval and a signal

            # Ignored decisions: someone not among the approvers, twice.
            for _ in range(2):
                await RunClient(nc).approve(namespace, runs[0], "gate", True, by="mallory")
                assert await counted(name, runs) == (5, 5)
            # Approved, then the same decision again (a duplicate is ignored).
            await RunClient(nc).approve(namespace, runs[0], "gate", True, by="ada")
            await poll(lambda: _is(phase_of(runs[0], "gate"), "Succeeded"))
            await RunClient(nc).approve(namespace, runs[0], "gate", True, by="ada")
            assert await counted(name, runs) == (4, 4)
            # Rejected, and a late decision on the rejected step.
            await RunClient(nc).approve(namespace, runs[1], "gate", False, by="ada")
            await poll(lambda: _is(phase_of(runs[1], "gate"), "Failed"))
            await RunClient(nc).approve(namespace, runs[1], "gate", True, by="ada")
            assert await counted(name, runs) == (3, 3)
            # The run cancelled while waiting.
            await RunClient(nc).cancel(namespace, runs[2], by="test")
            await poll(lambda: _is(phase_of(runs[2], "gate"), "Cancelled"))
            assert await counted(name, runs) == (2, 2)
            # The run failing while waiting (another step fails).
            await RunClient(nc).signal(namespace, runs[3], "go", None, by="test")
            await poll(lambda: _is(phase_of(runs[3], "gate"), "Cancelled"))
            assert await counted(name, runs) == (1, 1)
            # No decision within the approval's timeout.
            slow = await engine.client.start(bundle.compiled[timed], {}, run_id=f"{timed}-0")
            await poll(lambda: _is(phase_of(slow, "gate"), "Failed"))
            assert await counted(timed, [slow]) == (0, 0)
            assert runs_waiting(timed) == (0, 0)  # rejected by its timeout: failed
            assert await counted(name, runs) == (1, 1)
            # Left: runs[4] waiting for its approval, runs[0] approved and waiting for `go`.
            assert runs_waiting(name) == (2, 2)
        finally:
            await nc.close()


async def _is(value: Awaitable[str], expected: str) -> bool:
    return await value == expected
