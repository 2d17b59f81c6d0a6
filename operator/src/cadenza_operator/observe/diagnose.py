"""`cadenza diagnose WORKFLOW`: the four symptoms of a workflow in trouble, over its recent runs.

1. **Waiting**: per step, time from ready to started (scheduling and the agent's queue)
   against time from started to finished, summed and as p50/p95 over attempts; a step
   whose waiting exceeds its executing is flagged.
2. **Retries and timeouts**: their rates per step, and whether they rise with load. The
   load of a step execution is the number of runs of the workflow in flight when the step
   was first dispatched (this run included). Executions are split at the median load; a
   rate is flagged when it is clearly higher in the high half (`LOAD_RULE`).
3. **Non-determinism**: succeeded attempts grouped by (step, inputHash); a group with more
   than one outputHash is a step whose output differs for identical inputs.
4. **Traceability**: audit records per run (the run record's `auditSeq`) and audit messages
   per run (the audit stream's per-subject counts, in one STREAM.INFO); for the runs with
   the most records, which steps those records are about.

`analyse` is pure (records and counts in, a `Report` out) and linear in the attempts it
reads; `diagnose` does the reading. The web console renders `Report.to_dict()`.
"""

from __future__ import annotations

import bisect
import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..engine.state import MAX_ATTEMPT_RECORDS, RunState, StepState, attempt_stages

__all__ = [
    "LOAD_RULE",
    "MIN_LOAD_SAMPLES",
    "Report",
    "UnknownWorkflow",
    "analyse",
    "diagnose",
    "render",
    "renderable",
]

MIN_WAITING_ATTEMPTS = 3
"""Finished attempts a step needs before its waiting is compared with its executing."""
RETRY_RATE_FLAG = 0.05
"""Retries (and timeouts) per finished attempt from which a step is flagged."""
MIN_LOAD_SAMPLES = 20
"""Step executions each load half needs before the halves are compared: on fewer, one
unlucky run would decide."""
LOAD_MIN_DIFFERENCE = 0.05
LOAD_MIN_Z = 2.0
WAITING_RULE = (
    f"waiting (ready -> started) summed over finished attempts exceeds executing "
    f"(started -> finished), on at least {MIN_WAITING_ATTEMPTS} attempts"
)
RETRY_RULE = f"retries or timeouts per finished attempt at least {RETRY_RATE_FLAG:.0%}"
LOAD_DEFINITION = (
    "load of a step execution: runs of the workflow in flight (started, not finished) "
    "when the step was first dispatched, this run included"
)
LOAD_RULE = (
    f"executions split at the median load; flagged when both halves have at least "
    f"{MIN_LOAD_SAMPLES} executions and the share retried (or timed out) in the high half "
    f"exceeds the low half's by at least {LOAD_MIN_DIFFERENCE:.0%} with a one-sided "
    f"two-proportion z of at least {LOAD_MIN_Z:g}"
)
NONDETERMINISM_RULE = (
    "succeeded attempts of a step with the same inputHash and more than one outputHash "
    "(values passed by reference are compared by reference)"
)
MAX_RUNS = 100_000
"""Runs read at most (the newest): the analysis is linear, but each record is parsed."""
TOP_RUNS = 10
"""Runs listed (and whose audit records are read) for traceability."""
EXAMPLES = 3
"""Input groups shown per non-deterministic step, and run ids per output."""


class UnknownWorkflow(LookupError):
    """No definition of the workflow was ever published in the namespace, and it has no runs."""


# ------------------------------------------------------------------ the report
@dataclass
class Spread:
    """Seconds summed over attempts, and their 50th and 95th percentiles."""

    total: float = 0.0
    p50: float | None = None
    p95: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"total": round(self.total, 6), "p50": _round(self.p50), "p95": _round(self.p95)}


