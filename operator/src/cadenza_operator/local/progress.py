"""Live progress of a run on a terminal (rich), and the summary table at the end."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from ..engine.definition import CompiledWorkflow
from ..engine.state import RunState
from ..engine.view import StepView, run_view

_STYLE = {
    "Succeeded": "green",
    "Failed": "red",
    "Cancelled": "yellow",
    "Skipped": "dim",
    "Running": "cyan",
    "Queued": "blue",
    "WaitingApproval": "magenta",
    "Pending": "white",
}


def _seconds(start: float | None, end: float | None) -> str:
    if not start:
        return ""
    return f"{((end or time.time()) - start):.2f}s"


def agent_steps(wf: CompiledWorkflow) -> dict[str, str]:
    """Step -> the Agent that runs it, for the steps an agent runs."""
    return {name: cs.agent for name, cs in wf.steps.items() if cs.agent}


def shown_phase(s: StepView, agent: str | None, depths: Mapping[str, int]) -> tuple[str, str]:
    """(phase, detail) of a step as the table shows it. A Running step whose attempts all
    wait in their agent's queue (dispatched, not started by any agent yet) is Queued, with
    the number of tasks in that queue when known; it is Running once an agent starts it."""
    if s.phase != "Running" or agent is None:
        return s.phase, ""
    depth = depths.get(agent)
    in_queue = f"{depth} in {agent}'s queue" if depth is not None else f"waiting for {agent}"
    queued = s.queued
    if s.items is None:
        return ("Queued", in_queue) if queued else ("Running", "")
    if not queued:
        return "Running", f"{s.dispatched} in flight"
    if queued == s.dispatched:
        return "Queued", f"{queued} item(s) {in_queue}" if depth is None else f"{queued} item(s), {in_queue}"
    return "Running", f"{s.dispatched - queued} running, {queued} queued ({in_queue})"


def _detail(s: StepView) -> str:
    """What went wrong or was decided, on one line: the first line of the message (a
    failure's carries the agent's last log line), cut so the table stays readable."""
    if s.approval:
        return f"{s.approval['decision']} by {s.approval['by']}"
    first = s.message.splitlines()[0] if s.message else ""
    limit = 240 if s.phase == "Failed" else 80
    return first if len(first) <= limit else first[: limit - 1] + "…"


def step_table(
    state: RunState | None,
    title: str,
    agents: Mapping[str, str] | None = None,
    depths: Mapping[str, int] | None = None,
) -> Table:
    """The run's steps. `agents` (step -> Agent, see agent_steps) lets waiting steps show as
    Queued; `depths` (Agent -> tasks in its queue) adds how many wait there."""
    table = Table(title=title, title_justify="left")
    for col in ("step", "phase", "attempts", "duration", "detail"):
        table.add_column(col)
    if state is None:
        return table
    for name, s in run_view(state).steps.items():
        attempts = str(s.attempt) if s.items is None else f"{s.items.done}/{s.items.total}"
        phase, waiting = shown_phase(s, (agents or {}).get(name), depths or {})
        detail = _detail(s) or waiting
        style = _STYLE.get(phase, "white")
        table.add_row(
            name,
            f"[{style}]{phase}[/{style}]",
            attempts,
            _seconds(s.queued_at or s.started_at, s.finished_at),
            escape(detail),
        )
    return table


class Progress:
    """Re-renders the step table whenever the run changes."""

    def __init__(self, console: Console, workflow: str, agents: Mapping[str, str] | None = None) -> None:
        self.console = console
        self.workflow = workflow
        self.agents = dict(agents or {})
        self.depths: dict[str, int] = {}
        self.state: RunState | None = None
        self.live = Live(
            step_table(None, f"{workflow}: starting"), console=console, refresh_per_second=8, transient=True
        )

    def __enter__(self) -> Progress:
        self.live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.live.__exit__(*exc)

    def update(self, state: RunState) -> None:
        self.state = state
        self.live.update(self.table())

    def set_queue_depths(self, depths: Mapping[str, int]) -> None:
        """Agent -> tasks in its queue, read by the runner (at most once a second)."""
        self.depths = dict(depths)
        if self.state is not None:
            self.live.update(self.table())

    def table(self) -> Table:
        state = self.state
        title = f"{self.workflow} {state.run}: {state.phase}" if state else f"{self.workflow}: starting"
        return step_table(state, title, self.agents, self.depths)

    def pause(self) -> None:
        self.live.stop()

    def resume(self) -> None:
        self.live.start()
