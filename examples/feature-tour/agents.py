"""Agents of the feature tour: each one small, each showing one behaviour of the control layer.

`python agents.py <agent>`; all are deterministic and offline.
"""

import sys

from cadenza import Agent, FatalError, RetryableError, Task

planner = Agent("planner")
researcher = Agent("researcher")
critic = Agent("critic")
archivist = Agent("archivist")
notifier = Agent("notifier")


@planner.handler
async def plan(task: Task) -> dict:
    topics = task.input["topics"]
    # Shared context: what later agents need, kept apart from the run's execution state.
    await task.context.put("audience", task.input.get("audience", "engineers"))
    return {"topics": topics, "count": len(topics)}


@researcher.handler
async def research(task: Task) -> dict:
    topic = task.input["topic"]
    if task.input.get("flaky") and task.attempt == 1:
        raise RetryableError(f"source for {topic!r} is rate limited")  # retried with backoff
    return {"topic": topic, "notes": f"{len(topic)} letters about {topic}", "attempt": task.attempt}


@critic.handler
async def review(task: Task) -> dict:
    mode = task.input["mode"]
    if mode == "slow-first" and task.attempt == 1:
        # Waits past the step's timeout: the attempt is cancelled and retried.
        await task.wait_cancelled()
        return {"verdict": "too late"}
    if mode == "strict":
        raise FatalError("the draft cites no sources", details={"rule": "citations"})
    audience = await task.context.get("audience")
    return {"verdict": "ok", "mode": mode, "audience": audience, "attempt": task.attempt}


@archivist.handler
async def archive(task: Task) -> dict:
    if task.input.get("op") == "bulk":
        # 600 KiB: larger than a NATS message may be; the SDK moves it through the object store.
        return {"blob": "x" * (600 * 1024)}
    return {"summary": f"{task.input.get('count')} topics archived"}


@notifier.handler
async def notify(task: Task) -> dict:
    return {"sent": f"run ended {task.input['phase']}"}


AGENTS = {a.name: a for a in (planner, researcher, critic, archivist, notifier)}

if __name__ == "__main__":
    AGENTS[sys.argv[1]].run()
