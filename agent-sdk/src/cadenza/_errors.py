"""Errors a handler raises to tell the engine how its attempt failed."""

from __future__ import annotations


class TaskError(Exception):
    """Base of the errors that carry a decision about retrying."""

    retryable: bool = False

    def __init__(self, message: str, *, details: dict[str, object] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or {}


class RetryableError(TaskError):
    """The attempt failed for a reason that may pass (rate limit, network): retry per the step's policy."""

    retryable = True


class FatalError(TaskError):
    """The attempt failed for good (bad input, refused request): no retry, the step fails."""

    retryable = False