@dataclass
class LoadHalf:
    executions: int = 0
    retried: int = 0
    timedOut: int = 0
    minLoad: int | None = None
    maxLoad: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "executions": self.executions,
            "retried": self.retried,
            "timedOut": self.timedOut,
            "retriedShare": _share(self.retried, self.executions),
            "timedOutShare": _share(self.timedOut, self.executions),
            "minLoad": self.minLoad,
            "maxLoad": self.maxLoad,
        }


@dataclass
class StepReport:
    step: str
    executions: int = 0
    attempts: int = 0  # finished attempts (items included)
    attemptsRecorded: int = 0  # finished attempts in the capped per-attempt history
    waiting: Spread = field(default_factory=Spread)
    executing: Spread = field(default_factory=Spread)
    waitingExceedsExecuting: bool = False
    retries: int = 0
    timeouts: int = 0
    low: LoadHalf = field(default_factory=LoadHalf)
    high: LoadHalf = field(default_factory=LoadHalf)
    loadCompared: bool = False
    retriesRiseWithLoad: bool = False
    timeoutsRiseWithLoad: bool = False
    forEach: bool = False
    capped: int = 0  # executions with more attempts than the record keeps

    @property
    def retry_rate(self) -> float | None:
        return _share(self.retries, self.attempts)

    @property
    def timeout_rate(self) -> float | None:
        return _share(self.timeouts, self.attemptsRecorded)

    @property
    def retrying(self) -> bool:
        rates = (self.retry_rate or 0.0, self.timeout_rate or 0.0)
        return self.attempts > 0 and max(rates) >= RETRY_RATE_FLAG

    @property
    def rises_with_load(self) -> bool:
        return self.retriesRiseWithLoad or self.timeoutsRiseWithLoad

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "forEach": self.forEach,
            "executions": self.executions,
            "attempts": self.attempts,
            "attemptsRecorded": self.attemptsRecorded,
            "waiting": self.waiting.to_dict(),
            "executing": self.executing.to_dict(),
            "waitingExceedsExecuting": self.waitingExceedsExecuting,
            "retries": self.retries,
            "retryRate": _round(self.retry_rate),
            "timeouts": self.timeouts,
            "timeoutRate": _round(self.timeout_rate),
            "load": {
                "compared": self.loadCompared,
                "low": self.low.to_dict(),
                "high": self.high.to_dict(),
                "retriesRise": self.retriesRiseWithLoad,
                "timeoutsRise": self.timeoutsRiseWithLoad,
            },
            "historyCapped": self.capped,
        }


@dataclass
class OutputGroup:
    """One input of a step and the outputs it gave: outputHash -> (count, example runs)."""

    inputHash: str
    outputs: dict[str, tuple[int, list[str]]]

    def to_dict(self) -> dict[str, Any]:
        ranked = sorted(self.outputs.items(), key=lambda kv: (-kv[1][0], kv[0]))
        return {
            "inputHash": self.inputHash,
            "distinctOutputs": len(ranked),
            "outputs": [{"outputHash": h, "count": n, "runs": runs} for h, (n, runs) in ranked[:EXAMPLES]],
        }


@dataclass
class NonDeterministicStep:
    step: str
    attemptsCompared: int
    inputs: int  # distinct inputHashes seen more than once
    inputsWithDifferentOutputs: int
    examples: list[OutputGroup]

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "attemptsCompared": self.attemptsCompared,
            "inputsSeenTwice": self.inputs,
            "inputsWithDifferentOutputs": self.inputsWithDifferentOutputs,
            "examples": [g.to_dict() for g in self.examples],
        }


@dataclass
class TracedRun:
    run: str
    auditRecords: int
    auditMessages: int | None
    steps: dict[str, int] | None  # audit records by step ("" for the run's own), when read

    def to_dict(self) -> dict[str, Any]:
        steps = None
        if self.steps is not None:
            steps = dict(sorted(self.steps.items(), key=lambda kv: (-kv[1], kv[0])))
        return {
            "run": self.run,
            "auditRecords": self.auditRecords,
            "auditMessages": self.auditMessages,
            "steps": steps,
        }


