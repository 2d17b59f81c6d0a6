"""Errors a handler raises to tell the engine how its attempt failed, and how any exception
becomes the `error` of a failed attempt.

As in Temporal, every exception a handler raises is retryable under the step's retry
policy, except `FatalError` (and a `TaskError` subclass that sets `retryable = False`) and
the exception types the step lists in `retry.nonRetryable`. The agent cannot apply that
list (it does not know the step's policy), so it sends the exception's type names and the
engine decides (`non_retryable_match`, used by `engine/decide.py`).
"""

from __future__ import annotations

import traceback
from collections.abc import Iterable
from typing import Any

from .protocol import TaskFailure

MAX_TYPE_NAMES = 16
"""Classes of an exception's MRO sent with a failure: deep hierarchies are cut, most specific kept."""
MAX_TYPE_NAME_CHARS = 200
MAX_TRACEBACK_CHARS = 4000
"""The tail of the traceback kept for the author: the record stores the error several times."""


class TaskError(Exception):
    """Base of the errors that carry a decision about retrying (retryable unless a subclass says not)."""

    retryable: bool = True

    def __init__(self, message: str, *, details: dict[str, object] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or {}


class RetryableError(TaskError):
    """The attempt failed for a reason that may pass (rate limit, network): retry per the step's policy.

    Any other exception is retried the same way; raise this to say so explicitly or to
    attach `details`.
    """

    retryable = True


class FatalError(TaskError):
    """The attempt failed for good (bad input, refused request): no retry, the step fails."""

    retryable = False


class BudgetExceeded(TaskError):
    """A model call refused because the run (or its step) has spent its budget, or the run
    is paused or ending: raised by `task.model()` calls instead of calling the model.

    Retryable: if the handler lets it propagate, the engine holds the step's next attempt
    while the run is paused for its budget (no retry is spent) and sends it on `resume`.
    """

    retryable = True


def type_names(exc: BaseException) -> list[str]:
    """The exception's class and its bases, most specific first, as `module.QualName`
    (builtins by their bare name): what a step's `retry.nonRetryable` entries match.

    `object` and `BaseException` are left out: they would match every exception.
    """
    names: list[str] = []
    for cls in type(exc).__mro__:
        if cls in (object, BaseException):
            continue
        module = getattr(cls, "__module__", "") or ""
        name = cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"
        names.append(name[:MAX_TYPE_NAME_CHARS])
        if len(names) == MAX_TYPE_NAMES:
            break
    return names


def failure_of(exc: BaseException) -> dict[str, Any]:
    """The `error` of a failed attempt whose handler raised `exc`, as the agent sends it.

    `retryable` is the handler's own verdict (False only for FatalError and TaskError
    subclasses that say so); the engine also applies the step's `retry.nonRetryable`
    to `types`. Call it inside the `except` block: the traceback is the one being handled.
    """
    failure = TaskFailure(type=type(exc).__name__, types=type_names(exc), retryable=True)
    if isinstance(exc, TaskError):
        failure.message, failure.retryable, failure.details = exc.message, bool(exc.retryable), exc.details
    else:
        failure.message = str(exc) or type(exc).__name__
        failure.traceback = traceback.format_exc(limit=8)[-MAX_TRACEBACK_CHARS:]
    return failure.wire()


def non_retryable_match(error: dict[str, Any], non_retryable: Iterable[str]) -> str | None:
    """The `retry.nonRetryable` entry that names the failed attempt's exception, or None.

    An entry matches the exception's class or any of its bases (`types`, sent by the
    agent; an older agent sends only `type`), by bare name (`OSError` covers
    `ConnectionResetError`) or by a dotted suffix of the full `module.QualName`
    (`requests.exceptions.ConnectionError`, `exceptions.ConnectionError`). Timeouts are
    not matched: they are the engine's (and the agent's) verdict, not a handler's type.
    """
    entries = tuple(non_retryable)
    if not entries or error.get("timeout"):
        return None
    types = error.get("types")
    names = [str(t) for t in types] if isinstance(types, list) else []
    if not names and error.get("type"):
        names = [str(error["type"])]
    for name in names:
        for entry in entries:
            if name == entry or name.endswith("." + entry):
                return entry
    return None
