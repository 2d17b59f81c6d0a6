"""What the soak runs: its workflows, its agents' code, and a seeded plan of runs whose
expected outcome is computed from their input, so a wrong output can be counted."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Literal

WORKER = "worker"  # every ordinary step
FRAGILE = "fragile"  # only the poison run: its task crash-loops these replicas
BUSY = "busy"  # one task at a time per replica: the busy runs' tasks queue behind each other

# The agents' handler logs `run step item attempt start-time` when it starts, before any
# work: the soak compares these starts with the run records to find attempts started after
# the engine had abandoned them. Failures are deterministic by attempt number.
AGENTS_PY = """
import asyncio
import os
import random
import time

from cadenza import Agent, RetryableError

agent = Agent(os.environ["CADENZA_AGENT"])
log = open(os.environ["SOAK_LOG"] + f".{os.getpid()}", "a", buffering=1)


@agent.handler
async def handle(task):
    log.write(f"{task.run_id} {task.step} {task.item} {task.attempt} {time.time():.6f}\\n")
    spec = task.input
    op = spec["op"]
    if op == "crash":
        os._exit(1)  # a poison input: the replica dies with the task in hand
    if task.attempt <= spec.get("failUntil", 0):
        raise RetryableError(f"deliberate failure of attempt {task.attempt}")
    await asyncio.sleep(random.uniform(0.01, 0.1))
    if op == "a":
        return {"v": 2 * spec["n"]}
    if op == "sq":
        if task.attempt == 1 and spec["index"] == spec["failItem"]:
            raise RetryableError("deliberate failure of this item's first attempt")
        return {"sq": spec["x"] * spec["x"]}
    if op == "slow":
        if task.attempt <= spec["slowUntil"]:
            await asyncio.sleep(3)  # beyond the step's timeout: this attempt times out
        await asyncio.sleep(spec.get("hold", 0))
        return {"n": spec["n"]}
    if op == "join":
        return {"sum": spec["a"] + sum(o["sq"] for o in spec["sq"]) + spec["slow"] + spec["go"]["n"]}
    if op == "echo":
        return {k: v for k, v in spec.items() if k != "op"}
    raise ValueError(f"unknown op {op!r}")


if __name__ == "__main__":
    agent.run()
