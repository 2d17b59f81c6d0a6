"""Control-layer features on a real nats-server that the feature tour cannot show in one run:
10,000-item fan-out with a bounded record, heartbeat loss, durable timers across an engine
restart, approvals from another process, trigger policies, schedules and metrics."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from pathlib import Path
from typing import Any

import nats
from cadenza_operator.engine.audit import read_audit
from cadenza_operator.engine.client import RunClient
from cadenza_operator.engine.runtime import Engine
from cadenza_operator.engine.state import RunState
from cadenza_operator.engine.triggers import TRIGGERS_STREAM
from cadenza_operator.local.dev import DevServer
from cadenza_operator.local.nats_server import NatsServer
from cadenza_operator.local.runner import LocalStack
from cadenza_operator.manifests import load
from prometheus_client import REGISTRY

from ..conftest import cadenza
from .harness import agent_manifest, pid_in, poll, run_project, unique_namespace, write_project

AGENTS = """
import asyncio, os, time
from pathlib import Path
from cadenza import Agent

worker = Agent("worker", concurrency=64)

@worker.handler
async def handle(task):
    if task.input.get("hang_first") and task.attempt == 1:
        Path(task.input["marker"]).write_text(str(os.getpid()))
        await asyncio.sleep(3600)   # the test SIGSTOPs this process: no more heartbeats
    return {"i": task.input.get("i"), "attempt": task.attempt, "pid": os.getpid()}

if __name__ == "__main__":
    worker.run()
"""


def _wf(body: str) -> str:
    return "\n---\napiVersion: cadenza.dev/v1alpha1\nkind: Workflow\n" + body


async def test_ten_thousand_items_keep_the_run_record_bounded(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    root = write_project(
        tmp_path / "p",
        AGENTS,
        agent_manifest("worker", replicas=2, concurrency=128)
        + _wf("""
metadata: {name: wide}
spec:
  steps:
    - name: fan
      agent: worker
      forEach: "input.items"
      maxParallel: 200
      input: {i: "${{ item }}"}
    - name: join
      agent: worker
      dependsOn: [fan]
      input: {i: "${{ size(steps.fan.output) }}"}
  output: {count: "${{ size(steps.fan.output) }}", last: "${{ steps.fan.output[9999].i }}"}
"""),
    )
    bundle = load([root], namespace=unique_namespace())
    wf = bundle.compiled["wide"]
    stack = LocalStack(bundle, nats_server.url, wf.namespace)
    sizes: list[int] = []
    done: asyncio.Future[RunState] = asyncio.get_running_loop().create_future()

    def measure(state: RunState) -> None:
        sizes.append(len(state.to_bytes()))
        if state.terminal and not done.done():
            done.set_result(state)

    try:
        engine = await stack.start({"worker"})
        engine.on_state(measure)
        run = await engine.client.start(wf, {"items": list(range(10_000))})
        state = await asyncio.wait_for(done, 240)
        audit = await read_audit(stack.nc.jetstream(), wf.namespace, run)
    finally:
        await stack.stop()
    # Every decision is in the audit trail, none missing, none twice.
    assert [r["seq"] for r in audit] == list(range(1, state.auditSeq + 1))
    assert state.phase == "Succeeded", state.message
    assert state.outputs == {"count": 10_000, "last": 9999}
    assert state.steps["join"].output["i"] == 10_000
    assert state.steps["fan"].forEach is not None
    assert state.steps["fan"].forEach.counts == {"Succeeded": 10_000}
    print(f"\n10,000 items: {len(sizes)} record writes, largest record {max(sizes)} bytes")
    # Bounded by maxParallel, not by the 10,000 items: item outputs and the input live in
    # the outputs bucket; the record holds at most 200 items in flight (and, transiently,
    # the commands of one decision).
    assert max(sizes) < 96 * 1024


async def test_heartbeat_loss_fails_the_attempt_and_retries_elsewhere(
    tmp_path: Path, fresh_nats: NatsServer
) -> None:
    marker = tmp_path / "marker"
    # concurrency 1: the frozen replica, holding its task, asks for no other one.
    manifest = agent_manifest("worker", replicas=2, concurrency=1, ack_wait="60s").replace(
        'Agent("worker", concurrency=64)', ""
    )
    root = write_project(
        tmp_path / "p",
        AGENTS.replace("concurrency=64", "concurrency=1"),
        manifest
        + _wf("""
