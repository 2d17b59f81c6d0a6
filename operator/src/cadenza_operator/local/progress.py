"""Live progress of a run on a terminal (rich), and the summary table at the end."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from ..engine.state import RunState

_STYLE = {
    "Succeeded": "green",
    "Failed": "red",
    "Cancelled": "yellow",
    "Skipped": "dim",
    "Running": "cyan",
    "WaitingApproval": "magenta",
    "Pending": "white",
}


def _seconds(start: float | None, end: float | None) -> str:
    if not start:
        return ""
    return f"{((end or time.time()) - start):.2f}s"


def step_table(state: RunState | None, title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for col in ("step", "phase", "attempts", "duration", "detail"):
        table.add_column(col)
    if state is None:
        return table
    for name, st in state.steps.items():
        attempts = str(st.attempt)
        detail = st.message
        if st.forEach is not None:
            done = sum(st.forEach.counts.values())
            attempts = f"{done}/{st.forEach.total}"
            detail = detail or f"{len(st.forEach.running)} in flight"
        if st.approval:
            detail = f"{st.approval['decision']} by {st.approval['by']}"
        style = _STYLE.get(st.phase, "white")
        table.add_row(
            name,
            f"[{style}]{st.phase}[/{style}]",
            attempts,
            _seconds(st.firstQueuedAt or st.startedAt, st.finishedAt),
            detail[:80],
        )
    return table


class Progress:
    """Re-renders the step table whenever the run changes."""

    def __init__(self, console: Console, workflow: str) -> None:
        self.console = console
        self.workflow = workflow
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
        self.live.update(step_table(state, f"{self.workflow} {state.run}: {state.phase}"))

    def pause(self) -> None:
        self.live.stop()

    def resume(self) -> None:
        self.live.start()
