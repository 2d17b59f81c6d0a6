"""The run tree of `cadenza get RUN`: a run's steps with their phases, attempts (and
retries), waiting vs executing time, usage, messages, forEach counts, child runs and each
step's input (observe/step_input.py) on one line, cut to MAX_INPUT_CHARS.

Rendered from the engine's `RunView` (engine/view.py), the one reading of a run record
that the WorkflowRun status, `cadenza run` and the web console share, so a number here
means what it means there. Every piece of user data (a step's message, an error, a
worker's name) goes in as `rich.text.Text`, never as markup: `[red]boom[/red]` in a
message prints as written.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from rich.text import Text
from rich.tree import Tree

from ..engine.state import Attempt, Timing, Usage, attempt_stages
from ..engine.view import RunView, StepView

PHASE_STYLES = {
    "Succeeded": "green",
    "Failed": "red",
    "Cancelled": "red",
    "Running": "yellow",
    "Paused": "magenta",
    "WaitingApproval": "magenta",
    "Skipped": "dim",
    "Pending": "dim",
}
MAX_DETAIL_CHARS = 2000
"""Characters of one message or error shown; the JSON form (`--output json`) has them whole."""
MAX_INPUT_CHARS = 120
"""Characters of a step's input (compact JSON) shown on its line: a glance, not the value;
`--output json` and the console have it whole."""


def seconds(value: float | None) -> str:
    """A duration as people read it: 0.42s, 12.3s, 4m05s, 2h03m."""
    if value is None:
        return "-"
    if value < 10:
        return f"{value:.2f}s"
    if value < 60:
        return f"{value:.1f}s"
    minutes, secs = divmod(int(value), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h{minutes:02d}m"
    return f"{hours // 24}d{hours % 24:02d}h"


def phase_text(phase: str) -> Text:
    return Text(str(phase), style=PHASE_STYLES.get(str(phase), ""))


def _clip(text: str, limit: int = MAX_DETAIL_CHARS) -> str:
    text = " ".join(text.split())  # one line: a multi-line traceback stays one tree node
    return text if len(text) <= limit else text[: limit - 1] + "…"


def input_line(step_input: Mapping[str, Any]) -> Text:
    """`input: {...}  (label)`: a step input's document (StepInput.document()) on one line,
    labelled as the JSON labels it (rendered, its template and why, a forEach's items)."""
    value = json.dumps(step_input.get("value"), separators=(",", ":"), ensure_ascii=False, default=str)
    line = Text("input: ", style="dim")
    line.append(_clip(value, MAX_INPUT_CHARS))
    line.append(f"  ({step_input.get('label', '')})", style="dim")
    return line


def _timing(t: Timing | None) -> Text:
    if t is None or not t.attempts:
        return Text()
    return Text(f"  waiting {seconds(t.waiting)} executing {seconds(t.executing)}", style="cyan")


def _usage(u: Usage | None) -> Text:
    if u is None or not (u.calls or u.tokens or u.cost):
        return Text()
    cost = f" cost {u.cost:.6g}" if u.cost else ""
    return Text(f"  tokens {u.inputTokens}+{u.outputTokens}{cost} ({u.calls} calls)", style="blue")


def _error(error: Any) -> str:
    if not isinstance(error, dict):
        return str(error)
    kind, message = error.get("type"), error.get("message")
    return f"{kind}: {message}" if kind else str(message or error)


def step_label(s: StepView) -> Text:
    label = Text.assemble((s.name, "bold"), "  ", phase_text(s.phase))
    if s.items is not None:
        done = s.items.counts.get("Succeeded", 0)
        extra = [f"{n} {k}" for k, n in sorted(s.items.counts.items()) if k != "Succeeded" and n]
        if s.items.in_flight:
            extra.append(f"{s.items.in_flight} in flight")
        label.append(f"  items {done}/{s.items.total}" + (f" ({', '.join(extra)})" if extra else ""))
    if s.attempts:
        label.append(f"  attempts {s.attempts}")
    retries = s.items.retries if s.items is not None else s.retries
    if retries:
        label.append(f" (retries {retries})")
    if s.queued:
        label.append(f"  {s.queued} queued for an agent", style="yellow")
    label.append_text(_timing(s.timing))
    label.append_text(_usage(s.usage))
    return label


def attempt_label(a: Attempt) -> Text:
    label = Text(f"#{a.n} ")
    label.append_text(phase_text(a.outcome or ("Running" if a.startedAt else "Queued")))
    if a.worker:
        label.append("  on ")
        label.append(a.worker)
    if a.finishedAt is not None:
        scheduling, queued, executing = attempt_stages(a.readyAt, a.queuedAt, a.startedAt, a.finishedAt)
        label.append(f"  waiting {seconds(scheduling + queued)} executing {seconds(executing)}", style="cyan")
    label.append_text(_usage(a.usage))
    if a.error:
        label.append("  ")
        label.append(_clip(_error(a.error)), style="red")
    return label


def step_node(s: StepView, step_input: Mapping[str, Any] | None = None) -> Tree:
    node = Tree(step_label(s))
    if step_input is not None and step_input.get("value") is not None:  # None: it takes no input
        node.add(input_line(step_input))
    if s.reason:
        node.add(Text(_clip(s.reason), style="red" if s.phase == "Failed" else "italic"))
    if s.error and s.message and _error(s.error) not in s.message:
        node.add(Text("error: " + _clip(_error(s.error)), style="red"))
    if s.approval:
        decision = s.approval.get("decision")
        comment = s.approval.get("comment")
        node.add(Text(f"{decision} by {s.approval.get('by')}" + (f": {comment}" if comment else "")))
    if s.child:
        node.add(Text(f"child run {s.child}"))
    if s.recovered_by:
        node.add(Text(f"recovered by its fallback {s.recovered_by}"))
    if s.items is not None and s.items.failed:
        node.add(Text(f"failed items: {', '.join(map(str, s.items.failed))}", style="red"))
    for attempt in s.history if len(s.history) > 1 or (s.history and s.history[0].error) else []:
        node.add(attempt_label(attempt))
    return node


def run_label(view: RunView, now: float | None = None) -> Text:
    label = Text.assemble((view.run, "bold"), "  ", phase_text(view.phase))
    label.append(f"  workflow {view.workflow}, namespace {view.namespace}")
    if view.started_at is not None and now is not None:
        label.append(f", started {seconds(max(0.0, now - view.started_at))} ago")
    if view.duration is not None:
        label.append(f", took {seconds(view.duration)}")
    elif view.started_at is not None and now is not None and not view.terminal:
        label.append(f", running for {seconds(max(0.0, now - view.started_at))}")
    label.append(f"  steps {view.finished_steps}/{len(view.steps)}")
    label.append_text(_timing(view.timing))
    label.append_text(_usage(view.usage))
    return label


def run_tree(
    view: RunView, *, now: float | None = None, inputs: Mapping[str, Mapping[str, Any]] | None = None
) -> Tree:
    """The tree of `cadenza get`: the run, then each step in the workflow's order, with its
    input from `inputs` (step name -> StepInput.document()) when given."""
    tree = Tree(run_label(view, now))
    if view.retry_of:
        tree.add(Text(f"retry of run {view.retry_of}", style="italic"))
    if view.message:
        tree.add(Text(_clip(view.message), style="red" if view.phase == "Failed" else "italic"))
    for step in view.steps.values():
        tree.add(step_node(step, (inputs or {}).get(step.name)))
    return tree
