"""Parsing a resource's spec into its pydantic model at the edge of every handler.

A bad spec becomes a condition (False, reason InvalidSpec, the field path in the
message), a Warning Event and a `kopf.PermanentError`: reported once, never retried in
a crash loop. The API server's schema and CEL rules catch most of it before; this is
the same check `cadenza validate` makes, for what they cannot express.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, NoReturn, TypeVar

import kopf
from pydantic import BaseModel, ValidationError

from ..manifests import loc_path
from . import events
from .status import condition, with_transition_times

M = TypeVar("M", bound=BaseModel)


class InvalidSpec(ValueError):
    """A spec its model rejects; `path` names the field."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path
        self.message = message


def load_resource(model: type[M], body: kopf.Body) -> M:
    """`model` (Agent, Workflow, WorkflowRun) from the body; InvalidSpec names the first bad field."""
    meta = body.metadata
    document = {
        "metadata": {"name": meta.name, "namespace": meta.namespace or "default"},
        "spec": dict(body.spec),
    }
    try:
        return model.model_validate(document)
    except ValidationError as exc:
        err = exc.errors()[0]
        message = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
        raise InvalidSpec(loc_path(err["loc"]), message) from None


def parse_resource(
    model: type[M], body: kopf.Body, patch: kopf.Patch, *, condition_type: str, reason: str = "InvalidSpec"
) -> M:
    """`model` from the body, or the invalid-spec report (a condition, an Event, no retry)."""
    try:
        return load_resource(model, body)
    except InvalidSpec as exc:
        invalid_spec(body, patch, exc.path, exc.message, condition_type=condition_type, reason=reason)


def invalid_spec(
    body: kopf.Body,
    patch: kopf.Patch,
    path: str,
    message: str,
    *,
    condition_type: str,
    reason: str = "InvalidSpec",
) -> NoReturn:
    text = f"{path}: {message}" if path else message
    status, new = invalid_spec_status(body, text, condition_type=condition_type, reason=reason)
    update_status(body, patch, status)
    if new:  # once per problem, not on every resume
        events.warning(body, reason, text)
    raise kopf.PermanentError(text)


def invalid_spec_status(
    body: kopf.Body, text: str, *, condition_type: str, reason: str = "InvalidSpec"
) -> tuple[dict[str, Any], bool]:
    """The status reporting a bad spec, and whether it reports a problem not reported yet."""
    previous = dict(body.status or {}).get("conditions") or []
    conditions = with_transition_times(
        [condition(condition_type, "False", reason, text)], previous, time.time()
    )
    status = {"observedGeneration": body.metadata.get("generation"), "conditions": conditions}
    return status, conditions[0] not in previous


def update_status(body: kopf.Body, patch: kopf.Patch, status: Mapping[str, Any]) -> None:
    """Put into kopf's patch the status fields that differ from the object's: an unchanged
    object (e.g. on every operator restart, when kopf resumes all of them) costs no write."""
    current = dict(body.status or {})
    changed = {k: v for k, v in status.items() if current.get(k) != v}
    if changed:
        patch.status.update(changed)
