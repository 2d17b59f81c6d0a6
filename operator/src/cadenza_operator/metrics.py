"""Prometheus metrics: one module, one prefix (`cadenza_`), bounded label sets.

Labels are workflow, step, agent and phase names: bounded by the definitions applied,
never by run ids or item indexes.

Every metric about a workload (a run, a step, an agent, a Model's use) carries the
workload's namespace as `workload_namespace`, never `namespace`: behind a ServiceMonitor
or PodMonitor the scrape target's own `namespace` label (the operator's) would win and
Prometheus would rename ours `exported_namespace`. A label name no scrape config sets
survives any of them without `honorLabels` (docs/monitoring.md).
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import cache
from typing import Any

from cadenza.protocol import MODEL_OUTCOMES
from prometheus_client import Counter, Gauge, Histogram, start_http_server

NS = "workload_namespace"
"""The label naming the namespace of the workload a series is about."""

_TIME_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    300,
    900,
    3600,
)

RUNS_STARTED = Counter("cadenza_runs_started_total", "Runs started.", [NS, "workflow"])
RUNS_FINISHED = Counter("cadenza_runs_finished_total", "Runs finished, by phase.", [NS, "workflow", "phase"])
RUN_DURATION = Histogram(
    "cadenza_run_duration_seconds", "Run wall-clock duration.", [NS, "workflow"], buckets=_TIME_BUCKETS
)
# Both gauges move by +1/-1 where a run changes, in whichever engine process decides the
# change: one engine may count a run's start and another its end, so only their sum over
# every engine (`sum by (workload_namespace, workflow)`) is the number of runs.
ACTIVE_RUNS = Gauge(
    "cadenza_active_runs", "Runs started and not finished (sum over engines).", [NS, "workflow"]
)
RUNS_WAITING = Gauge(
    "cadenza_runs_waiting",
    "Active runs with nothing to do until someone acts: every step still going waits for an "
    "approval or a signal, or the run is Paused by its budget (sum over engines).",
    [NS, "workflow"],
)
# An attempt's life is ready -> queued -> started -> finished; one histogram per stage,
# observed when the attempt finishes, so "agents wait more than they execute" is
#   sum(rate(cadenza_step_waiting_seconds_sum[5m])) > sum(rate(cadenza_step_execution_seconds_sum[5m]))
STEP_SCHEDULING = Histogram(
    "cadenza_step_scheduling_seconds",
    "Time an attempt was ready but not yet queued for an agent: behind maxParallel, "
    "maxActiveRuns, or a busy engine.",
    [NS, "workflow", "step"],
    buckets=_TIME_BUCKETS,
)
STEP_QUEUE = Histogram(
    "cadenza_step_queue_seconds",
    "Time an attempt waited in its agent's queue before an agent started it.",
    [NS, "workflow", "step"],
    buckets=_TIME_BUCKETS,
)
STEP_WAITING = Histogram(
    "cadenza_step_waiting_seconds",
    "Time from an attempt being ready to an agent starting it (scheduling + queue).",
    [NS, "workflow", "step"],
    buckets=_TIME_BUCKETS,
)
STEP_EXECUTION = Histogram(
    "cadenza_step_execution_seconds",
    "Time an agent spent executing an attempt.",
    [NS, "workflow", "step"],
    buckets=_TIME_BUCKETS,
)
STEP_RETRIES = Counter(
    "cadenza_step_retries_total", "Attempts retried after a retryable failure.", [NS, "workflow", "step"]
)
STEP_TIMEOUTS = Counter(
    "cadenza_step_timeouts_total",
    "Attempts that timed out or lost their heartbeat.",
    [NS, "workflow", "step"],
)
PENDING_APPROVALS = Gauge(
    "cadenza_pending_approvals", "Steps waiting for a human decision (sum over engines).", [NS, "workflow"]
)
ENGINE_EVENT_LAG = Histogram(
    "cadenza_engine_event_lag_seconds",
    "Time from an event's arrival in JetStream to the engine handling it.",
    buckets=_TIME_BUCKETS,
)
AGENT_PENDING = Gauge("cadenza_agent_pending_tasks", "Tasks waiting in an agent's queue.", [NS, "agent"])
AGENT_IN_FLIGHT = Gauge(
    "cadenza_agent_in_flight_tasks",
    "Tasks delivered to an agent and not yet acknowledged.",
    [NS, "agent"],
)
DEAD_LETTERS = Counter(
    "cadenza_dead_letters_total",
    "Messages given up on and copied to the dead-letter stream, by source stream and reason "
    "(malformed, deliveries, definition, unknown-run). Tasks are counted when their agent reports them.",
    ["source", "reason"],
)
FORGED_EVENTS = Counter(
    "cadenza_forged_events_total",
    "Attempt events rejected because the subject they came on does not name the agent of "
    "the attempt's step (another agent's, or a run's own subject where provenance is "
    "required), by namespace and event type. Each is also in the run's audit trail.",
    [NS, "kind"],
)
MODEL_TOKENS = Counter(
    "cadenza_model_tokens_total",
    "Model tokens agents recorded against runs, by direction (input, output). The model label "
    "is the name an agent gave (a Model's name): bounded by the Models in use.",
    [NS, "workflow", "model", "direction"],
)
MODEL_COST = Counter(
    "cadenza_model_cost_total",
    "Model cost agents recorded against runs, in the Models' pricing units.",
    [NS, "workflow", "model"],
)
MODEL_REQUESTS = Counter(
    "cadenza_model_requests_total",
    "HTTP requests agents made to Models through task.model(), retries included, by outcome "
    "(ok, ratelimited, error, unreachable, other).",
    [NS, "model", "outcome"],
)
MODEL_RATELIMIT_WAIT = Histogram(
    "cadenza_model_ratelimit_wait_seconds",
    "Time a model call waited for rate limits (the Model's shared limits and 429 Retry-After), per call.",
    [NS, "model"],
    buckets=_TIME_BUCKETS,
)
MODEL_LATENCY = Histogram(
    "cadenza_model_latency_seconds",
    "Time of a model call's last HTTP exchange (the answer that decided its outcome), per call.",
    [NS, "model"],
    buckets=_TIME_BUCKETS,
)
KUBE_WRITES = Counter(
    "cadenza_kube_status_writes_total", "WorkflowRun status writes sent to the Kubernetes API."
)


def observe_model_calls(
    namespace: str, calls: Iterable[tuple[str, dict[str, int], float | None, float | None]]
) -> None:
    """The model calls a decision counted (`Decision.calls`, once per usage id) in a run of
    `namespace`: requests by outcome, rate-limit wait and latency. An outcome outside
    MODEL_OUTCOMES (a newer agent's) is counted as `other`, so the label set stays fixed."""
    for model, requests, waited, latency in calls:
        name = model[:63]
        for outcome, n in requests.items():
            if n > 0:
                label = outcome if outcome in MODEL_OUTCOMES else "other"
                child(MODEL_REQUESTS, namespace, name, label).inc(n)
        if waited is not None:
            child(MODEL_RATELIMIT_WAIT, namespace, name).observe(waited)
        if latency is not None:
            child(MODEL_LATENCY, namespace, name).observe(latency)


def serve(port: int, addr: str = "127.0.0.1") -> int:
    """Expose /metrics on `addr:port` (a daemon thread); return the port bound (port 0
    asks for any free one). OSError when it cannot listen there."""
    server, _ = start_http_server(port, addr=addr)
    return int(server.server_port)


@cache
def child(metric: Any, *labels: str) -> Any:
    """``metric.labels(*labels)``, looked up once: labels() validates and locks on every
    call, and the engine observes several metrics per event. The label sets are bounded
    (see above), so is this cache."""
    return metric.labels(*labels)
