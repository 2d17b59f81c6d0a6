"""How a handler's exception becomes a failed attempt, and whether it is retried.

`RetryableError`, `FatalError`, `TaskError` and `BudgetExceeded` are also exported by `cadenza` itself
(that is where an agent author takes them). The rest is for the engine, which decides
retries: an agent sends the type names of the exception it caught (`failure_of`), and
the engine matches them against the step's `retry.nonRetryable` (`non_retryable_match`).
"""

from __future__ import annotations

from ._errors import (
    MAX_TYPE_NAME_CHARS,
    MAX_TYPE_NAMES,
    BudgetExceeded,
    FatalError,
    RetryableError,
    TaskError,
    failure_of,
    non_retryable_match,
    type_names,
)

__all__ = [
    "MAX_TYPE_NAMES",
    "MAX_TYPE_NAME_CHARS",
    "BudgetExceeded",
    "FatalError",
    "RetryableError",
    "TaskError",
    "failure_of",
    "non_retryable_match",
    "type_names",
]
