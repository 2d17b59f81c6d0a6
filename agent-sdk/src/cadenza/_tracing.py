"""Traces in an agent process (docs/tracing.md).

When the engine exports traces, each task it sends carries a W3C `traceparent` naming
the attempt's span. When this process exports traces too (the standard OTLP variables
are set: `enabled`), the handler runs inside a span "handler <step>" whose parent is that
attempt, made the current OpenTelemetry context: spans the handler makes itself
(`opentelemetry.trace.get_tracer(...).start_as_current_span`) nest under it, and each
`task.model()` call gets a span of its own there (`model_call`, gen_ai attributes).

Off (the variables unset, or OpenTelemetry not installed with the SDK alone), nothing is
imported and every hook here is a no-op that costs a global read.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from typing import Any

import structlog

log = structlog.get_logger("cadenza.agent")

_provider: Any = None
"""The TracerProvider this process exports with, once `setup` found traces on."""
_owned = False  # the provider is ours to flush and shut down (not one the program set)


def enabled(environ: Mapping[str, str] | None = None) -> bool:
    """Whether traces are exported: an OTLP endpoint is set (for all signals or for
    traces) and neither `OTEL_SDK_DISABLED` nor `OTEL_TRACES_EXPORTER=none` says no.
    (The engine asks this too, through its public face `cadenza.tracing`.)"""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if env.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        return False
    return bool(env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


def setup(service_name: str) -> bool:
    """Start exporting traces if the environment asks for them: a TracerProvider with a
    BatchSpanProcessor and the OTLP/HTTP exporter (which reads OTEL_EXPORTER_OTLP_*
    itself), set as the global one, unless the program has set its own, which is then
    used as it is. `service_name` (the Agent's) unless OTEL_SERVICE_NAME says otherwise."""
    global _provider, _owned
    if _provider is not None or not enabled():
        return _provider is not None
    try:
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        log.warning(
            "OTEL_EXPORTER_OTLP_* is set but OpenTelemetry is not installed: no traces "
            "(pip install opentelemetry-sdk opentelemetry-exporter-otlp-proto-http)"
        )
        return False
    current = trace.get_tracer_provider()
    if not isinstance(current, trace.ProxyTracerProvider):  # the program configured its own
        _provider = current
        return True
    named = os.environ.get("OTEL_SERVICE_NAME") or "service.name=" in os.environ.get(
        "OTEL_RESOURCE_ATTRIBUTES", ""
    )
    provider = TracerProvider(resource=Resource.create({} if named else {"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    _provider, _owned = provider, True
    return True


def shutdown() -> None:
    """Send the spans still queued and stop exporting (blocks up to the exporter's timeout)."""
    global _provider, _owned
    if _provider is not None and _owned:
        _provider.shutdown()
    _provider, _owned = None, False


@contextlib.contextmanager
def handler_span(agent: str, task: Any, traceparent: Any) -> Iterator[None]:
    """Run the handler of `task` inside its span, the current context, when traces are
    on and the engine sent the attempt's trace context; else do nothing."""
    if _provider is None or not isinstance(traceparent, str):
        yield
        return
    from opentelemetry.trace import SpanKind
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    parent = TraceContextTextMapPropagator().extract({"traceparent": traceparent})
    attributes = {
        "cadenza.run": task.run_id,
        "cadenza.workflow": task.workflow,
        "cadenza.namespace": task.namespace,
        "cadenza.step": task.step,
        "cadenza.attempt": task.attempt,
        "cadenza.agent": agent,
    }
    if task.item is not None:
        attributes["cadenza.item"] = task.item
    tracer = _provider.get_tracer("cadenza.agent")
    with tracer.start_as_current_span(
        f"handler {task.step}", context=parent, kind=SpanKind.CONSUMER, attributes=attributes
    ) as span:
        try:
            yield
        except BaseException as exc:
            span.set_attribute("outcome", "Failed")
            span.set_attribute("error.type", type(exc).__name__)
            raise
        span.set_attribute("outcome", "Succeeded")


class ModelCall:
    """The span of one model call, or nothing when traces are off."""

    __slots__ = ("_span",)

    def __init__(self, span: Any = None) -> None:
        self._span = span

    def usage(self, input_tokens: int, output_tokens: int, cost: float) -> None:
        if self._span is not None:
            self._span.set_attribute("gen_ai.usage.input_tokens", input_tokens)
            self._span.set_attribute("gen_ai.usage.output_tokens", output_tokens)
            self._span.set_attribute("cadenza.usage.cost", cost)


_NO_CALL = ModelCall()


@contextlib.contextmanager
def model_call(model: str, remote_model: str, operation: str = "chat") -> Iterator[ModelCall]:
    """A span for one `task.model()` call under the current span (the handler's), with the
    OpenTelemetry gen_ai attributes. Not made current: a call makes no spans of its own,
    and a streamed call's span outlives the generator's steps."""
    if _provider is None:
        yield _NO_CALL
        return
    from opentelemetry.trace import SpanKind, Status, StatusCode

    span = _provider.get_tracer("cadenza.models").start_span(
        f"{operation} {remote_model}",
        kind=SpanKind.CLIENT,
        attributes={
            "gen_ai.operation.name": operation,
            "gen_ai.system": "openai",  # the API every Model speaks (cadenza.models)
            "gen_ai.request.model": remote_model,
            "cadenza.model": model,
        },
    )
    try:
        yield ModelCall(span)
    except BaseException as exc:
        span.set_attribute("outcome", "Failed")
        span.set_attribute("error.type", type(exc).__name__)
        span.set_status(Status(StatusCode.ERROR, str(exc)[:500]))
        raise
    else:
        span.set_attribute("outcome", "Succeeded")
    finally:
        span.end()