metadata: {name: hb}
spec:
  steps:
    - name: slow
      agent: worker
      input: {hang_first: true, marker: "${{ input.marker }}"}
      heartbeatTimeout: 1s
      retry: {limit: 1, backoff: {initial: 50ms}}
"""),
    )
    run = asyncio.create_task(run_project(root, fresh_nats.url, input={"marker": str(marker)}))
    frozen = await pid_in(marker)
    os.kill(frozen, signal.SIGSTOP)  # alive, holding the task, silent
    try:
        summary, code = await asyncio.wait_for(run, 60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(frozen, signal.SIGCONT)
    assert code == 0, summary
    slow = summary["steps"]["slow"]
    assert [a["outcome"] for a in slow["history"]] == ["TimedOut", "Succeeded"]
    assert slow["history"][0]["error"]["type"] == "HeartbeatTimeout"
    assert slow["output"]["attempt"] == 2
    assert slow["output"]["pid"] != frozen


async def test_timers_are_durable_across_an_engine_restart(tmp_path: Path, fresh_nats: NatsServer) -> None:
    root = write_project(
        tmp_path / "p",
        AGENTS,
        agent_manifest("worker")
        + _wf("""
metadata: {name: timed}
spec:
  steps:
    - name: gate
      approval: {timeout: 2s, onTimeout: approve}
    - name: after
      agent: worker
      dependsOn: [gate]
      input: {i: 1}
"""),
    )
    bundle = load([root], namespace=unique_namespace())
    wf = bundle.compiled["timed"]
    stack = LocalStack(bundle, fresh_nats.url, wf.namespace)
    try:
        engine = await stack.start({"worker"})
        run = await engine.client.start(wf, {})
        for _ in range(1200):  # bounded: 60 s
            state = await engine.client.get(run)
            if state and state.steps.get("gate") and state.steps["gate"].phase == "WaitingApproval":
                break
            await asyncio.sleep(0.05)
        await engine.stop()  # the only engine is gone while the timer is armed,
        await stack.nc.close()  # and so is its connection, as when its process dies
        await asyncio.sleep(2.5)  # past the deadline: nobody fires it now
        successor_nc = await nats.connect(fresh_nats.url)
        successor = Engine(successor_nc)
        await successor.start()
        try:
            for _ in range(1200):  # bounded: 60 s
                state = await successor.client.get(run)
                if state and state.terminal:
                    break
                await asyncio.sleep(0.05)
        finally:
            await successor.stop()
            await successor_nc.close()
    finally:
        await stack.stop()
    assert state is not None
    assert state.phase == "Succeeded", {n: (s.phase, s.message) for n, s in state.steps.items()}
    assert state.steps["gate"].approval is not None
    assert state.steps["gate"].approval["by"] == "timeout"
    assert state.steps["gate"].approval["decision"] == "approved"


DEV_WORKFLOW = """
metadata: {{name: {name}}}
spec:
  triggers:
    - nats: {{subject: "{subject}", dedupKey: "event.id"}}
  concurrencyPolicy: Forbid
  steps:
    - name: gate
      approval: {{approvers: [ada]}}
    - name: work
      agent: worker
      dependsOn: [gate]
      input: {{i: "${{{{ input.id }}}}"}}