"""

FAST_RETRY = {"limit": 3, "backoff": {"initial": "1ms"}}

# Retries with a 1 ms backoff, a forEach with maxParallel, a join on four steps, a timer
# (an attempt that exceeds its timeout and is retried), an approval the soak gives and a
# signal it sends.
MAIN = {
    "steps": [
        {
            "name": "a",
            "agent": WORKER,
            "input": {"op": "a", "n": "${{ input.n }}", "failUntil": "${{ input.failA }}"},
            "retry": FAST_RETRY,
        },
        {
            "name": "fan",
            "agent": WORKER,
            "dependsOn": ["a"],
            "forEach": "input.items",
            "maxParallel": 2,
            "input": {
                "op": "sq",
                "x": "${{ item }}",
                "index": "${{ index }}",
                "failItem": "${{ input.failItem }}",
            },
            "retry": FAST_RETRY,
        },
        {
            "name": "slow",
            "agent": WORKER,
            "dependsOn": ["a"],
            "timeout": "1s",
            "retry": {"limit": 2, "backoff": {"initial": "1ms"}},
            "input": {"op": "slow", "n": "${{ input.n }}", "slowUntil": "${{ input.slowUntil }}"},
        },
        {"name": "gate", "dependsOn": ["a"], "approval": {"timeout": "30m", "onTimeout": "reject"}},
        {"name": "go", "waitFor": {"signal": "go", "timeout": "30m"}},
        {
            "name": "join",
            "agent": WORKER,
            "dependsOn": ["fan", "slow", "gate", "go"],
            "input": {
                "op": "join",
                "a": "${{ steps.a.output.v }}",
                "sq": "${{ steps.fan.output }}",
                "slow": "${{ steps.slow.output.n }}",
                "go": "${{ steps.go.output }}",
            },
        },
    ],
    "output": {
        "sum": "${{ steps.join.output.sum }}",
        "items": "${{ steps.fan.output }}",
        "by": "${{ steps.gate.output.by }}",
    },
}

# Approved by the engine's own timer (onTimeout: approve), racing the retries of `a`.
AUTO = {
    "steps": [
        {
            "name": "a",
            "agent": WORKER,
            "input": {"op": "a", "n": "${{ input.n }}", "failUntil": "${{ input.failA }}"},
            "retry": FAST_RETRY,
        },
        {"name": "gate", "approval": {"timeout": "1s", "onTimeout": "approve"}},
        {
            "name": "b",
            "agent": WORKER,
            "dependsOn": ["a", "gate"],
            "input": {
                "op": "echo",
                "v": "${{ steps.a.output.v }}",
                "decision": "${{ steps.gate.output.decision }}",
            },
        },
    ],
    "output": {
        "v": "${{ steps.b.output.v }}",
        "decision": "${{ steps.b.output.decision }}",
        "by": "${{ steps.gate.output.by }}",
    },
}

# Its input makes the agent process exit: the task must be dead-lettered (once), and the
# run fails when the attempt's timeout passes. The timeout is long enough for the
# deliveries to run out first.
POISON = {
    "steps": [{"name": "boom", "agent": FRAGILE, "timeout": "40s", "input": {"op": "crash"}}],
}

# Two steps on an agent that takes one task at a time, so tasks of different runs wait in
# its queue: `timeout` counts from the start (a queued attempt is never timed out), a first
# attempt that overruns it is retried, and an attempt that waits longer than `queueTimeout`
# is abandoned (never started) and retried.
BUSY_STEP = {
    "agent": BUSY,
    "timeout": "1s",
    "queueTimeout": "1s",
    "retry": {"limit": 8, "backoff": {"initial": "1ms"}},
}
BUSY_RUN = {
    "steps": [
        {
            **BUSY_STEP,
            "name": "q1",
            "input": {
                "op": "slow",
                "n": "${{ input.n }}",
                "slowUntil": "${{ input.slow }}",
                "hold": "${{ input.hold }}",
            },
        },
        {
            **BUSY_STEP,
            "name": "q2",
            "dependsOn": ["q1"],
            "input": {
                "op": "slow",
                "n": "${{ steps.q1.output.n }}",
                "slowUntil": 0,
                "hold": "${{ input.hold }}",
            },
        },
    ],
    "output": {"n": "${{ steps.q2.output.n }}"},
}

WORKFLOWS = {"soak": MAIN, "soak-auto": AUTO, "soak-poison": POISON, "soak-busy": BUSY_RUN}

Kind = Literal["main", "cancel", "auto", "poison", "busy"]


@dataclass
class PlannedRun:
    id: str
    kind: Kind
    workflow: str
    input: dict[str, Any]
    approve_by: str | None = None  # "soak" (the engine client) or "cli" (`cadenza approve`)

    @property
    def expected_phase(self) -> str:
        return {
            "main": "Succeeded",
            "auto": "Succeeded",
            "busy": "Succeeded",
            "cancel": "Cancelled",
            "poison": "Failed",
        }[self.kind]

    def expected_outputs(self) -> Any:
        n = self.input.get("n", 0)
        if self.kind == "main":
            items = self.input["items"]
            return {
                "sum": 2 * n + sum(x * x for x in items) + n + 3 * n,
                "items": [{"sq": x * x} for x in items],
                "by": self.approve_by,
            }
        if self.kind == "auto":
            return {"v": 2 * n, "decision": "approved", "by": "timeout"}
        if self.kind == "busy":
            return {"n": n}
        return None  # a cancelled or failed run's outputs are not compared

    @property
    def signal(self) -> dict[str, int] | None:
        return {"n": 3 * self.input["n"]} if self.workflow == "soak" else None


def plan_runs(rng: random.Random, count: int, cli_every: int = 40) -> list[PlannedRun]:
    """`count` runs drawn from `rng`, plus one poison run (the agent process exits)."""
    runs: list[PlannedRun] = []
    for i in range(count):
        roll = rng.random()
        kind: Kind = "auto" if roll < 0.15 else "cancel" if roll < 0.2 else "busy" if roll < 0.35 else "main"
        run_id = f"soak-{i:05d}"
        if kind == "auto":
            runs.append(PlannedRun(run_id, kind, "soak-auto", {"n": i, "failA": rng.randrange(3)}))
            continue
        if kind == "busy":
            slow = 1 if rng.random() < 0.2 else 0
            hold = round(rng.uniform(0.2, 0.6), 3)  # the agent's two slots are often both taken
            runs.append(PlannedRun(run_id, kind, "soak-busy", {"n": i, "slow": slow, "hold": hold}))
            continue
        items = [rng.randrange(1, 10) for _ in range(rng.randrange(2, 5))]
        spec = {
            "n": i,
            "failA": rng.randrange(3),
            "items": items,
            "failItem": rng.choice([-1, *range(len(items))]),
            "slowUntil": 1 if rng.random() < 0.25 else 0,
        }
        approve_by = None if kind == "cancel" else "cli" if i % cli_every == cli_every - 1 else "soak"
        runs.append(PlannedRun(run_id, kind, "soak", spec, approve_by))
    runs.insert(len(runs) // 10, PlannedRun("soak-poison", "poison", "soak-poison", {}))
    return runs
