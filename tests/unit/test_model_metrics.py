"""Model metrics from usage events: what `task.model()` measured of a call (requests by
outcome, rate-limit wait, latency) becomes cadenza_model_requests_total,
cadenza_model_ratelimit_wait_seconds and cadenza_model_latency_seconds, once per usage
id (a redelivered event is not counted again), with the outcome label held to a fixed set.
Events go through `decide` as the engine feeds it and the metrics are observed as the
engine observes them (`metrics.observe_model_calls(namespace, decision.calls)`)."""

from __future__ import annotations

from typing import Any

from cadenza.protocol import MODEL_OUTCOMES
from cadenza_operator import metrics
from prometheus_client import REGISTRY

from .helpers import Driver, agent_step, compile_spec


def _value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, {"workload_namespace": "default", **labels}) or 0.0


def _send_usage(d: Driver, model: str, call: str, **measured: Any) -> None:
    t = d.task("a")
    body = {"type": "usage", "step": "a", "item": None, "attempt": t.attempt, "id": call, "model": model}
    decision = d.send({**body, "inputTokens": 3, "outputTokens": 2, **measured})
    metrics.observe_model_calls("default", decision.calls)  # what Engine._observe does


def test_usage_events_are_observed_once_per_call() -> None:
    model = "metrics-once"
    d = Driver(compile_spec({"steps": [agent_step("a")]}))
    d.start()
    measured = {"requests": {"ratelimited": 1, "ok": 1}, "waited": 1.5, "latency": 0.2}
    _send_usage(d, model, "call-1", **measured)
    _send_usage(d, model, "call-1", **measured)  # a redelivery: decide ignores it

    assert _value("cadenza_model_requests_total", model=model, outcome="ok") == 1
    assert _value("cadenza_model_requests_total", model=model, outcome="ratelimited") == 1
    assert _value("cadenza_model_ratelimit_wait_seconds_count", model=model) == 1
    assert _value("cadenza_model_ratelimit_wait_seconds_sum", model=model) == 1.5
    assert _value("cadenza_model_latency_seconds_count", model=model) == 1
    assert _value("cadenza_model_latency_seconds_sum", model=model) == 0.2
    assert d.state.usage is not None and d.state.usage.calls == 1


def test_a_failed_call_counts_its_requests_and_no_tokens() -> None:
    model = "metrics-failed"
    d = Driver(compile_spec({"steps": [agent_step("a")]}))
    d.start()
    t = d.task("a")
    body = {"type": "usage", "step": "a", "item": None, "attempt": t.attempt, "id": "f1", "model": model}
    decision = d.send({**body, "requests": {"error": 6}, "waited": 0.0, "latency": 0.01})
    metrics.observe_model_calls("default", decision.calls)
    assert _value("cadenza_model_requests_total", model=model, outcome="error") == 6
    assert d.state.usage is not None and d.state.usage.tokens == 0 and d.state.usage.calls == 1


def test_outcomes_stay_a_fixed_set_and_plain_record_usage_observes_nothing() -> None:
    model = "metrics-bounded"
    d = Driver(compile_spec({"steps": [agent_step("a")]}))
    d.start()
    _send_usage(d, model, "c1", requests={"teapot": 2, "ok": 1, "error": -3})
    assert _value("cadenza_model_requests_total", model=model, outcome="other") == 2
    assert _value("cadenza_model_requests_total", model=model, outcome="ok") == 1
    assert _value("cadenza_model_requests_total", model=model, outcome="error") == 0
    assert _value("cadenza_model_ratelimit_wait_seconds_count", model=model) == 0
    # task.record_usage (and an agent on an older SDK) sends no measurements: tokens only.
    _send_usage(d, model, "c2")
    assert _value("cadenza_model_latency_seconds_count", model=model) == 0
    labels = {
        s.labels["outcome"]
        for metric in REGISTRY.collect()
        if metric.name == "cadenza_model_requests"
        for s in metric.samples
    }
    assert labels <= set(MODEL_OUTCOMES)
