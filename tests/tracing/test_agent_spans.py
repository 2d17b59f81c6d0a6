"""The agent side of traces (cadenza._tracing), on a provider of the test's own (an
in-memory exporter; the process-wide OpenTelemetry provider is left alone): the handler's
span under the task's traceparent and current while it runs, a failed model call in
ERROR under it, a sync handler's thread in the same context, nothing without a traceparent."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from cadenza import Task, _tracing
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

TRACE = "0af7651916cd43dd8448eb211c80319c"
ATTEMPT = "b7ad6b7169203331"


@pytest.fixture
def exported() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    _tracing._provider = provider
    try:
        yield exporter
    finally:
        _tracing._provider = None


def task(step: str = "a") -> Task:
    return Task(input=None, run_id="r1", step=step, attempt=2, workflow="wf", namespace="ns", agent="worker")


async def test_the_handler_span_is_under_the_attempt_and_current_while_the_handler_runs(
    exported: InMemorySpanExporter,
) -> None:
    with _tracing.handler_span("worker", task(), f"00-{TRACE}-{ATTEMPT}-01"):
        with trace.get_tracer("mine", tracer_provider=_tracing._provider).start_as_current_span("own"):
            pass
        with pytest.raises(RuntimeError), _tracing.model_call("fast", "tiny") as call:
            call.usage(3, 4, 0.5)
            raise RuntimeError("model down")

        def in_a_thread() -> str:  # a sync handler runs in a thread: the context goes with it
            return format(trace.get_current_span().get_span_context().span_id, "016x")

        current = await asyncio.to_thread(in_a_thread)
    spans = {s.name: s for s in exported.get_finished_spans()}
    handler = spans["handler a"]
    assert format(handler.context.trace_id, "032x") == TRACE
    assert handler.parent is not None and format(handler.parent.span_id, "016x") == ATTEMPT
    assert current == format(handler.context.span_id, "016x")
    assert handler.attributes is not None and handler.attributes["cadenza.attempt"] == 2
    assert handler.attributes["outcome"] == "Succeeded"
    for child in ("own", "chat tiny"):
        assert spans[child].parent is not None and spans[child].parent.span_id == handler.context.span_id
    model = spans["chat tiny"]
    assert model.status.status_code == trace.StatusCode.ERROR and model.attributes is not None
    assert model.attributes["gen_ai.request.model"] == "tiny" and model.attributes["outcome"] == "Failed"
    assert model.attributes["gen_ai.usage.input_tokens"] == 3


async def test_a_failing_handler_span_is_in_error(exported: InMemorySpanExporter) -> None:
    with pytest.raises(ValueError), _tracing.handler_span("worker", task("b"), f"00-{TRACE}-{ATTEMPT}-01"):
        raise ValueError("bad input")
    (span,) = exported.get_finished_spans()
    assert span.status.status_code == trace.StatusCode.ERROR
    assert span.attributes is not None and span.attributes["error.type"] == "ValueError"


async def test_without_a_traceparent_or_a_provider_there_is_no_span(exported: InMemorySpanExporter) -> None:
    with _tracing.handler_span("worker", task(), None):
        pass
    _tracing._provider = None
    with (
        _tracing.handler_span("worker", task(), f"00-{TRACE}-{ATTEMPT}-01"),
        _tracing.model_call("f", "t") as call,
    ):
        call.usage(1, 1, 0.0)
    assert exported.get_finished_spans() == ()