@dataclass
class Report:
    """What `cadenza diagnose` prints; `to_dict()` is its `--output json` (stable keys)."""

    workflow: str
    namespace: str
    since: float
    now: float
    runs: int = 0
    phases: dict[str, int] = field(default_factory=dict)
    steps: list[StepReport] = field(default_factory=list)
    nondeterministic: list[NonDeterministicStep] = field(default_factory=list)
    comparedSteps: list[str] = field(default_factory=list)
    unhashed: int = 0
    auditRecords: int = 0
    auditMessages: int | None = 0
    topRuns: list[TracedRun] = field(default_factory=list)
    traceSteps: dict[str, int] = field(default_factory=dict)  # audit records by step over topRuns
    notes: list[str] = field(default_factory=list)

    @property
    def waiting_steps(self) -> list[str]:
        return [s.step for s in self.steps if s.waitingExceedsExecuting]

    @property
    def retrying_steps(self) -> list[str]:
        return [s.step for s in self.steps if s.retrying]

    @property
    def load_steps(self) -> list[str]:
        return [s.step for s in self.steps if s.rises_with_load]

    def to_dict(self) -> dict[str, Any]:
        traced = sum(r.auditRecords for r in self.topRuns if r.steps is not None)
        return {
            "workflow": self.workflow,
            "namespace": self.namespace,
            "since": self.since,
            "now": self.now,
            "runs": {"total": self.runs, "byPhase": dict(sorted(self.phases.items()))},
            "steps": [s.to_dict() for s in self.steps],
            "waiting": {"rule": WAITING_RULE, "flagged": self.waiting_steps},
            "retries": {"rule": RETRY_RULE, "flagged": self.retrying_steps},
            "load": {"definition": LOAD_DEFINITION, "rule": LOAD_RULE, "flagged": self.load_steps},
            "nondeterminism": {
                "rule": NONDETERMINISM_RULE,
                "flagged": [n.step for n in self.nondeterministic],
                "steps": [n.to_dict() for n in self.nondeterministic],
                "stepsCompared": self.comparedSteps,
                "attemptsWithoutHashes": self.unhashed,
            },
            "trace": {
                "auditRecords": self.auditRecords,
                "auditMessages": self.auditMessages,
                "recordsPerRun": _round(self.auditRecords / self.runs) if self.runs else None,
                "topRuns": [r.to_dict() for r in self.topRuns],
                "steps": [
                    {"step": step, "records": n, "share": _share(n, traced)}
                    for step, n in sorted(self.traceSteps.items(), key=lambda kv: (-kv[1], kv[0]))
                ],
            },
            "notes": self.notes,
        }


# ---------------------------------------------------------------- the analysis
@dataclass
class _Execution:
    """One step of one run, for the load comparison."""

    load: int
    retried: bool
    timed_out: bool


@dataclass
class _StepData:
    report: StepReport
    waits: list[float] = field(default_factory=list)
    runs_: list[float] = field(default_factory=list)
    executions: list[_Execution] = field(default_factory=list)
    # inputHash -> outputHash -> [count, example runs]
    outputs: dict[str, dict[str, list[Any]]] = field(default_factory=dict)
    compared: int = 0