"""


async def test_dev_triggers_dedup_forbid_and_cli_approval(tmp_path: Path, nats_server: NatsServer) -> None:
    namespace = unique_namespace()
    subject = f"tickets.{namespace}"
    root = write_project(
        tmp_path / "p",
        AGENTS,
        agent_manifest("worker") + _wf(DEV_WORKFLOW.format(name="gated", subject=subject)),
    )
    bundle = load([root], namespace=namespace)
    async with DevServer(bundle, nats_server.url, namespace) as dev:
        nc = await nats.connect(dev.url)
        js = nc.jetstream()
        try:
            for event in ({"id": "a"}, {"id": "a"}, {"id": "b"}):  # a duplicate, then one Forbid refuses
                await js.publish(subject, json.dumps(event).encode())

            async def all_handled() -> bool:  # each event started a run, or was skipped
                info = await js.consumer_info(TRIGGERS_STREAM, f"trigger_{namespace}_gated")
                return bool(info.num_pending == 0 and info.num_ack_pending == 0 and info.ack_floor.stream_seq)

            await poll(all_handled)
            assert dev.triggers is not None
            active = await dev.triggers.active_runs(bundle.compiled["gated"])
            assert len(active) == 1
            run = active[0]
            # An approver who is not on the list is ignored; the CLI approves as ada.
            await RunClient(nc).approve(namespace, run, "gate", True, by="mallory")
            result = await asyncio.to_thread(
                cadenza,
                "approve",
                run,
                "gate",
                "--by",
                "ada",
                "--comment",
                "ship it",
                "--nats",
                dev.url,
                "--namespace",
                namespace,
            )
            assert result.returncode == 0, result.stderr
            state = None
            for _ in range(600):  # bounded: 60 s
                state = await dev.engine.client.get(run)
                if state and state.terminal:
                    break
                await asyncio.sleep(0.1)
            assert state is not None and state.phase == "Succeeded", {
                n: (s.phase, s.message) for n, s in state.steps.items()
            }
            assert state.input == {"id": "a"}
            approval = state.steps["gate"].approval or {}
            assert (approval["by"], approval["comment"]) == ("ada", "ship it")
            assert await dev.triggers.active_runs(bundle.compiled["gated"]) == []
            # Every decision taken, from the command line: who decided what, and why.
            trail = await asyncio.to_thread(
                cadenza, "audit", run, "--nats", dev.url, "--namespace", namespace, "--output", "json"
            )
            assert trail.returncode == 0, trail.stderr
            records = json.loads(trail.stdout)
            assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
            reasons = [(r["step"], r["actor"], r["reason"]) for r in records]
            assert ("gate", "mallory", "decision by 'mallory' ignored: not an approver") in reasons
            assert ("gate", "ada", "approved by ada") in reasons
            assert records[-1]["to"] == "Succeeded" and records[-1]["step"] is None
        finally:
            await nc.close()


async def test_schedule_trigger_starts_runs(tmp_path: Path, nats_server: NatsServer) -> None:
    namespace = unique_namespace()
    root = write_project(
        tmp_path / "p",
        AGENTS,
        agent_manifest("worker")
        + _wf("""
metadata: {name: ticking}
spec:
  triggers:
    - schedule: {cron: "* * * * * *", input: {i: 7}}   # every second (sixth field: seconds)
  steps:
    - {name: tick, agent: worker, input: {i: "${{ input.i }}"}}
