"""The run list of `cadenza list`: one row per run, newest first, like `argo list`.

Rows are built from the engine's `RunView` (engine/view.py), the reading of a run record
the status writer, `cadenza get` and the web console share. Cells hold user data (a run's
message) as `rich.text.Text`, never as markup.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from rich.table import Table
from rich.text import Text

from ..engine.view import RunView, usage_doc
from .tree import phase_text, seconds

MAX_MESSAGE_CHARS = 200
"""Characters of a run's message in a row (`cadenza get` and JSON have it whole)."""


@dataclass(frozen=True)
class RunFilter:
    """Which runs `cadenza list` shows: all of them for every field left None."""

    namespace: str | None = None
    workflow: str | None = None
    phase: str | None = None
    since: float | None = None
    """Seconds: runs created at most this long ago."""

    def keeps(self, view: RunView, now: float) -> bool:
        return (
            (self.namespace is None or view.namespace == self.namespace)
            and (self.workflow is None or view.workflow == self.workflow)
            and (self.phase is None or str(view.phase).lower() == self.phase.lower())
            and (self.since is None or view.created_at >= now - self.since)
        )


def parse_since(text: str) -> float:
    """`90s`, `15m`, `1h`, `2d` (or plain seconds) as seconds; ValueError naming the text."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    raw = text.strip().lower()
    scale = units.get(raw[-1:])
    number = raw[:-1] if scale is not None else raw
    try:
        value = float(number) * (scale or 1)
    except ValueError:
        raise ValueError(f"--since {text!r}: not a duration (90s, 15m, 1h, 2d)") from None
    if not value > 0 or value == float("inf"):
        raise ValueError(f"--since {text!r}: not a duration above 0")
    return value


def progress(view: RunView) -> str:
    return f"{view.finished_steps}/{len(view.steps)}"


def row(view: RunView, now: float) -> dict[str, Any]:
    """A run as `cadenza list --output json` gives it."""
    end = view.finished_at if view.finished_at is not None else (now if view.started_at else None)
    return {
        "run": view.run,
        "namespace": view.namespace,
        "workflow": view.workflow,
        "phase": str(view.phase),
        "createdAt": view.created_at,
        "startedAt": view.started_at,
        "finishedAt": view.finished_at,
        "durationSeconds": (end - view.started_at) if end is not None and view.started_at else None,
        "progress": progress(view),
        "message": view.message,
        "retryOf": view.retry_of,
        "usage": usage_doc(view.usage),
    }


def run_table(
    views: list[RunView], *, wide: bool = False, namespaces: bool = False, now: float | None = None
) -> Table:
    """The table `cadenza list` prints: NAMESPACE (with -A), NAME, WORKFLOW, PHASE, STARTED
    (age), DURATION, PROGRESS, MESSAGE; wide adds the retried run and usage."""
    now = time.time() if now is None else now
    table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
    columns = (["NAMESPACE"] if namespaces else []) + [
        "NAME",
        "WORKFLOW",
        "PHASE",
        "STARTED",
        "DURATION",
        "PROGRESS",
    ]
    if wide:
        columns += ["RETRY OF", "TOKENS", "COST"]
    for name in [*columns, "MESSAGE"]:
        table.add_column(name, no_wrap=True, overflow="ignore")
    for view in views:
        data = row(view, now)
        cells: list[Text | str] = [view.namespace] if namespaces else []
        cells += [
            Text(view.run),
            Text(view.workflow),
            phase_text(view.phase),
            seconds(max(0.0, now - view.created_at)) + " ago",
            seconds(data["durationSeconds"]),
            progress(view),
        ]
        if wide:
            cells += [
                Text(view.retry_of or ""),
                str(view.usage.tokens) if view.usage.tokens else "",
                f"{view.usage.cost:.6g}" if view.usage.cost else "",
            ]
        message = " ".join(view.message.split())
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[: MAX_MESSAGE_CHARS - 1] + "…"
        cells.append(Text(message))
        table.add_row(*cells)
    return table