def analyse(
    records: Iterable[RunState],
    audit_counts: Mapping[str, int] | None,
    now: float,
    *,
    workflow: str = "",
    namespace: str = "",
    since: float = 3600.0,
    audit_steps: Mapping[str, Mapping[str, int]] | None = None,
    load_records: Iterable[RunState] | None = None,
) -> Report:
    """The report over `records`: the runs of one workflow started within `since` seconds
    before `now` (others are left out here). `audit_counts`: audit messages per run id
    (None: the stream was not read). `audit_steps`: for the runs most traced, their audit
    records counted by step ("" for the run's own records). `load_records`: every run of
    the workflow known, to measure load (runs started before the window still load it);
    `records` when None. Linear in the attempts read, apart from sorting per step."""
    runs = [r for r in records if _started(r) >= now - since and (not workflow or r.workflow == workflow)]
    report = Report(workflow=workflow, namespace=namespace, since=since, now=now, runs=len(runs))
    if not runs:
        return report
    report.workflow = report.workflow or runs[0].workflow
    report.namespace = report.namespace or runs[0].namespace
    load_at = _load_counter(runs if load_records is None else [*load_records, *runs])
    steps: dict[str, _StepData] = {}
    phases: Counter[str] = Counter()
    running = 0
    for run in runs:
        phases[str(run.phase)] += 1  # a RunPhase is a StrEnum: its value
        running += not run.terminal
        for name, st in run.steps.items():
            if not st.attempt and st.timing is None and st.forEach is None:
                continue  # never dispatched: skipped, approval, signal, not reached
            data = steps.get(name)
            if data is None:
                data = steps[name] = _StepData(StepReport(step=name))
            report.unhashed += _add_step(data, run, st, load_at)
    report.phases = dict(phases)
    for name in sorted(steps):
        data = steps[name]
        _finish_step(data)
        report.steps.append(data.report)
        nd = _nondeterminism(name, data)
        if data.compared:
            report.comparedSteps.append(name)
        if nd is not None:
            report.nondeterministic.append(nd)
    _trace(report, runs, audit_counts, audit_steps or {})
    _notes(report, running)
    return report


def top_traced_runs(records: Iterable[RunState], now: float, since: float, n: int = TOP_RUNS) -> list[str]:
    """The runs in the window with the most audit records, most first (ties by run id)."""
    runs = [r for r in records if _started(r) >= now - since]
    runs.sort(key=lambda r: (-r.auditSeq, r.run))
    return [r.run for r in runs[:n]]


def _started(run: RunState) -> float:
    return run.startedAt if run.startedAt is not None else run.createdAt


def _load_counter(runs: Iterable[RunState]) -> Callable[[float], int]:
    """in_flight(t): runs started at or before t and not finished at t, by two sorted lists
    and bisection (n log n, whatever the number of runs)."""
    seen: dict[str, RunState] = {r.run: r for r in runs}
    starts = sorted(_started(r) for r in seen.values())
    ends = sorted(r.finishedAt for r in seen.values() if r.finishedAt is not None)

    def in_flight(t: float) -> int:
        return max(1, bisect.bisect_right(starts, t) - bisect.bisect_right(ends, t))

    return in_flight


def _add_step(data: _StepData, run: RunState, st: StepState, load_at: Callable[[float], int]) -> int:
    """Add one step of one run; return its finished attempts that carry no hashes."""
    rep = data.report
    rep.executions += 1
    rep.retries += st.retries
    timing = st.timing
    if st.forEach is not None:
        rep.forEach = True
    if timing is not None:
        rep.attempts += timing.attempts
        rep.waiting.total += timing.waiting
        rep.executing.total += timing.executing
    timed_out = False
    unhashed = 0
    if st.attempt > len(st.attempts) and st.forEach is None:
        rep.capped += 1
    for a in st.attempts:
        if a.finishedAt is None:
            continue
        rep.attemptsRecorded += 1
        scheduling, queued, executing = attempt_stages(a.readyAt, a.queuedAt, a.startedAt, a.finishedAt)
        data.waits.append(scheduling + queued)
        data.runs_.append(executing or 0.0)
        if timing is None:  # a record from before step timings: sum what the history holds
            rep.attempts += 1
            rep.waiting.total += scheduling + queued
            rep.executing.total += executing or 0.0
        if a.outcome == "TimedOut":
            rep.timeouts += 1
            timed_out = True
        if a.outcome == "Succeeded":
            if a.inputHash is None or a.outputHash is None:
                unhashed += 1
                continue
            data.compared += 1
            by_output = data.outputs.setdefault(a.inputHash, {})
            seen = by_output.get(a.outputHash)
            if seen is None:
                by_output[a.outputHash] = [1, [run.run]]
            else:
                seen[0] += 1
                if len(seen[1]) < EXAMPLES:
                    seen[1].append(run.run)
    first = st.firstQueuedAt if st.firstQueuedAt is not None else _started(run)
    data.executions.append(_Execution(load_at(first), st.retries > 0, timed_out))
    return unhashed


