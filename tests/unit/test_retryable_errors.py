"""Which failed attempts are retried: every handler exception under the step's retry policy,
except FatalError and the types the step lists in `retry.nonRetryable` (matched on the
class and its bases). The agent classifies (`failure_of`), the engine decides (`decide`)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from cadenza import Agent, FatalError, RetryableError, TaskError
from cadenza._errors import MAX_TYPE_NAMES, failure_of, non_retryable_match
from cadenza.testing import call_handler, failure, is_retryable
from cadenza_operator.engine.decide import MAX_ERROR_BYTES
from cadenza_operator.models import WorkflowSpec
from pydantic import ValidationError

from ..conftest import cadenza
from .helpers import Driver, agent_step, compile_spec


class VendorError(ConnectionError):
    """An SDK's own exception, deriving from a builtin one."""


def raised(exc: BaseException) -> dict[str, Any]:
    """The error the agent sends for `exc`, raised and caught as in the worker."""
    try:
        raise exc
    except BaseException as caught:
        return failure_of(caught)


# ------------------------------------------------------------------- the agent's verdict


def test_a_plain_exception_is_retryable_with_its_bases_and_traceback() -> None:
    error = raised(ConnectionResetError(104, "Connection reset by peer"))
    assert error["type"] == "ConnectionResetError"
    assert error["retryable"] is True
    assert error["types"] == ["ConnectionResetError", "ConnectionError", "OSError", "Exception"]
    assert error["message"] == "[Errno 104] Connection reset by peer"
    assert "raise exc" in error["traceback"]


def test_a_library_exception_is_named_with_its_module() -> None:
    error = raised(VendorError("gone"))
    assert error["types"][0] == f"{__name__}.VendorError"
    assert error["types"][1:] == ["ConnectionError", "OSError", "Exception"]


def test_fatal_error_is_the_only_sdk_error_not_retried() -> None:
    assert raised(FatalError("bad input"))["retryable"] is False
    assert raised(RetryableError("rate limited"))["retryable"] is True
    assert raised(TaskError("no verdict"))["retryable"] is True
    fatal = raised(FatalError("bad input", details={"field": "ticket"}))
    assert (fatal["message"], fatal["details"]) == ("bad input", {"field": "ticket"})


def test_a_deep_hierarchy_sends_a_bounded_list_most_specific_first() -> None:
    cls: type[Exception] = Exception
    for i in range(40):
        cls = type(f"Level{i}", (cls,), {})
    types = raised(cls("deep"))["types"]
    assert len(types) == MAX_TYPE_NAMES
    assert types[0].endswith(".Level39")


def test_a_huge_traceback_is_cut_to_its_tail() -> None:
    def recurse(n: int) -> None:
        if n == 0:
            raise ValueError("x" * 100_000)
        recurse(n - 1)

    try:
        recurse(50)
    except ValueError as exc:
        error = failure_of(exc)
    assert len(error["traceback"]) <= 4000
    assert error["traceback"].rstrip().endswith("x")


# ------------------------------------------------------------------ matching the policy


VENDOR = {
    "type": "VendorError",
    "types": ["vendor.errors.VendorError", "ConnectionError", "OSError", "Exception"],
    "message": "gone",
    "retryable": True,
}


@pytest.mark.parametrize(
    ("entries", "match"),
    [
        (["VendorError"], "VendorError"),
        (["OSError"], "OSError"),  # a base class
        (["ValueError", "ConnectionError"], "ConnectionError"),
        (["Exception"], "Exception"),
        (["vendor.errors.VendorError"], "vendor.errors.VendorError"),  # the full name
        (["errors.VendorError"], "errors.VendorError"),  # a dotted suffix of it
        (["Error"], None),  # a suffix counts only at a dot: not every *Error
        (["rors.VendorError"], None),
        (["other.VendorError"], None),
        (["ValueError"], None),
        ([], None),
    ],
)
def test_non_retryable_entries_match_the_class_or_a_base(entries: list[str], match: str | None) -> None:
    assert non_retryable_match(VENDOR, entries) == match


def test_an_agent_that_sends_only_the_type_is_matched_on_it() -> None:
    assert non_retryable_match({"type": "KeyError"}, ["KeyError"]) == "KeyError"
    assert non_retryable_match({"type": "KeyError"}, ["LookupError"]) is None


def test_timeouts_are_never_matched() -> None:
    timeout = {"type": "Timeout", "types": ["Timeout"], "retryable": True, "timeout": True}
    assert non_retryable_match(timeout, ["Timeout"]) is None


def test_cadenza_testing_reports_what_the_engine_decides() -> None:
    assert is_retryable(ConnectionResetError())
    assert not is_retryable(ConnectionResetError(), ["OSError"])
    assert is_retryable(ConnectionResetError(), ["ValueError"])
    assert not is_retryable(FatalError("no"))
    assert is_retryable(RetryableError("again"), ["OSError"])
    assert failure(KeyError("k"))["types"] == ["KeyError", "LookupError", "Exception"]


def test_cadenza_testing_fails_an_output_json_cannot_carry_as_fatal() -> None:
    agent = Agent("worker")

    @agent.handler
    async def handle(task: Any) -> Any:
        return {"when": object()}

    with pytest.raises(FatalError, match="cannot be sent as JSON") as info:
        asyncio.run(call_handler(agent, {}))
    assert not is_retryable(info.value)


# ------------------------------------------------------------------ the engine decides


