"""A run's input, checked before the run starts: nesting, size, the workflow's inputSchema."""

from __future__ import annotations

import os
from typing import Any

from cadenza.wire import MAX_VALUE_BYTES, dumps, too_large

from ..models import nesting_error
from .definition import CompiledWorkflow


class InputError(ValueError):
    """A run input rejected before the run starts; `path` names the failing field."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"input{path}: {message}" if path else f"input: {message}")
        self.path = path


def max_value_bytes() -> int:
    """CADENZA_MAX_VALUE_BYTES, else MAX_VALUE_BYTES: the largest value a run may carry."""
    return int(os.environ.get("CADENZA_MAX_VALUE_BYTES") or MAX_VALUE_BYTES)


def validate_input(wf: CompiledWorkflow, value: Any, max_bytes: int | None = None) -> None:
    """Reject an input nested too deeply, larger than `max_bytes` (default:
    max_value_bytes()), or not matching the workflow's inputSchema."""
    deep = nesting_error(value)  # before dumps, which would fail on it without saying where
    if deep is not None:
        raise InputError("", deep)
    limit = max_value_bytes() if max_bytes is None else max_bytes
    size = len(dumps(value))
    if size > limit:
        raise InputError("", too_large(size, limit))
    schema = wf.spec.inputSchema
    if schema is None:
        return
    import jsonschema

    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(value), key=lambda e: list(e.path))
    if errors:
        err = errors[0]
        path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err.absolute_path)
        raise InputError(path, err.message)
