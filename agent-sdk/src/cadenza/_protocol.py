"""The wire contract between agents and the engine: stream, subject and bucket names,
message shapes and the payload offloading rule.

Both sides import this module; it has no dependency on the operator. Messages are JSON,
written and read by pydantic-core (already a dependency): several times faster than the
json module on every event the engine handles and every task an agent runs.
"""

from __future__ import annotations

from typing import Any

import pydantic_core

# Streams (JetStream, file storage)
TASKS_STREAM = "CADENZA_TASKS"  # work-queue: one durable pull consumer per Agent
EVENTS_STREAM = "CADENZA_EVENTS"  # work-queue: results, timers, approvals, signals -> engine
AUDIT_STREAM = "CADENZA_AUDIT"  # limits: every decision's audit records, published by the engine
DEAD_LETTER_STREAM = "CADENZA_DEADLETTERS"  # tasks and events given up on, with the reason

TASK_SUBJECTS = "cadenza.task.>"
EVENT_SUBJECTS = "cadenza.event.>"
DEAD_LETTER_SUBJECTS = "cadenza.dead.>"
AUDIT_SUBJECTS = "cadenza.audit.>"
LOGS_STREAM = "CADENZA_LOGS"  # limits (age and size): what handlers log through task.log, per attempt
LOG_SUBJECTS = "cadenza.log.>"

TERMINAL_RUN_PHASES = frozenset({"Succeeded", "Failed", "Cancelled"})

# Key-value buckets and the object store
RUNS_BUCKET = "cadenza_runs"  # execution state, one key per run, written with CAS
OUTPUTS_BUCKET = "cadenza_outputs"  # forEach item outputs and large step outputs, apart from the run record
CONTEXT_BUCKET = "cadenza_context"  # shared context agents read and write, apart from execution state
DEFINITIONS_BUCKET = "cadenza_definitions"  # compiled workflow and agent definitions
PAYLOADS_STORE = "cadenza_payloads"  # inputs/outputs larger than OFFLOAD_BYTES
CLAIMS_BUCKET = "cadenza_claims"  # <ns>.<agent>.<task id> -> who may start it: an agent, or "abandoned"
RUN_STATUS_BUCKET = "cadenza_run_status"  # <ns>.<run> -> what agents may know of a run (phase, budget)
CLAIM_MAX_AGE = 86400.0
"""Seconds a claim is kept (cadenza._claims). A claim decides between an agent's start and
the engine giving the attempt up, which race only around the dispatch and the decision
that gives it up; a day bounds the bucket by a day of attempts (about 150 bytes each). A
task taken from the queue after its claim has expired is old, so it is still checked
against the run record, committed long before (see cadenza._agent)."""

OFFLOAD_BYTES = 512 * 1024
"""A value whose JSON is larger travels through the object store (PAYLOADS_STORE) as a
reference: a NATS message, and so a KV entry, can never exceed the server's max_payload."""
MAX_VALUE_BYTES = 128 * 1024 * 1024
"""The largest value (a run input, a step's input or output, the run output), as JSON, that
Cadenza carries; CADENZA_MAX_VALUE_BYTES sets another. Twice the 64 MiB promised to flow
everywhere; an engine or agent holds such a value in memory a few times over (about
400 MB of engine memory for a 64 MiB value read by two steps and the run output)."""
REF_KEY = "$cadenzaRef"


def payloads_store(namespace: str) -> str:
    """The object store of a namespace's values larger than OFFLOAD_BYTES: one per namespace,
    because an object's subjects ($O.<bucket>.M.<name>, $O.<bucket>.C.<nuid>) cannot be
    scoped by name, so a credential can only be given whole buckets. (PAYLOADS_STORE
    itself holds what was stored before, and is read only as a fallback.)"""
    return f"{PAYLOADS_STORE}_{namespace}"


def task_subject(namespace: str, agent: str) -> str:
    return f"cadenza.task.{namespace}.{agent}"


