"""Where each message goes and how it is encoded: names and JSON, no I/O.

Every process (agents, engines, the operator, the CLI) agrees on these: the JetStream
streams and key-value buckets, the subjects of tasks, events, cancellations and audit
records, the durable consumer of an Agent, the id of a task attempt (its `Nats-Msg-Id`,
so JetStream drops duplicates), the JSON encoding of every message, and the size limits of values
(larger ones travel through the object store as `{REF_KEY: name}`; see `cadenza.nats`).

Pure: the engine's decision function uses it. What a message says, typed, is in
`cadenza.protocol`.
"""

from __future__ import annotations

from ._protocol import (
    AUDIT_STREAM,
    AUDIT_SUBJECTS,
    CLAIM_MAX_AGE,
    CLAIMS_BUCKET,
    CONTEXT_BUCKET,
    DEAD_LETTER_STREAM,
    DEAD_LETTER_SUBJECTS,
    DEFINITIONS_BUCKET,
    EVENT_SUBJECTS,
    EVENTS_STREAM,
    MAX_VALUE_BYTES,
    OFFLOAD_BYTES,
    OUTPUTS_BUCKET,
    PAYLOADS_STORE,
    REF_KEY,
    RUN_STATUS_BUCKET,
    RUNS_BUCKET,
    TASK_SUBJECTS,
    TASKS_STREAM,
    TERMINAL_RUN_PHASES,
    agent_event_subject,
    audit_subject,
    cancel_subject,
    claim_key,
    consumer_name,
    dumps,
    event_source,
    event_subject,
    is_ref,
    loads,
    payloads_store,
    run_status_key,
    task_id,
    task_subject,
    too_large,
)

__all__ = [
    "AUDIT_STREAM",
    "AUDIT_SUBJECTS",
    "CLAIMS_BUCKET",
    "CLAIM_MAX_AGE",
    "CONTEXT_BUCKET",
    "DEAD_LETTER_STREAM",
    "DEAD_LETTER_SUBJECTS",
    "DEFINITIONS_BUCKET",
    "EVENTS_STREAM",
    "EVENT_SUBJECTS",
    "MAX_VALUE_BYTES",
    "OFFLOAD_BYTES",
    "OUTPUTS_BUCKET",
    "PAYLOADS_STORE",
    "REF_KEY",
    "RUNS_BUCKET",
    "RUN_STATUS_BUCKET",
    "TASKS_STREAM",
    "TASK_SUBJECTS",
    "TERMINAL_RUN_PHASES",
    "agent_event_subject",
    "audit_subject",
    "cancel_subject",
    "claim_key",
    "consumer_name",
    "dumps",
    "event_source",
    "event_subject",
    "is_ref",
    "loads",
    "payloads_store",
    "run_status_key",
    "task_id",
    "task_subject",
    "too_large",
]
