"""Where the run page draws things: the DAG's layered layout and the attempts' timeline.

Pure: built from a compiled workflow and a `RunView` (engine/view.py, which computes the
phases, forEach counts and timing every other reader shows), no I/O, no clock beyond the
`now` handed in. The templates turn these boxes and bars into inline SVG.

The layout is the classic layered one (Sugiyama's first two steps, kept minimal): a step's
column is the longest chain of dependencies before it, rows within a column follow the
mean row of the step's dependencies (one top-down pass), ties in the workflow's order.
Drawn left to right, a workflow of hundreds of steps stays one scrollable picture; a
library (graphviz, ELK) would be a native or JavaScript dependency for this one picture.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...engine.definition import CompiledStep, CompiledWorkflow
from ...engine.view import RunView, StepView

NODE_W, NODE_H = 176, 50
COL_GAP, ROW_GAP = 64, 16
PAD = 12
MAX_LABEL = 22
MAX_BARS = 400
"""Attempts drawn on the timeline at most (a record keeps 20 per step; a 200-step run's
page stays bounded); the rest are counted under it."""


@dataclass(frozen=True)
class Node:
    name: str
    label: str  # the name, shortened to fit the box (the full name is the node's title)
    kind: str  # agent | workflow | approval | signal
    role: str  # step | fallback | exit
    phase: str
    detail: str  # forEach counts "37/100", attempts "try 2"
    x: float
    y: float


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    role: str  # dep | fallback | exit
    path: str  # SVG path data


@dataclass(frozen=True)
class Graph:
    nodes: list[Node]
    edges: list[Edge]
    width: float
    height: float


def _label(name: str) -> str:
    return name if len(name) <= MAX_LABEL else name[: MAX_LABEL - 1] + "…"


def _detail(sv: StepView | None) -> str:
    if sv is None:
        return ""
    if sv.items is not None:
        return f"{sv.items.done}/{sv.items.total}"
    if sv.attempt > 1:
        return f"try {sv.attempt}"
    return ""


def _kind(cs: CompiledStep) -> str:
    if cs.agent:
        return "agent"
    return cs.kind


def dag(wf: CompiledWorkflow, view: RunView | None) -> Graph:
    """The workflow's steps in columns by dependency depth; fallbacks one column after the
    step they stand in for, onExit in a column of its own after everything."""
    fallback_of = {name: cs.on_failure for name, cs in wf.steps.items() if cs.on_failure in wf.fallbacks}
    column: dict[str, int] = {}
    for name in wf.order:  # topological: dependencies first
        cs = wf.steps[name]
        col = max((column[d] + 1 for d in cs.deps if d in column), default=0)
        column[name] = col
    for failed, fallback in fallback_of.items():  # a fallback after the step it stands in for
        if not wf.steps[fallback].deps:
            column[fallback] = max(column[fallback], column[failed] + 1)
    steps = dict(wf.steps)
    if wf.on_exit is not None:
        steps[wf.on_exit.name] = wf.on_exit
        column[wf.on_exit.name] = max(column.values(), default=-1) + 1

    order = {name: i for i, name in enumerate([*wf.order, *(n for n in steps if n not in wf.order)])}
    columns: dict[int, list[str]] = {}
    for name in sorted(steps, key=order.__getitem__):
        columns.setdefault(column[name], []).append(name)
    row: dict[str, float] = {}
    for col in sorted(columns):
        names = columns[col]

        def barycenter(name: str) -> tuple[float, int]:
            parents = [row[d] for d in steps[name].deps if d in row]
            for failed, fallback in fallback_of.items():
                if fallback == name and failed in row:
                    parents.append(row[failed])
            mean = sum(parents) / len(parents) if parents else float(order[name])
            return mean, order[name]

        names.sort(key=barycenter)
        for i, name in enumerate(names):
            row[name] = i

    def x_of(name: str) -> float:
        return PAD + column[name] * (NODE_W + COL_GAP)

    def y_of(name: str) -> float:
        return PAD + row[name] * (NODE_H + ROW_GAP)

    nodes = []
    for name, cs in steps.items():
        sv = view.steps.get(name) if view is not None else None
        role = "exit" if cs.is_exit else "fallback" if name in wf.fallbacks else "step"
        nodes.append(
            Node(
                name=name,
                label=_label(name),
                kind=_kind(cs),
                role=role,
                phase=sv.phase if sv is not None else "Pending",
                detail=_detail(sv),
                x=x_of(name),
                y=y_of(name),
            )
        )

    def curve(a: str, b: str) -> str:
        x1, y1 = x_of(a) + NODE_W, y_of(a) + NODE_H / 2
        x2, y2 = x_of(b), y_of(b) + NODE_H / 2
        mid = (x1 + x2) / 2
        return f"M{x1:.0f},{y1:.0f} C{mid:.0f},{y1:.0f} {mid:.0f},{y2:.0f} {x2:.0f},{y2:.0f}"

    edges = [Edge(d, name, "dep", curve(d, name)) for name, cs in wf.steps.items() for d in cs.deps]
    edges += [Edge(f, fb, "fallback", curve(f, fb)) for f, fb in fallback_of.items()]
    if wf.on_exit is not None:
        last = [n for n in wf.steps if not wf.dependents.get(n) and n not in wf.fallbacks]
        edges += [Edge(n, wf.on_exit.name, "exit", curve(n, wf.on_exit.name)) for n in last]
    cols = max(column.values(), default=0) + 1
    rows = max((len(names) for names in columns.values()), default=1)
    width = 2 * PAD + cols * NODE_W + (cols - 1) * COL_GAP
    height = 2 * PAD + rows * NODE_H + (rows - 1) * ROW_GAP
    return Graph(nodes, edges, width, height)


# ------------------------------------------------------------------ timeline

ROW_H, LABEL_W, CHART_W, AXIS_H = 18, 190, 760, 20


@dataclass(frozen=True)
class Bar:
    step: str
    attempt: int
    outcome: str  # Succeeded | Failed | ... | Running
    y: float
    wait_x: float  # ready (else queued) -> started: waiting
    wait_w: float
    exec_x: float  # started -> finished (or now): executing
    exec_w: float
    title: str


@dataclass(frozen=True)
class Tick:
    x: float
    label: str


@dataclass(frozen=True)
class Timeline:
    bars: list[Bar]
    ticks: list[Tick]
    width: float
    height: float
    left: float
    omitted: int  # attempts not drawn (beyond MAX_BARS)


def _fmt(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 120:
        return f"{seconds:.1f}s"
    return f"{seconds / 60:.1f}m"


def timeline(view: RunView, now: float) -> Timeline:
    """One row per attempt (the record's history, then a running one), in order of
    readiness: its waiting part (ready -> started, grey) and its executing part (started ->
    finished, or now while it runs), on one time axis from the run's creation."""
    spans: list[tuple[str, int, str, float, float | None, float]] = []  # step, n, outcome, ready, start, end
    for sv in view.steps.values():
        for a in sv.history:
            ready = a.readyAt if a.readyAt is not None else a.queuedAt
            end = a.finishedAt if a.finishedAt is not None else now
            spans.append((sv.name, a.n, a.outcome or "Running", ready, a.startedAt, end))
        first = sv.queued_at if sv.queued_at is not None else sv.started_at
        if not sv.history and first is not None:
            # forEach items, approvals and signals keep no attempt records: the step's span
            end = sv.finished_at if sv.finished_at is not None else now
            spans.append((sv.name, 0, sv.phase, first, sv.started_at, end))
    spans.sort(key=lambda s: (s[3], s[0], s[1]))
    omitted = max(0, len(spans) - MAX_BARS)
    spans = spans[:MAX_BARS]
    origin = view.created_at
    end = max([now if not view.terminal else (view.finished_at or now)] + [s[5] for s in spans])
    total = max(end - origin, 0.001)
    scale = CHART_W / total

    def x(t: float) -> float:
        return LABEL_W + max(0.0, t - origin) * scale

    bars = []
    for i, (step, n, outcome, ready, started, finished) in enumerate(spans):
        start = started if started is not None else finished
        wait_w = max(0.0, x(start) - x(ready))
        exec_w = max(1.0, x(finished) - x(start)) if started is not None else 0.0
        waited = max(0.0, start - ready)
        ran = f", executing {_fmt(max(0.0, finished - start))}" if started is not None else ""
        bars.append(
            Bar(
                step=step,
                attempt=n,
                outcome=outcome,
                y=AXIS_H + i * ROW_H,
                wait_x=x(ready),
                wait_w=wait_w,
                exec_x=x(start),
                exec_w=exec_w,
                title=f"{step} attempt {n}: {outcome}; waiting {_fmt(waited)}{ran}",
            )
        )
    ticks = [Tick(LABEL_W + CHART_W * i / 4, "+" + _fmt(total * i / 4)) for i in range(5)]
    return Timeline(
        bars=bars,
        ticks=ticks,
        width=LABEL_W + CHART_W + 40,
        height=AXIS_H + max(1, len(bars)) * ROW_H + 4,
        left=LABEL_W,
        omitted=omitted,
    )
