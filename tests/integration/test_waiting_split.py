"""Waiting is measured where it happens, on a real nats-server with real agent processes.

Time is put in each waiting place by construction (an agent that takes one task at a time,
a forEach window of one, a workflow that admits one run at a time) so the lower bounds
below follow from the agent's sleep, not from how fast this machine is.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import nats
from cadenza_operator.kube.status import run_status
from cadenza_operator.local.dev import DevServer
from cadenza_operator.local.nats_server import NatsServer
from cadenza_operator.manifests import load
from prometheus_client import REGISTRY

from .harness import agent_manifest, run_project, unique_namespace, write_project
from .metrics import summed

SLEEP = 0.4

AGENTS = f"""
import asyncio
from cadenza import Agent

slow = Agent("slow", concurrency=1)

@slow.handler
async def handle(task):
    await asyncio.sleep({SLEEP})
    return {{"n": task.input.get("n")}}

if __name__ == "__main__":
    slow.run()
"""

WORKFLOW = """
---
apiVersion: cadenza.dev/v1alpha1
kind: Workflow
metadata: {name: waitsplit}
spec:
  steps:
    - {name: a, agent: slow, input: {n: 1}}
    - {name: b, agent: slow, input: {n: 2}}
    - name: each
      agent: slow
      dependsOn: [a, b]
      forEach: "[1, 2, 3]"
      maxParallel: 1
      input: {n: "${{ item }}"}
"""


def metric(name: str, step: str, workflow: str = "waitsplit") -> float:
    labels = {"workflow": workflow, "step": step}
    seen = [s for m in REGISTRY.collect() for s in m.samples if s.name == name]
    assert any(labels.items() <= s.labels.items() for s in seen), f"{name}{{step={step}}} was never observed"
    return summed(name, labels)


async def test_queue_and_window_waits_are_split_from_execution(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    before = {
        s: summed("cadenza_step_scheduling_seconds_sum", {"workflow": "waitsplit", "step": s})
        for s in ("each",)
    }
    root = write_project(tmp_path / "p", AGENTS, agent_manifest("slow", concurrency=1) + WORKFLOW)
    summary, code = await run_project(root, nats_server.url)
    assert code == 0, summary
    steps = summary["steps"]

    # a and b are ready together, and the agent takes one task at a time: one of them
    # waited in the agent's queue while the other ran.
    queued = sorted(steps[s]["timing"]["queued"] for s in ("a", "b"))
    assert queued[1] >= SLEEP * 0.95, steps
    for s in ("a", "b"):
        t = steps[s]["timing"]
        assert t["executing"] >= SLEEP * 0.95
        assert abs(t["waiting"] - (t["scheduling"] + t["queued"])) <= 0.002  # each rounded to 1 ms
        (attempt,) = steps[s]["history"]
        assert attempt["readyAt"] <= attempt["queuedAt"] <= attempt["startedAt"] <= attempt["finishedAt"]

    # The forEach items are ready when the step starts; the window of one holds item 1
    # back for item 0's run and item 2 for both: that is scheduling, not the agent's queue.
    each = steps["each"]["timing"]
    assert each["scheduling"] >= 3 * SLEEP * 0.95, each
    assert each["executing"] >= 3 * SLEEP * 0.95, each

    run = summary["timing"]
    assert run["executing"] >= 5 * SLEEP * 0.95
    assert run["waiting"] >= each["scheduling"] + queued[1] - 0.01

    # The same split reaches Prometheus.
    assert metric("cadenza_step_scheduling_seconds_sum", "each") - before["each"] >= 3 * SLEEP * 0.95
    assert metric("cadenza_step_waiting_seconds_count", "each") >= 3
    assert max(metric("cadenza_step_queue_seconds_sum", s) for s in ("a", "b")) >= SLEEP * 0.95
    assert metric("cadenza_step_execution_seconds_count", "each") >= 3


HELD = """
---
apiVersion: cadenza.dev/v1alpha1
kind: Workflow
metadata: {{name: held}}
spec:
  triggers:
    - nats: {{subject: "{subject}"}}
  maxActiveRuns: 1
  concurrencyPolicy: Allow
  steps:
    - {{name: a, agent: slow, input: {{n: "${{{{ input.n }}}}"}}}}
"""


async def test_a_run_held_back_by_maxActiveRuns_waited_from_its_event(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    namespace = unique_namespace()
    subject = f"held.{namespace}"
    root = write_project(tmp_path / "p", AGENTS, agent_manifest("slow") + HELD.format(subject=subject))
    bundle = load([root], namespace=namespace)
    async with DevServer(bundle, nats_server.url, namespace) as dev:
        nc = await nats.connect(dev.url)
        try:
            js = nc.jetstream()
            for n in (1, 2):
                await js.publish(subject, json.dumps({"n": n}).encode())
            kv = await js.key_value("cadenza_runs")

            states: list[Any] = []
            for _ in range(600):  # bounded: 60 s
                states = [
                    state
                    for key in await kv.keys()
                    if (state := await dev.engine.client.get(key)) is not None
                    and state.namespace == namespace
                    and state.terminal
                ]
                if len(states) == 2:
                    break
                await asyncio.sleep(0.1)
            assert len(states) == 2, states
        finally:
            await nc.close()
    _, second = sorted(states, key=lambda s: s.startedAt or 0)
    assert {s.phase for s in states} == {"Succeeded"}
    # The second event was admitted only once the first run had finished, i.e. at least
    # one agent sleep after both events were stored: that wait is its first step's scheduling.
    (attempt,) = second.steps["a"].attempts
    assert attempt.readyAt is not None and attempt.readyAt < (second.startedAt or 0)
    timing = second.steps["a"].timing
    assert timing is not None and timing.scheduling >= SLEEP * 0.9, timing
    # and WorkflowRun status says where the time went
    status = run_status(second)
    assert status["steps"]["a"]["waiting"] and status["steps"]["a"]["executing"]
    assert status["waiting"] and status["executing"]
