"""Kubernetes Events about Cadenza objects, posted through kopf's event poster.

kopf posts them asynchronously (queued, with retries) as core/v1 Events on the object,
which `kubectl describe` and `kubectl get events` show. Reasons are CamelCase and fixed,
so alerts and dashboards can select on them: RunStarted, RunSucceeded, RunFailed,
RunCancelled, StepFailed, RetriesExhausted, ApprovalWaiting, ApprovalSent, BudgetExceeded,
Resumed, InvalidSpec (Agent, Model; an Agent's also for a Model it names), Invalid
(Workflow), InvalidInput, WorkflowNotFound, TriggerEventFailed (Workflow). The README's
Observability section lists them all.

Work that runs outside a kopf handler (a trigger's consumer) has no kopf poster to
queue on: `post_direct` creates the same Event through the operator's API client.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import kopf

from .api import KubeApi, path_of
from .status import RunEvent

MAX_MESSAGE = 1024
"""Characters of an Event message kept (kopf cuts its own the same way)."""
COMPONENT = "cadenza-operator"


def post(body: Any, events: Iterable[RunEvent]) -> None:
    for event in events:
        kopf.event(body, type=event.type, reason=event.reason, message=event.message)


def normal(body: Any, reason: str, message: str) -> None:
    kopf.event(body, type="Normal", reason=reason, message=message)


def warning(body: Any, reason: str, message: str) -> None:
    kopf.event(body, type="Warning", reason=reason, message=message)


def build_event(
    involved: dict[str, Any], type: str, reason: str, message: str, now: datetime
) -> dict[str, Any]:
    """A core/v1 Event about `involved` (an object's apiVersion, kind, metadata)."""
    meta = involved.get("metadata") or {}
    namespace = meta.get("namespace") or "default"
    if len(message) > MAX_MESSAGE:
        message = message[: MAX_MESSAGE - 1] + "…"
    stamp = now.isoformat()
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"namespace": namespace, "generateName": f"{meta.get('name', 'cadenza')}."},
        "type": type,
        "reason": reason,
        "message": message,
        "action": reason,
        "reportingComponent": COMPONENT,
        "reportingInstance": COMPONENT,
        "source": {"component": COMPONENT},
        "involvedObject": {
            "apiVersion": involved.get("apiVersion"),
            "kind": involved.get("kind"),
            "name": meta.get("name"),
            "namespace": namespace,
            "uid": meta.get("uid"),
        },
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "eventTime": stamp,
    }


async def post_direct(api: KubeApi, involved: dict[str, Any], type: str, reason: str, message: str) -> None:
    """Create an Event now, through `api` (outside kopf handlers)."""
    event = build_event(involved, type, reason, message, datetime.now(UTC))
    await api.create(path_of("v1", "events", event["metadata"]["namespace"]), event)
