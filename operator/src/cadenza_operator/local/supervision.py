"""Supervision of the local stack (`cadenza run`, `cadenza dev`).

Agent processes that exit are started again, as a Deployment's ReplicaSet would, with a
back-off while they keep exiting soon after a start. An Agent whose processes exit
CRASH_LOOP_EXITS times in a row before they were ready (before the SDK logged
"agent ready": a missing file, a syntax error, a bad import, a wrong command) is
*unavailable*: the attempts dispatched to it and not started fail with AgentUnavailable
(not retryable) and its last log lines, as the agent itself would report a failure, so the
run ends instead of showing Running forever. Exits *after* the agent was ready do not
count: a task that kills its agent is the poison-task rule's (redelivery, then the dead-
letter stream), and the other tasks still get served between two crashes.

The stack also stops as a whole on SIGTERM, SIGINT and SIGHUP (`until_signalled`): agents
(their process groups), the engine, then the embedded nats-server.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog
from cadenza.protocol import TaskFailure

from ..engine.state import RunState, Slot
from ..engine.view import waits_for_agent
from ..manifests import Bundle
from .processes import AgentProcess, AgentProcesses

CRASH_LOOP_EXITS = 3
"""Exits in a row before the agent was ready that make it unavailable: one is a blip (a
port, a race at start), three with no ready process between them is a program that cannot
start, and waiting for the tenth only delays the message."""
STABLE_SECONDS = 10.0
"""A process that ran this long before it exited is restarted at once, and resets the back-off."""
BACKOFF_FIRST, BACKOFF_MAX = 0.5, 10.0
"""Restart delays after quick exits: 0.5 s, doubled each time, at most 10 s (Kubernetes'
CrashLoopBackOff starts at 10 s and goes to 5 min; a laptop wants the message sooner)."""
TAIL_LINES = 10  # of an unavailable agent's log, carried in the failure (bounded: each line cut)
SUPERVISE_EVERY = 0.25
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

log = structlog.get_logger("cadenza.local")
T = TypeVar("T")


@dataclass(frozen=True)
class Waiting:
    """One attempt waiting in an agent's queue."""

    run: str
    namespace: str
    step: str
    item: int | None
    attempt: int
    agent: str


class WaitingAttempts:
    """The attempts waiting for each agent, kept from every run state the engine writes
    (`Engine.on_state`): what the supervisor fails when their agent is unavailable, and
    what `cadenza run` shows as Queued."""

    def __init__(self, bundle: Bundle) -> None:
        self.bundle = bundle
        self.by_run: dict[str, list[Waiting]] = {}

    def observe(self, state: RunState) -> None:
        if state.terminal:
            self.by_run.pop(state.run, None)
            return
        wf = self.bundle.compiled.get(state.workflow)
        found: list[Waiting] = []
        for name, st in state.steps.items():
            cs = wf.steps.get(name) if wf is not None else None
            if cs is None or not cs.agent or st.phase != "Running":
                continue
            slots: Iterable[tuple[int | None, Slot]] = (
                [(None, st)]
                if st.forEach is None
                else [(int(i), slot) for i, slot in st.forEach.running.items()]
            )
            for item, slot in slots:
                if waits_for_agent(slot):
                    found.append(Waiting(state.run, state.namespace, name, item, slot.attempt, cs.agent))
        self.by_run[state.run] = found

    def for_agent(self, agent: str) -> list[Waiting]:
        return [w for ws in self.by_run.values() for w in ws if w.agent == agent]

    def agents_of(self, run: str) -> set[str]:
        return {w.agent for w in self.by_run.get(run, [])}