def _finish_step(data: _StepData) -> None:
    rep = data.report
    for values, spread in ((data.waits, rep.waiting), (data.runs_, rep.executing)):
        if values:
            values.sort()
            spread.p50 = _percentile(values, 0.50)
            spread.p95 = _percentile(values, 0.95)
    rep.waitingExceedsExecuting = (
        rep.attempts >= MIN_WAITING_ATTEMPTS and rep.waiting.total > rep.executing.total
    )
    _compare_load(rep, data.executions)


def _compare_load(rep: StepReport, executions: list[_Execution]) -> None:
    """Split at the median load (ties on the side that balances the halves best), then
    compare the share of executions retried, and timed out, in each half."""
    if len(executions) < 2 * MIN_LOAD_SAMPLES:
        return
    loads = sorted(e.load for e in executions)
    median = loads[(len(loads) - 1) // 2]
    # load <= median in the low half, or load < median: whichever is closer to even.
    at_or_below = bisect.bisect_right(loads, median)
    below = bisect.bisect_left(loads, median)
    half = len(loads) / 2
    cut_inclusive = abs(at_or_below - half) <= abs(below - half)
    low, high = LoadHalf(), LoadHalf()
    for e in executions:
        side = low if (e.load <= median if cut_inclusive else e.load < median) else high
        side.executions += 1
        side.retried += e.retried
        side.timedOut += e.timed_out
        side.minLoad = e.load if side.minLoad is None else min(side.minLoad, e.load)
        side.maxLoad = e.load if side.maxLoad is None else max(side.maxLoad, e.load)
    rep.low, rep.high = low, high
    if min(low.executions, high.executions) < MIN_LOAD_SAMPLES:
        return  # the load hardly varied: nothing to compare
    rep.loadCompared = True
    rep.retriesRiseWithLoad = _rises(low.retried, low.executions, high.retried, high.executions)
    rep.timeoutsRiseWithLoad = _rises(low.timedOut, low.executions, high.timedOut, high.executions)


def _rises(k_low: int, n_low: int, k_high: int, n_high: int) -> bool:
    """One-sided two-proportion z-test (pooled): is the high half's share clearly higher?"""
    p_low, p_high = k_low / n_low, k_high / n_high
    if p_high - p_low < LOAD_MIN_DIFFERENCE:
        return False
    pooled = (k_low + k_high) / (n_low + n_high)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n_low + 1 / n_high))
    return se > 0 and (p_high - p_low) / se >= LOAD_MIN_Z


def _nondeterminism(name: str, data: _StepData) -> NonDeterministicStep | None:
    repeated = 0
    differing: list[OutputGroup] = []
    count = 0
    for input_hash, by_output in data.outputs.items():
        if sum(n for n, _ in by_output.values()) > 1:
            repeated += 1
        if len(by_output) > 1:
            count += 1
            if len(differing) < EXAMPLES:
                differing.append(
                    OutputGroup(input_hash, {h: (n, runs) for h, (n, runs) in by_output.items()})
                )
    if not count:
        return None
    return NonDeterministicStep(name, data.compared, repeated, count, differing)


def _trace(
    report: Report,
    runs: list[RunState],
    audit_counts: Mapping[str, int] | None,
    audit_steps: Mapping[str, Mapping[str, int]],
) -> None:
    report.auditRecords = sum(r.auditSeq for r in runs)
    report.auditMessages = None if audit_counts is None else sum(audit_counts.get(r.run, 0) for r in runs)
    steps: Counter[str] = Counter()
    for run in sorted(runs, key=lambda r: (-r.auditSeq, r.run))[:TOP_RUNS]:
        by_step = audit_steps.get(run.run)
        if by_step is not None:
            steps.update(by_step)
        report.topRuns.append(
            TracedRun(
                run=run.run,
                auditRecords=run.auditSeq,
                auditMessages=None if audit_counts is None else audit_counts.get(run.run, 0),
                steps=dict(by_step) if by_step is not None else None,
            )
        )
    report.traceSteps = dict(steps)