def plain(kind: str, *bases: str, message: str = "boom") -> dict[str, Any]:
    """The error an agent sends for a plain exception."""
    return {"type": kind, "types": [kind, *bases, "Exception"], "message": message, "retryable": True}


RESET = plain("ConnectionResetError", "ConnectionError", "OSError")


def run(retry: dict[str, Any] | None = None) -> Driver:
    step = agent_step("a", retry=retry) if retry is not None else agent_step("a")
    d = Driver(compile_spec({"steps": [step]}))
    d.start()
    return d


def fail(d: Driver, error: dict[str, Any]) -> None:
    d._answer(d.task("a"), {"type": "failed", "error": error})


def test_a_plain_exception_is_retried_up_to_the_limit() -> None:
    d = run({"limit": 2, "backoff": {"initial": "1s", "jitter": 0}})
    for attempt in (1, 2):
        fail(d, RESET)
        assert d.state.timers[f"retry:a:{attempt + 1}"].attempt == attempt + 1
        d.fire_next_timer()
    fail(d, RESET)
    st = d.step("a")
    assert (st.phase, st.attempt) == ("Failed", 3)
    assert st.error is not None and st.error["retriesExhausted"] is True
    assert st.error["type"] == "ConnectionResetError"


def test_a_plain_exception_without_a_retry_policy_fails_at_once() -> None:
    d = run()
    fail(d, RESET)
    assert (d.step("a").phase, d.step("a").attempt) == ("Failed", 1)
    assert not d.state.timers


@pytest.mark.parametrize("listed", ["ConnectionResetError", "OSError"])
def test_a_listed_type_or_base_fails_the_step_on_the_first_attempt(listed: str) -> None:
    d = run({"limit": 5, "nonRetryable": ["ValueError", listed]})
    fail(d, RESET)
    st = d.step("a")
    assert (st.phase, st.attempt) == ("Failed", 1)
    assert not d.state.timers
    assert st.error is not None
    assert (st.error["retryable"], st.error["nonRetryable"]) == (False, listed)
    assert "retriesExhausted" not in st.error
    assert st.attempts[0].error is not None and st.attempts[0].error["nonRetryable"] == listed
    assert d.phase == "Failed"


def test_an_unlisted_type_is_still_retried() -> None:
    d = run({"limit": 1, "nonRetryable": ["ValueError", "ConnectionRefusedError"]})
    fail(d, RESET)
    assert d.step("a").phase == "Running"
    assert "retry:a:2" in d.state.timers


def test_timeouts_stay_retryable_whatever_the_list() -> None:
    d = run({"limit": 1, "nonRetryable": ["Timeout", "TimeoutError", "Exception"]})
    fail(d, {"type": "Timeout", "message": "slow", "retryable": True, "timeout": True})
    assert "retry:a:2" in d.state.timers


def test_a_fatal_error_is_not_retried_even_when_unlisted() -> None:
    d = run({"limit": 3})
    fail(
        d,
        {"type": "FatalError", "types": ["cadenza._errors.FatalError"], "message": "no", "retryable": False},
    )
    assert (d.step("a").phase, d.step("a").attempt) == ("Failed", 1)


def test_a_forEach_item_with_a_listed_type_fails_without_retry() -> None:
    spec = {
        "steps": [
            agent_step("a", forEach="[1, 2]", retry={"limit": 3, "nonRetryable": ["OSError"]}),
        ]
    }
    d = Driver(compile_spec(spec))
    d.start()
    d._answer(d.task("a", 0), {"type": "failed", "error": RESET})
    assert not any(t.startswith("retry:") for t in d.state.timers)
    assert d.step("a").phase == "Failed"


def test_the_type_names_survive_a_huge_error() -> None:
    d = run({"limit": 3, "nonRetryable": ["OSError"]})
    fail(d, plain("ConnectionResetError", "ConnectionError", "OSError", message="x" * (MAX_ERROR_BYTES * 2)))
    st = d.step("a")
    assert st.error is not None and st.error["truncated"] is True
    assert (st.phase, st.attempt, st.error["nonRetryable"]) == ("Failed", 1, "OSError")


# ------------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    "entries",
    [[""], ["bad name"], ["1Error"], ["a..b"], ["OSError."], ["x" * 201], [7], ["E"] * 65],
)
def test_bad_non_retryable_entries_are_rejected(entries: list[Any]) -> None:
    spec = {"steps": [agent_step("a", retry={"limit": 1, "nonRetryable": entries})]}
    with pytest.raises(ValidationError) as info:
        WorkflowSpec.model_validate(spec)
    assert info.value.errors()[0]["loc"][:4] == ("steps", 0, "retry", "nonRetryable")


def test_cadenza_validate_names_the_file_object_and_field(tmp_path: Any) -> None:
    path = tmp_path / "wf.yaml"
    path.write_text(
        "apiVersion: cadenza.dev/v1alpha1\nkind: Agent\nmetadata: {name: worker}\n"
        "spec: {command: [python, agents.py]}\n---\n"
        "apiVersion: cadenza.dev/v1alpha1\nkind: Workflow\nmetadata: {name: wf}\n"
        "spec:\n  steps:\n    - name: a\n      agent: worker\n"
        "      retry: {limit: 2, nonRetryable: [OSError, 'not a type']}\n"
    )
    result = cadenza("validate", str(path))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert "wf.yaml: Workflow/wf: spec.steps[0].retry.nonRetryable[1]" in result.stderr