class Supervisor:
    """Restarts exited agent processes and tells which Agents cannot start (see above)."""

    def __init__(self, agents: AgentProcesses) -> None:
        self.agents = agents
        self.restarts = 0

    def tick(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        for p in list(self.agents.procs):
            if p.proc.poll() is None:
                if p.not_ready_exits and self.agents.became_ready(p):
                    p.not_ready_exits = 0  # it started after all: available again
                continue
            if p.restart_at is None:
                self._exited(p, now)
            elif now >= p.restart_at:
                self.agents.relaunch(p)
                self.restarts += 1

    def _exited(self, p: AgentProcess, now: float) -> None:
        p.exit_code = p.proc.returncode
        p.last_lines = self.agents.log_tail(p, TAIL_LINES)
        ready = self.agents.became_ready(p)
        p.not_ready_exits = 0 if ready else p.not_ready_exits + 1
        p.quick_exits = p.quick_exits + 1 if now - p.started < STABLE_SECONDS else 0
        delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (p.quick_exits - 1)) if p.quick_exits else 0.0
        p.restart_at = now + delay
        log.warning(
            "agent process exited",
            agent=p.agent,
            replica=p.replica,
            code=p.exit_code,
            ready=ready,
            restart_in=round(delay, 2),
            last=p.last_lines[-1] if p.last_lines else None,
        )

    def unavailable(self) -> dict[str, dict[str, Any]]:
        """Agent -> the error its waiting attempts fail with, for every Agent all of whose
        replicas exited CRASH_LOOP_EXITS times in a row before they were ready."""
        by_agent: dict[str, list[AgentProcess]] = {}
        for p in self.agents.procs:
            by_agent.setdefault(p.agent, []).append(p)
        errors = {}
        for agent, procs in by_agent.items():
            if all(p.not_ready_exits >= CRASH_LOOP_EXITS for p in procs):
                errors[agent] = unavailable_error(agent, max(procs, key=lambda p: p.started))
        return errors


def unavailable_error(agent: str, p: AgentProcess) -> dict[str, Any]:
    last = f": {p.last_lines[-1]}" if p.last_lines else " (it wrote nothing)"
    return TaskFailure(
        type="AgentUnavailable",
        message=(
            f"agent {agent} is not available: its process exited {p.not_ready_exits} times in a row "
            f"before it was ready (last exit code {p.exit_code}){last}"
        ),
        retryable=False,
        exitCode=p.exit_code,
        log=p.last_lines,
    ).wire()


def failed_event(w: Waiting, error: dict[str, Any], at: float) -> dict[str, Any]:
    """The event an agent publishes when an attempt fails (cadenza._agent), for an attempt no
    agent could take."""
    return {
        "type": "failed",
        "run": w.run,
        "step": w.step,
        "item": w.item,
        "attempt": w.attempt,
        "error": error,
        "finishedAt": at,
        "worker": "cadenza-local-supervisor",
    }


class Interrupted(Exception):
    """The stack was stopped by a signal (after everything it started was stopped)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


async def until_signalled(main: Coroutine[Any, Any, T]) -> T:
    """Run `main`; on SIGTERM, SIGINT or SIGHUP cancel it, so that its `finally` stops the
    agents and the embedded nats-server (with `run_to_end`), then raise Interrupted.

    The cancellation is repeated until `main` ends: on Python 3.11 `asyncio.wait_for` (which
    nats-py uses under every request) can swallow a cancellation that lands as its inner
    future completes, and a lost one would leave the stack running with the signal spent."""
    loop = asyncio.get_running_loop()
    task = loop.create_task(main)
    received: list[int] = []

    async def keep_cancelling() -> None:
        while not task.done():
            task.cancel()
            await asyncio.sleep(0.5)

    def on_signal(signum: int) -> None:
        if not received:
            received.append(signum)
            helpers.add(loop.create_task(keep_cancelling()))

    helpers: set[asyncio.Task[None]] = set()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        return await task
    except asyncio.CancelledError:
        if received:
            raise Interrupted(received[0]) from None
        raise
    finally:
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)
        for helper in helpers:
            helper.cancel()


async def run_to_end(cleanup: Coroutine[Any, Any, T]) -> T:
    """Await `cleanup` to its end even if cancelled meanwhile (it is bounded: stops give up
    on a process with SIGKILL after a grace period): a stop cut short would leave the
    processes it was stopping behind. A cancellation received meanwhile is re-raised after."""
    inner = asyncio.ensure_future(cleanup)
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(inner)
        except asyncio.CancelledError:
            if inner.done():
                raise
            cancelled = True
            continue
        if cancelled:
            raise asyncio.CancelledError
        return result