def _notes(report: Report, running: int) -> None:
    """Say where the history is partial, so a reader knows what the numbers stand on."""
    notes = report.notes
    if running:
        notes.append(f"{running} run(s) still running: only their finished attempts are counted")
    capped = [s for s in report.steps if s.capped]
    if capped:
        names = ", ".join(f"{s.step} ({s.capped})" for s in capped)
        notes.append(
            f"attempt history capped at {MAX_ATTEMPT_RECORDS} per step in: {names}: percentiles, "
            "timeouts and output comparison use the attempts kept; sums and retries are exact"
        )
    each = [s.step for s in report.steps if s.forEach]
    if each:
        notes.append(
            f"forEach steps keep counts only for their items ({', '.join(each)}): sums and "
            "retries include items; percentiles, timeouts and output comparison do not"
        )
    if report.unhashed:
        notes.append(
            f"{report.unhashed} succeeded attempt(s) carry no input/output hash (recorded by an "
            "older engine): not compared"
        )
    if report.auditMessages is None:
        notes.append("the audit stream was not read: audit messages unknown")


def _percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def _share(part: int, whole: int) -> float | None:
    return round(part / whole, 6) if whole else None


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


# ------------------------------------------------------------------- the text
def render(report: Report, console: Any) -> None:
    """Print the report on a rich `console`."""
    console.print(renderable(report))


