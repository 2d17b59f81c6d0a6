"""The no-op agent the benchmark runs through Cadenza: one SDK process, high concurrency.

It returns ``{"x": input.x + 1}``: enough to check that every step ran, in order, and
that outputs flow from step to step, and nothing more. The baseline worker
(`baseline.py`) does exactly the same work per task.

Started by `run.py` through the local runner's `AgentProcesses` (the same path as
`cadenza run`), with CADENZA_NATS_URL, CADENZA_AGENT=noop and CADENZA_CONCURRENCY set.
"""

from __future__ import annotations

from typing import Any

from cadenza import Agent, Task

AGENT_NAME = "noop"

agent = Agent(AGENT_NAME, concurrency=1024)


@agent.handler
async def noop(task: Task) -> dict[str, Any]:
    return {"x": int(task.input["x"]) + 1}


if __name__ == "__main__":
    agent.run()
