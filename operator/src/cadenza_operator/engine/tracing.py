"""OpenTelemetry traces of runs (docs/tracing.md): a span per run, step and attempt, and
the attempt's "waiting" and "executing" as its children.

No span is held open in memory: the engine may die at any point and another one carry
the run on. Each span is made once the decision that finishes what it covers is
committed, from the times the run record keeps, with ids derived from the run, step,
item and attempt (`span_id`), and the trace id from the root run (`trace_id`): a child
workflow's run shares its root's trace, and a span made again (an outbox carried out
again by another engine) has the same ids as the first.

Which spans a decision finishes is read from its audit records, which travel in the
record's outbox (engine/runtime.py carries them out after the commit, and again when
another engine loads an outbox not carried out): `finished_spans` is pure. The record
keeps no attempts of forEach items (it stays bounded for 10,000 of them): the times of an
item attempt the decision ended travel beside its audit records instead
(`Decision.item_attempts`, kept only when traces are on).

Off unless the standard OTLP variables are set (`enabled`: the agents' rule, from
cadenza.tracing): opentelemetry is then not even imported, and tasks carry no
`traceparent`.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog
from cadenza.protocol import RunPhase, StepPhase
from cadenza.tracing import enabled

from .state import Attempt, RunState, StepState, Usage

log = structlog.get_logger("cadenza.engine")

SERVICE_NAME = "cadenza-engine"
RECENT_SPANS = 10_000
"""Span ids this engine made lately: an outbox it carries out again after reloading the
record itself (a stale cache) sends its spans once."""
ERROR_OUTCOMES = frozenset({"Failed", "TimedOut"})
_TERMINAL_RUN = frozenset(p.value for p in RunPhase if p.is_terminal)
_TERMINAL_STEP = frozenset(p.value for p in StepPhase if p.is_terminal)


# ------------------------------------------------------------------------- ids
def _digest(*parts: object) -> bytes:
    return hashlib.sha256("\x00".join(str(p) for p in parts).encode()).digest()


def trace_id(scope: str) -> int:
    """The trace of a root run (`scope`: the root run's id) and of all its child runs."""
    return int.from_bytes(_digest("cadenza-trace", scope)[:16], "big") or 1


def span_id(run: str, kind: str, step: str = "", item: int | None = None, attempt: int = 0) -> int:
    """The span of a run (kind "run"), a step, an attempt, or an attempt's waiting or
    executing: the same whichever engine makes it, however often."""
    return int.from_bytes(_digest(run, kind, step, item, attempt)[:8], "big") or 1


def attempt_parent(run: str, step: str, item: int | None, attempt: int) -> int:
    """The span a step's attempt, or a forEach item's, nests its work under (the agent's
    handler, a child run): that attempt's span."""
    return span_id(run, "attempt", step, item, attempt)


def traceparent(state: RunState, step: str, item: int | None, attempt: int) -> str:
    """The W3C trace context a dispatched task carries (cadenza._tracing reads it)."""
    tid = trace_id(state.scope or state.run)
    return f"00-{tid:032x}-{attempt_parent(state.run, step, item, attempt):016x}-01"


# ----------------------------------------------------------------------- spans
@dataclass
class SpanData:
    """A finished span, before it becomes OpenTelemetry's (`Tracer.emit`)."""

    name: str
    trace_id: int
    span_id: int
    parent_id: int | None
    start: float
    end: float
    attributes: dict[str, Any] = field(default_factory=dict)
    error: str | None = None  # the status description of a span with status ERROR
    events: list[tuple[str, float]] = field(default_factory=list)


def _usage(usage: Usage | None) -> dict[str, Any]:
    if usage is None:
        return {}
    return {
        "cadenza.usage.input_tokens": usage.inputTokens,
        "cadenza.usage.output_tokens": usage.outputTokens,
        "cadenza.usage.cost": usage.cost,
        "cadenza.usage.calls": usage.calls,
    }


def _error(error: dict[str, Any] | None) -> dict[str, Any]:
    if not error:
        return {}
    return {"error.type": str(error.get("type") or ""), "error.message": str(error.get("message") or "")}


def _run_span(state: RunState, tid: int) -> SpanData:
    parent = state.parent or {}
    parent_id = None
    if parent.get("run") and parent.get("step") and parent.get("attempt"):
        item = parent.get("item")
        parent_id = attempt_parent(parent["run"], parent["step"], item, int(parent["attempt"]))
    end = state.finishedAt or state.startedAt or state.createdAt
    outcome = str(state.phase)
    return SpanData(
        name=f"run {state.workflow}",
        trace_id=tid,
        span_id=span_id(state.run, "run"),
        parent_id=parent_id,
        start=min(state.createdAt, end),
        end=end,
        attributes={
            "cadenza.run": state.run,
            "cadenza.workflow": state.workflow,
            "cadenza.namespace": state.namespace,
            "outcome": outcome,
            **({"cadenza.message": state.message} if state.message else {}),
            **_usage(state.usage),
        },
        error=(state.message or outcome) if outcome == RunPhase.FAILED.value else None,
    )


def _step_span(state: RunState, name: str, st: StepState, tid: int, at: float) -> SpanData:
    end = st.finishedAt or at
    # A forEach keeps no attempts: its items are ready when it starts.
    first = st.attempts[0].readyAt if st.attempts else (st.startedAt if st.forEach is not None else None)
    starts = [t for t in (first, st.firstQueuedAt) if t]
    start = min([*starts, end])
    attributes: dict[str, Any] = {
        **_base(state, name),
        "outcome": str(st.phase),
        "cadenza.retries": st.retries,
        **_usage(st.usage),
        **_error(st.error if st.phase == StepPhase.FAILED else None),
    }
    if st.forEach is not None:
        attributes["cadenza.foreach.total"] = st.forEach.total
        for outcome, count in st.forEach.counts.items():
            attributes[f"cadenza.foreach.{outcome.lower()}"] = count
    if st.child:
        attributes["cadenza.child_run"] = st.child
    failed = st.phase == StepPhase.FAILED
    return SpanData(
        name=f"step {name}",
        trace_id=tid,
        span_id=span_id(state.run, "step", name),
        parent_id=span_id(state.run, "run"),
        start=start,
        end=end,
        attributes=attributes,
        error=(st.message or "failed") if failed else None,
    )


def _attempt_spans(
    state: RunState, name: str, a: Attempt, tid: int, at: float, item: int | None = None
) -> list[SpanData]:
    """The attempt (of the step, or of its forEach item `item`), and its waiting (ready ->
    started) and executing (started -> finished) in it. Times come from two clocks (the
    engine's and the agent's): each is clamped into the attempt so that the children stay
    inside their parent."""
    ready = a.readyAt if a.readyAt is not None else a.queuedAt
    end = max(ready, a.finishedAt if a.finishedAt is not None else at)
    started = min(max(a.startedAt, ready), end) if a.startedAt is not None else None
    own = span_id(state.run, "attempt", name, item, a.n)
    base = {**_base(state, name), "cadenza.attempt": a.n}
    if item is not None:
        base["cadenza.item"] = item
    outcome = a.outcome or ("Cancelled" if a.finishedAt is None else "Unknown")
    attributes = {
        **base,
        "outcome": outcome,
        **({"cadenza.agent": a.agent} if a.agent else {}),
        **({"cadenza.worker": a.worker} if a.worker else {}),
        **_usage(a.usage),
        **_error(a.error),
    }
    error = None
    if outcome in ERROR_OUTCOMES:
        error = str((a.error or {}).get("message") or outcome)
    spans = [
        SpanData(
            f"attempt {name} #{a.n}" if item is None else f"attempt {name}#{item} #{a.n}",
            tid,
            own,
            span_id(state.run, "step", name),
            ready,
            end,
            attributes,
            error,
        )
    ]
    queued = min(max(a.queuedAt, ready), end)
    waiting_end = started if started is not None else end
    spans.append(
        SpanData(
            "waiting",
            tid,
            span_id(state.run, "waiting", name, item, a.n),
            own,
            ready,
            waiting_end,
            base,
            events=[("queued", min(queued, waiting_end))],
        )
    )
    if started is not None:
        spans.append(
            SpanData(
                "executing", tid, span_id(state.run, "executing", name, item, a.n), own, started, end, base
            )
        )
    return spans


def _base(state: RunState, step: str) -> dict[str, Any]:
    return {
        "cadenza.run": state.run,
        "cadenza.workflow": state.workflow,
        "cadenza.namespace": state.namespace,
        "cadenza.step": step,
    }


def finished_spans(
    state: RunState, records: Iterable[dict[str, Any]], item_attempts: Iterable[dict[str, Any]] = ()
) -> list[SpanData]:
    """The spans that the decision whose audit `records` and `item_attempts` (the forEach
    item attempts it ended, `Decision.item_attempts`) are given finished, from the record
    `state` it wrote: each item attempt, an attempt a record names (a retry, a timeout, a
    cancel, a budget stop), a step that reached a final phase (with its last attempt,
    unless a retry record already ended that one), the run when it ended. Pure."""
    tid = trace_id(state.scope or state.run)
    spans: list[SpanData] = []
    attempts: set[tuple[str, int]] = set()
    items: set[tuple[str, int, int]] = set()
    for ended in item_attempts:
        step, item = ended.get("step"), ended.get("item")
        if not isinstance(step, str) or not isinstance(item, int) or step not in state.steps:
            continue
        a = Attempt.model_validate(ended)
        if (step, item, a.n) not in items:
            items.add((step, item, a.n))
            spans.extend(_attempt_spans(state, step, a, tid, a.finishedAt or 0.0, item))

    def attempt(name: str, n: int, at: float) -> None:
        st = state.steps.get(name)
        if st is None or (name, n) in attempts:
            return
        found = next((a for a in st.attempts if a.n == n), None)
        if found is not None:
            attempts.add((name, n))
            spans.extend(_attempt_spans(state, name, found, tid, at))

    for rec in records:
        if rec.get("forged"):
            continue
        step, old, new, at = rec.get("step"), rec.get("from"), rec.get("to"), float(rec.get("at") or 0.0)
        if step is None:
            if new in _TERMINAL_RUN and old != new:
                spans.append(_run_span(state, tid))
            continue
        st = state.steps.get(step)
        if st is None:
            continue
        if rec.get("attempt") is not None and rec.get("item") is None and st.forEach is None:
            attempt(step, int(rec["attempt"]), at)
        if new in _TERMINAL_STEP and old != new:
            if st.forEach is None and st.attempts and st.retryAt is None:
                attempt(step, st.attempts[-1].n, st.finishedAt or at)
            spans.append(_step_span(state, step, st, tid, at))
    return spans


# -------------------------------------------------------------------- exporting
class Tracer:
    """Hands finished spans to a BatchSpanProcessor with the OTLP/HTTP exporter (which
    reads OTEL_EXPORTER_OTLP_* itself: endpoint, headers, timeout)."""

    def __init__(self, processor: Any, resource: Any) -> None:
        self._processor = processor
        self._resource = resource
        self._recent: OrderedDict[int, None] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Tracer | None:
        """A tracer when the environment asks for traces (`enabled`), else None, and then
        opentelemetry is not imported."""
        env = os.environ if environ is None else environ
        if not enabled(env):
            return None
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        # Resource.create reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES; the name
        # given here is the default when neither names the service.
        named = env.get("OTEL_SERVICE_NAME") or "service.name=" in env.get("OTEL_RESOURCE_ATTRIBUTES", "")
        resource = Resource.create({} if named else {"service.name": SERVICE_NAME})
        log.info("exporting traces by OTLP", service=resource.attributes.get("service.name"))
        return cls(BatchSpanProcessor(OTLPSpanExporter()), resource)

    def emit(
        self,
        state: RunState,
        records: Iterable[dict[str, Any]],
        item_attempts: Iterable[dict[str, Any]] = (),
    ) -> None:
        """Make the spans a committed decision finished (`finished_spans`); never raises
        (traces are not worth a run)."""
        try:
            for data in finished_spans(state, records, item_attempts):
                with self._lock:
                    if data.span_id in self._recent:
                        continue
                    self._recent[data.span_id] = None
                    while len(self._recent) > RECENT_SPANS:
                        self._recent.popitem(last=False)
                self._processor.on_end(self._readable(data))
        except Exception:
            log.warning("spans not made", run=state.run, exc_info=True)

    def _readable(self, data: SpanData) -> Any:
        from opentelemetry.sdk.trace import Event, ReadableSpan
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope
        from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

        flags = TraceFlags(TraceFlags.SAMPLED)
        context = SpanContext(data.trace_id, data.span_id, is_remote=False, trace_flags=flags)
        parent = None
        if data.parent_id is not None:
            parent = SpanContext(data.trace_id, data.parent_id, is_remote=False, trace_flags=flags)
        status = Status(StatusCode.ERROR, data.error) if data.error is not None else Status(StatusCode.UNSET)
        return ReadableSpan(
            name=data.name,
            context=context,
            parent=parent,
            resource=self._resource,
            attributes=data.attributes,
            events=[Event(name, attributes={}, timestamp=_ns(at)) for name, at in data.events],
            kind=SpanKind.INTERNAL,
            status=status,
            start_time=_ns(data.start),
            end_time=_ns(max(data.end, data.start)),
            instrumentation_scope=InstrumentationScope("cadenza.engine"),
        )

    def flush(self) -> None:
        """Send what is queued (blocks up to the exporter's timeout). Not a shutdown: an
        engine stopped may be started again (engine/host.py)."""
        self._processor.force_flush()


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)