def renderable(report: Report) -> Any:
    """The report as rich tables and lines, one renderable (observe.terminal.show prints it
    unwrapped to a pipe). User data is escaped: a step or run id is printed as written,
    never read as markup."""
    from rich.console import Group
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    parts: list[Any] = []

    def add(item: Any, markup: bool = True) -> None:
        parts.append((Text.from_markup(item) if markup else Text(item)) if isinstance(item, str) else item)

    window = _duration(report.since)
    if not report.runs:
        add(
            f"no runs of workflow {escape(report.workflow)} in namespace {escape(report.namespace)} "
            f"started in the last {window}"
        )
        return Group(*parts)
    phases = ", ".join(f"{n} {escape(p)}" for p, n in sorted(report.phases.items()))
    add(
        f"[bold]{escape(report.workflow)}[/bold] in namespace {escape(report.namespace)}: "
        f"{report.runs} run(s) started in the last {window} ({phases})"
    )
    flags: dict[str, list[str]] = {s.step: [] for s in report.steps}
    for name in report.waiting_steps:
        flags[name].append("waits")
    for name in report.retrying_steps:
        flags[name].append("retries")
    for name in report.load_steps:
        flags[name].append("load")
    for nd in report.nondeterministic:
        flags[nd.step].append("non-deterministic")

    table = Table(title="Steps: waiting (ready -> started) vs executing, retries, load")
    for column in ("step", "attempts", "waiting Σ / p50 / p95", "executing Σ / p50 / p95"):
        table.add_column(column, justify="left" if column == "step" else "right")
    for column in ("retries", "timeouts", "retried low -> high load", "flags"):
        table.add_column(column, justify="left" if column == "flags" else "right")
    for s in report.steps:
        low, high = s.low.to_dict(), s.high.to_dict()
        load = (
            f"{_pct(low['retriedShare'])} -> {_pct(high['retriedShare'])}"
            if s.loadCompared
            else "too few"
            if not s.low.executions
            else "load constant"
        )
        table.add_row(
            escape(s.step) + (" (forEach)" if s.forEach else ""),
            str(s.attempts),
            _spread(s.waiting),
            _spread(s.executing),
            f"{s.retries} ({_pct(s.retry_rate)})",
            "-" if s.forEach and s.timeout_rate is None else f"{s.timeouts} ({_pct(s.timeout_rate)})",
            load,
            "[red]" + ", ".join(flags[s.step]) + "[/red]" if flags[s.step] else "",
        )
    add(table)

    if report.nondeterministic:
        nd_table = Table(title="Outputs that differ for identical inputs")
        for column in ("step", "attempts compared", "inputs seen twice+", "inputs with differing outputs"):
            nd_table.add_column(column, justify="left" if column == "step" else "right")
        nd_table.add_column("example: input -> outputs (runs)")
        for nd in report.nondeterministic:
            group = nd.examples[0].to_dict()
            outputs = "; ".join(
                f"{o['outputHash']} x{o['count']} ({', '.join(escape(r) for r in o['runs'])})"
                for o in group["outputs"]
            )
            if group["distinctOutputs"] > len(group["outputs"]):
                outputs += f"; {group['distinctOutputs']} distinct outputs in all"
            nd_table.add_row(
                escape(nd.step),
                str(nd.attemptsCompared),
                str(nd.inputs),
                str(nd.inputsWithDifferentOutputs),
                f"{group['inputHash']} -> {outputs}",
            )
        add(nd_table)
    else:
        compared = ", ".join(escape(s) for s in report.comparedSteps) or "none"
        add(f"Outputs that differ for identical inputs: none (steps compared: {compared})")

    messages = "unknown" if report.auditMessages is None else str(report.auditMessages)
    add(
        f"Audit trail: {report.auditRecords} record(s) in {messages} message(s), "
        f"{report.auditRecords / report.runs:.1f} records per run"
    )
    trace = Table(title="Runs with the most audit records")
    for column in ("run", "records", "messages", "records by step"):
        trace.add_column(column, justify="right" if column in ("records", "messages") else "left")
    for r in report.topRuns:
        by_step = r.to_dict()["steps"]
        steps = (
            ", ".join(f"{escape(k or '(run)')} {v}" for k, v in list(by_step.items())[:4])
            if by_step is not None
            else "not read"
        )
        trace.add_row(
            escape(r.run),
            str(r.auditRecords),
            "-" if r.auditMessages is None else str(r.auditMessages),
            steps,
        )
    add(trace)
    if report.traceSteps:
        ranked = report.to_dict()["trace"]["steps"][:5]
        listed = ", ".join(f"{escape(t['step'] or '(run)')} {_pct(t['share'])}" for t in ranked)
        add(f"Steps with the most records in those runs: {listed}")

    add("")
    add(f"waits: {WAITING_RULE}", markup=False)
    add(f"retries: {RETRY_RULE}", markup=False)
    add(f"load: {LOAD_DEFINITION}; {LOAD_RULE}", markup=False)
    add(f"non-deterministic: {NONDETERMINISM_RULE}", markup=False)
    for note in report.notes:
        add(f"note: {escape(note)}")
    return Group(*parts)


def _spread(spread: Spread) -> str:
    return f"{_seconds(spread.total)} / {_seconds(spread.p50)} / {_seconds(spread.p95)}"


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.0f}ms" if value < 1 else f"{value:.1f}s"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


# -------------------------------------------------------------------- the I/O
async def audit_counts(nc: Any, namespace: str) -> dict[str, int]:
    """Audit messages per run of a namespace, from STREAM.INFO with a subjects filter: one
    request per 100,000 subjects (the server's page; nats-py's stream_info reads only the
    first, so the request is made here with its offset)."""
    from cadenza.wire import AUDIT_STREAM, audit_subject, dumps, loads

    prefix = audit_subject(namespace, "")
    counts: dict[str, int] = {}
    while True:
        body = {"subjects_filter": f"{prefix}>", "offset": len(counts)}
        reply = loads((await nc.request(f"$JS.API.STREAM.INFO.{AUDIT_STREAM}", dumps(body), timeout=10)).data)
        if "error" in reply:
            raise RuntimeError(f"audit stream info: {reply['error'].get('description', reply['error'])}")
        page = (reply.get("state") or {}).get("subjects") or {}
        counts.update((subject[len(prefix) :], int(n)) for subject, n in page.items())
        if not page or len(counts) >= int(reply.get("total") or 0):
            return counts


