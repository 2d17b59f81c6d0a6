"""Kubernetes Events about Cadenza objects, posted through kopf's event poster.

kopf posts them asynchronously (queued, with retries) as core/v1 Events on the object,
which `kubectl describe` and `kubectl get events` show. Reasons are CamelCase and fixed,
so alerts and dashboards can select on them: RunStarted, RunSucceeded, RunFailed,
RunCancelled, StepFailed, RetriesExhausted, ApprovalWaiting, ApprovalSent, BudgetExceeded,
Resumed, Retried (on a retried WorkflowRun), InvalidSpec (Agent, Model; an Agent's also
for a Model it names), Invalid (Workflow), InvalidInput, WorkflowNotFound,
TriggerEventFailed (Workflow). The README's Observability section lists them all.

Work that runs outside a kopf handler (a trigger's consumer) has no kopf poster to
queue on: `post_direct` creates the same Event through the operator's API client, and
`post_once` one under a given name, so that work told twice of the same thing (two engines
answering one retry) posts it once: the second create is refused (409).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import kopf

from .api import ApiError, KubeApi, path_of
from .status import RunEvent

MAX_MESSAGE = 1024
"""Characters of an Event message kept (kopf cuts its own the same way)."""
COMPONENT = "cadenza-operator"
MAX_NAME = 253
"""An Event's name is a DNS subdomain: at most this many characters."""


def post(body: Any, events: Iterable[RunEvent]) -> None:
    for event in events:
        kopf.event(body, type=event.type, reason=event.reason, message=event.message)


def normal(body: Any, reason: str, message: str) -> None:
    kopf.event(body, type="Normal", reason=reason, message=message)


def warning(body: Any, reason: str, message: str) -> None:
    kopf.event(body, type="Warning", reason=reason, message=message)


def build_event(
    involved: dict[str, Any], type: str, reason: str, message: str, now: datetime, *, name: str = ""
) -> dict[str, Any]:
    """A core/v1 Event about `involved` (an object's apiVersion, kind, metadata), named
    `name` or, without, generated from the object's name."""
    meta = involved.get("metadata") or {}
    namespace = meta.get("namespace") or "default"
    if len(message) > MAX_MESSAGE:
        message = message[: MAX_MESSAGE - 1] + "…"
    stamp = now.isoformat()
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"namespace": namespace, "name": name}
        if name
        else {"namespace": namespace, "generateName": f"{meta.get('name', 'cadenza')}."},
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


def once_name(involved_name: str, reason: str, key: str) -> str:
    """An Event name that is the same each time `key` (e.g. a retry's new run id) is told
    of: the object's name (cut to fit), the reason and a digest of `key`; a DNS subdomain."""
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    suffix = f".{reason.lower()}-{digest}"
    return involved_name[: MAX_NAME - len(suffix)].rstrip(".-") + suffix


async def post_once(
    api: KubeApi, involved: dict[str, Any], type: str, reason: str, message: str, *, name: str
) -> bool:
    """Create the Event named `name` now, unless it exists (False: posted already)."""
    event = build_event(involved, type, reason, message, datetime.now(UTC), name=name)
    try:
        await api.create(path_of("v1", "events", event["metadata"]["namespace"]), event)
    except ApiError as exc:
        if exc.status == 409:
            return False
        raise
    return True