"""),
    )
    bundle = load([root], namespace=namespace)
    finished: list[RunState] = []
    async with DevServer(bundle, nats_server.url, namespace) as dev:
        dev.engine.on_state(lambda s: finished.append(s) if s.phase == "Succeeded" else None)
        for _ in range(600):  # bounded: 60 s
            if len({s.run for s in finished}) >= 2:
                break
            await asyncio.sleep(0.1)
    runs = {s.run: s for s in finished}
    assert len(runs) >= 2
    assert all(s.labels.get("cadenza.dev/trigger") == "schedule" for s in runs.values())
    assert all(s.steps["tick"].output["i"] == 7 for s in runs.values())


def _sample(name: str, labels: dict[str, str]) -> float:
    """Summed over the labels not given (the run's workload_namespace among them)."""
    return sum(
        s.value
        for m in REGISTRY.collect()
        for s in m.samples
        if s.name == name and labels.items() <= s.labels.items()
    )


async def test_metrics_split_waiting_from_executing_and_count_retries(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    flaky = AGENTS.replace(
        '    return {"i"',
        '    if task.input.get("flaky") and task.attempt == 1:\n'
        "        from cadenza import RetryableError\n"
        '        raise RetryableError("busy")\n    return {"i"',
    )
    root = write_project(
        tmp_path / "p",
        flaky,
        agent_manifest("worker")
        + _wf("""
metadata: {name: measured}
spec:
  steps:
    - name: once
      agent: worker
      input: {flaky: true}
      retry: {limit: 2, backoff: {initial: 10ms}}
"""),
    )
    labels: dict[str, Any] = {"workflow": "measured", "step": "once"}
    before = {
        "retries": _sample("cadenza_step_retries_total", labels),
        "queue": _sample("cadenza_step_queue_seconds_count", labels),
        "exec": _sample("cadenza_step_execution_seconds_count", labels),
        "ok": _sample("cadenza_runs_finished_total", {"workflow": "measured", "phase": "Succeeded"}),
    }
    summary, code = await run_project(root, nats_server.url)
    assert code == 0, summary
    assert _sample("cadenza_step_retries_total", labels) - before["retries"] == 1
    assert _sample("cadenza_step_queue_seconds_count", labels) - before["queue"] == 2  # both attempts
    assert _sample("cadenza_step_execution_seconds_count", labels) - before["exec"] == 2
    assert (
        _sample("cadenza_runs_finished_total", {"workflow": "measured", "phase": "Succeeded"}) - before["ok"]
        == 1
    )
    assert _sample("cadenza_engine_event_lag_seconds_count", {}) > 0


async def test_cancelling_a_run_reaches_its_running_tasks(tmp_path: Path, nats_server: NatsServer) -> None:
    marker = tmp_path / "saw-cancel"
    agents = """
from pathlib import Path
from cadenza import Agent

worker = Agent("worker")

@worker.handler
async def handle(task):
    Path(task.input["marker"] + ".started").write_text("1")
    await task.wait_cancelled()
    Path(task.input["marker"]).write_text(f"{task.step} saw the cancellation")
    return {}

if __name__ == "__main__":
    worker.run()
"""
    root = write_project(
        tmp_path / "p",
        agents,
        agent_manifest("worker")
        + _wf("""
metadata: {name: long}
spec:
  steps:
    - {name: work, agent: worker, input: {marker: "${{ input.marker }}"}}
"""),
    )
    bundle = load([root], namespace=unique_namespace())
    wf = bundle.compiled["long"]
    stack = LocalStack(bundle, nats_server.url, wf.namespace)
    try:
        engine = await stack.start({"worker"})
        run = await engine.client.start(wf, {"marker": str(marker)})
        for _ in range(1200):  # bounded: 60 s
            if Path(f"{marker}.started").exists():
                break
            await asyncio.sleep(0.05)
        await RunClient(stack.nc).cancel(wf.namespace, run, by="ops", reason="not needed")
        state = None
        for _ in range(1200):  # bounded: 60 s
            state = await engine.client.get(run)
            if state and state.terminal and marker.exists():
                break
            await asyncio.sleep(0.05)
    finally:
        await stack.stop()
    assert state is not None
    assert state.phase == "Cancelled"
    assert state.cancelledBy == "ops"
    assert state.steps["work"].phase == "Cancelled"
    assert marker.read_text() == "work saw the cancellation"


async def test_a_live_agent_heartbeats_a_long_task_past_its_heartbeat_timeout(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    agents = """
import asyncio
from cadenza import Agent

worker = Agent("worker")

@worker.handler
async def handle(task):
    await asyncio.sleep(2.5)   # longer than heartbeatTimeout and than the ack wait
    return {"done": True}

if __name__ == "__main__":
    worker.run()
"""
    root = write_project(
        tmp_path / "p",
        agents,
        agent_manifest("worker", ack_wait="1s")
        + _wf("""
metadata: {name: patient}
spec:
  steps:
    - {name: long, agent: worker, heartbeatTimeout: 1s}
"""),
    )
    summary, code = await run_project(root, nats_server.url)
    assert code == 0, summary
    assert summary["steps"]["long"]["attempts"] == 1  # never timed out, never redelivered
    assert [a["outcome"] for a in summary["steps"]["long"]["history"]] == ["Succeeded"]


async def test_a_timed_out_attempt_is_counted_once(tmp_path: Path, nats_server: NatsServer) -> None:
    agents = """
import asyncio
from cadenza import Agent

worker = Agent("worker")

@worker.handler
async def handle(task):
    if task.attempt == 1:
        await asyncio.sleep(3)   # past the 0.5s timeout; the agent and the engine both notice
    return {"attempt": task.attempt}

if __name__ == "__main__":
    worker.run()
"""
    root = write_project(
        tmp_path / "p",
        agents,
        agent_manifest("worker")
        + _wf("""
metadata: {name: slowpoke}
spec:
  steps:
    - {name: nap, agent: worker, timeout: 500ms, retry: {limit: 1, backoff: {initial: 10ms}}}
"""),
    )
    labels = {"workflow": "slowpoke", "step": "nap"}
    before = _sample("cadenza_step_timeouts_total", labels)
    summary, code = await run_project(root, nats_server.url)
    assert code == 0, summary
    assert [a["outcome"] for a in summary["steps"]["nap"]["history"]] == ["TimedOut", "Succeeded"]
    await asyncio.sleep(2)  # past the engine's backstop timer for attempt 1: still one timeout
    assert _sample("cadenza_step_timeouts_total", labels) - before == 1