async def audit_steps(js: Any, namespace: str, run: str, expected: int, idle: float = 2.0) -> dict[str, int]:
    """A run's audit records counted by step ("" for the run's own), each once by seq.
    Reading stops once `expected` messages (the stream's count) arrived, or after `idle`
    seconds of quiet."""
    from cadenza.wire import AUDIT_STREAM, audit_subject, loads

    seen: dict[int, str] = {}
    sub = await js.subscribe(audit_subject(namespace, run), stream=AUDIT_STREAM, ordered_consumer=True)
    try:
        for _ in range(expected):
            try:
                msg = await sub.next_msg(timeout=idle)
            except TimeoutError:
                break
            for rec in loads(msg.data):
                seen.setdefault(int(rec["seq"]), rec.get("step") or "")
    finally:
        await sub.unsubscribe()
    return dict(Counter(seen.values()))


async def diagnose(
    client: Any, namespace: str, workflow: str, since: float, *, now: float | None = None
) -> Report:
    """The report over the runs of `workflow` in `namespace` started within `since` seconds
    (`client`: an opened engine.client.RunClient). UnknownWorkflow when no definition of it
    was published and it has no run."""
    import time

    from nats.js.errors import KeyNotFoundError

    now = time.time() if now is None else now

    def bears_on_window(state: RunState) -> bool:
        # A run that finished before the window can be neither in it nor load it.
        ended = state.finishedAt
        return state.workflow == workflow and (ended is None or ended >= now - since)

    # One pass over the bucket (RunClient.recent), not one read per key.
    every = await client.recent(namespace, limit=MAX_RUNS, keep=bears_on_window)
    if not every:
        try:
            await client.defs_kv.get(f"latest.{namespace}.{workflow}")
        except KeyNotFoundError:
            raise UnknownWorkflow(f"workflow {workflow!r} is not known in namespace {namespace!r}") from None
    counts = await audit_counts(client.nc, namespace) if every else {}
    steps = {}
    for run in top_traced_runs(every, now, since):
        steps[run] = await audit_steps(client.js, namespace, run, counts.get(run, 0))
    report = analyse(
        every,
        counts,
        now,
        workflow=workflow,
        namespace=namespace,
        since=since,
        audit_steps=steps,
        load_records=every,
    )
    if len(every) >= MAX_RUNS:
        report.notes.append(f"only the newest {MAX_RUNS:,} runs were read: narrow --since")
    return report


# ------------------------------------------------------- over an engine's answer
async def diagnose_operation(client: Any, request: dict[str, Any]) -> dict[str, Any]:
    """The control operation `diagnose` that the processes hosting an engine add to it
    (`Engine.operations`): `cadenza diagnose` under a client credential, which may read no
    run records in bulk and no audit stream, asks an engine for the report. The namespace
    is the one the request came on, so a credential diagnoses its own namespace only."""
    import dataclasses

    workflow, since = request.get("workflow"), request.get("since")
    if not isinstance(workflow, str) or not workflow:
        return {"ok": False, "error": "diagnose: 'workflow' must be a workflow name"}
    if not isinstance(since, int | float) or isinstance(since, bool) or not 0 < since < math.inf:
        return {"ok": False, "error": f"diagnose: 'since' must be seconds above 0, not {since!r}"}
    try:
        report = await diagnose(client, request["namespace"], workflow, float(since))
    except UnknownWorkflow as exc:
        return {"ok": False, "error": str(exc), "unknownWorkflow": True}
    return {"ok": True, "report": dataclasses.asdict(report)}


def report_from_answer(data: Any) -> Report:
    """The `Report` an engine's `diagnose` answer carries (`dataclasses.asdict` of it),
    checked by pydantic against the dataclasses (a malformed answer raises ValueError)."""
    from pydantic import TypeAdapter

    return TypeAdapter(Report).validate_python(data)


ENGINE_OPERATIONS = {"diagnose": diagnose_operation}
"""What a process hosting an engine adds to it (`Engine.operations`)."""