def event_subject(namespace: str, run: str) -> str:
    return f"cadenza.event.{namespace}.{run}"


def agent_event_subject(namespace: str, run: str, agent: str) -> str:
    """Where the agent `agent` publishes the events of its attempts of `run` (started,
    heartbeat, result, failed, context, usage). The engine takes the agent from the
    subject, which a credential can restrict (`cadenza.event.<ns>.*.agent.<agent>`), not
    from the body, which anyone can write: it accepts an attempt's event only from the
    agent its step names (engine/runtime.py, `provenance`)."""
    return f"cadenza.event.{namespace}.{run}.agent.{agent}"


def event_source(subject: str) -> tuple[str, str, str | None] | None:
    """(namespace, run, agent) of an event subject; agent is None on a run's own subject
    (the engine's, a client's, an agent from before per-agent subjects). None: neither."""
    parts = subject.split(".")
    if len(parts) == 4 and parts[:2] == ["cadenza", "event"]:
        return parts[2], parts[3], None
    if len(parts) == 6 and parts[:2] == ["cadenza", "event"] and parts[4] == "agent":
        return parts[2], parts[3], parts[5]
    return None


def cancel_subject(namespace: str, run: str) -> str:
    """Core NATS (not stored): tells running tasks of a run that it was cancelled."""
    return f"cadenza.cancel.{namespace}.{run}"


def audit_subject(namespace: str, run: str) -> str:
    """Where the engine publishes a run's audit records (AUDIT_STREAM)."""
    return f"cadenza.audit.{namespace}.{run}"


def log_subject(namespace: str, agent: str, run: str, step: str, item: int | None, attempt: int) -> str:
    """Where an attempt's `task.log` lines go (LOGS_STREAM). The agent comes before the run,
    at a fixed token, so a credential can pin it (`cadenza.log.<ns>.<agent>.>`) whatever
    the run id holds; the run is one token (`log_token`) so a reader can filter on it."""
    return (
        f"cadenza.log.{namespace}.{agent}.{log_token(run)}.{step}.{'-' if item is None else item}.{attempt}"
    )


def log_token(run: str) -> str:
    """A run id as one subject token: a run id may hold dots (engine/state.py RUN_ID),
    never `~`, so the mapping is one to one."""
    return run.replace(".", "~")


def consumer_name(namespace: str, agent: str) -> str:
    """Durable consumer of one Agent; Kubernetes names hold no '_' so this is unambiguous."""
    return f"agent_{namespace}_{agent}"


def run_status_key(namespace: str, run: str) -> str:
    """A run's key in RUN_STATUS_BUCKET, under its namespace (an agent reads its own's)."""
    return f"{namespace}.{run}"


def claim_key(namespace: str, agent: str, task: str) -> str:
    """An attempt's key in CLAIMS_BUCKET (cadenza._claims), under its namespace and Agent,
    so an agent's credential can be limited to `$KV.cadenza_claims.<ns>.<agent>.>`."""
    return f"{namespace}.{agent}.{task}"


def task_id(run: str, step: str, item: int | None, attempt: int) -> str:
    """Deterministic id of one attempt: JetStream de-duplicates re-dispatches by it."""
    suffix = "" if item is None else f".{item}"
    return f"{run}.{step}{suffix}.{attempt}"


def dumps(value: Any) -> bytes:
    """Compact JSON; what JSON cannot hold (a datetime, a set, an object) becomes a string or list."""
    return pydantic_core.to_json(value, fallback=str)


def loads(data: bytes | str) -> Any:
    return pydantic_core.from_json(data)


def is_ref(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and REF_KEY in value


def too_large(size: int, limit: int) -> str:
    """The one wording, engine and SDK alike, of a value over MAX_VALUE_BYTES."""
    return f"{size:,} bytes of JSON, more than the {limit:,} a value may have (CADENZA_MAX_VALUE_BYTES)"
