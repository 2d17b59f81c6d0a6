"""What a decision asks the runtime to do, typed: one class per `op`.

`decide` returns these; the runtime carries them out (`runtime.Engine._execute`). The run
record keeps them as JSON in its outbox (`wire()`), so that an engine that dies after
writing the record and before carrying them out leaves them to the next one, which reads
them back with `from_wire`. The JSON is the outbox's format since before these classes
existed: records written by an earlier engine load and execute unchanged.

Every command is idempotent: a task or event goes out with a deterministic Nats-Msg-Id
(JetStream drops a repeat), a child run's start is keyed by its run id, a cancellation
asks agents to stop what may already have stopped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Dispatch:
    """Send a task (attempt N of a step or item) to its Agent's work queue."""

    subject: str
    msg_id: str
    body: dict[str, Any]
    agent: str | None

    def wire(self) -> dict[str, Any]:
        return {
            "op": "dispatch",
            "subject": self.subject,
            "msgId": self.msg_id,
            "body": self.body,
            "agent": self.agent,
        }


@dataclass(frozen=True, slots=True)
class StartChild:
    """Start a sub-workflow run as the attempt of a step (or item): `parent` says which."""

    run: str
    workflow: str | None
    namespace: str
    input: Any
    scope: str
    parent: dict[str, Any]

    def wire(self) -> dict[str, Any]:
        return {
            "op": "startChild",
            "run": self.run,
            "workflow": self.workflow,
            "namespace": self.namespace,
            "input": self.input,
            "scope": self.scope,
            "parent": self.parent,
        }


@dataclass(frozen=True, slots=True)
class Publish:
    """Publish an event to a run's event stream: a child's outcome to its parent, a cancel to a child."""

    subject: str
    msg_id: str
    body: dict[str, Any]

    def wire(self) -> dict[str, Any]:
        return {"op": "publish", "subject": self.subject, "msgId": self.msg_id, "body": self.body}


@dataclass(frozen=True, slots=True)
class CancelTasks:
    """Tell agents to stop a run's tasks (core NATS, best effort: the engine has moved on)."""

    subject: str
    body: dict[str, Any]

    def wire(self) -> dict[str, Any]:
        return {"op": "cancelTasks", "subject": self.subject, "body": self.body}


@dataclass(frozen=True, slots=True)
class Audit:
    """A decision's audit records, published to the audit stream as one message once the
    decision is committed (again when its outbox is carried out again)."""

    records: list[dict[str, Any]]
    # The forEach item attempts the decision ended (Decision.item_attempts), for their spans
    # (engine/tracing.py); not published. Absent from the outboxes of older engines.
    item_attempts: list[dict[str, Any]] = field(default_factory=list)

    def wire(self) -> dict[str, Any]:
        if self.item_attempts:
            return {"op": "audit", "records": self.records, "itemAttempts": self.item_attempts}
        return {"op": "audit", "records": self.records}


Command = Dispatch | StartChild | Publish | CancelTasks | Audit


def from_wire(cmd: dict[str, Any]) -> Command | None:
    """A command of a stored outbox, typed; None for an op this engine does not know
    (skipped, as the runtime always skipped them)."""
    op = cmd.get("op")
    if op == "dispatch":
        return Dispatch(cmd["subject"], cmd["msgId"], cmd["body"], cmd.get("agent"))
    if op == "publish":
        return Publish(cmd["subject"], cmd["msgId"], cmd["body"])
    if op == "cancelTasks":
        return CancelTasks(cmd["subject"], cmd["body"])
    if op == "startChild":
        return StartChild(
            cmd["run"], cmd.get("workflow"), cmd["namespace"], cmd.get("input"), cmd["scope"], cmd["parent"]
        )
    if op == "audit":
        return Audit(cmd.get("records") or [], cmd.get("itemAttempts") or [])
    return None
