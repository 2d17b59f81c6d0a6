"""Kubernetes Events about Cadenza objects, posted through kopf's event poster.

kopf posts them asynchronously (queued, with retries) as core/v1 Events on the object,
which `kubectl describe` and `kubectl get events` show. Reasons are CamelCase and fixed,
so alerts and dashboards can select on them: RunStarted, RunSucceeded, RunFailed,
RunCancelled, StepFailed, RetriesExhausted, ApprovalWaiting, ApprovalSent, InvalidSpec,
Invalid (Workflow), InvalidInput, WorkflowNotFound.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import kopf

from .status import RunEvent


def post(body: Any, events: Iterable[RunEvent]) -> None:
    for event in events:
        kopf.event(body, type=event.type, reason=event.reason, message=event.message)


def normal(body: Any, reason: str, message: str) -> None:
    kopf.event(body, type="Normal", reason=reason, message=message)


def warning(body: Any, reason: str, message: str) -> None:
    kopf.event(body, type="Warning", reason=reason, message=message)
