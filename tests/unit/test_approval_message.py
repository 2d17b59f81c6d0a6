"""An approval's `message` is rendered like step inputs: `${{ }}` over `input` and the
outputs of the steps it depends on, once, when the step starts waiting."""

from __future__ import annotations

from typing import Any

import pytest
from cadenza_operator.engine.definition import DefinitionError

from .helpers import Driver, agent_step, compile_spec


def spec(message: str, **extra: Any) -> dict[str, Any]:
    return {
        "steps": [
            agent_step("quote"),
            {"name": "ok", "dependsOn": ["quote"], "approval": {"message": message, **extra}},
        ]
    }


def waiting(message: str, input: Any) -> Driver:
    d = Driver(compile_spec(spec(message)), input=input)
    d.start()
    d.started("quote")
    d.succeed("quote", {"total": 120.5, "lines": ["a", "b"]})
    assert d.step("ok").phase == "WaitingApproval"
    return d


def test_the_message_is_interpolated_from_input_and_step_outputs() -> None:
    d = waiting("Refund ${{ input.ticket }} of ${{ steps.quote.output.total }} EUR?", {"ticket": "T-7"})
    assert d.step("ok").message == "Refund T-7 of 120.5 EUR?"
    waits = [a for a in d.audit if a["step"] == "ok" and a["to"] == "WaitingApproval"]
    assert [a["reason"] for a in waits] == ["Refund T-7 of 120.5 EUR?"]


def test_a_whole_expression_of_a_non_string_is_shown_as_json() -> None:
    d = waiting("${{ steps.quote.output.lines }}", {})
    assert d.step("ok").message == '["a","b"]'


def test_a_message_that_cannot_be_rendered_shows_the_raw_text_and_the_error_and_keeps_waiting() -> None:
    d = waiting("Refund ${{ input.ticket.id }}?", {"other": 1})
    message = d.step("ok").message
    assert message.startswith("Refund ${{ input.ticket.id }}? (message not rendered: ")
    assert "ticket" in message
    assert d.phase == "Running" and d.step("ok").phase == "WaitingApproval"
    d.send({"type": "approval", "step": "ok", "approved": True, "by": "ada"})
    assert d.phase == "Succeeded"


def test_a_plain_message_is_unchanged() -> None:
    d = waiting("Refund?", {})
    assert d.step("ok").message == "Refund?"


@pytest.mark.parametrize(
    ("message", "error"),
    [
        ("Refund ${{ event.id }}?", "unknown variable 'event'"),
        ("Refund ${{ input. }}?", "does not compile"),
    ],
)
def test_a_message_that_does_not_compile_is_a_definition_error_naming_the_field(
    message: str, error: str
) -> None:
    with pytest.raises(DefinitionError) as caught:
        compile_spec(spec(message))
    assert caught.value.path == "spec.steps[1].approval.message"
    assert error in str(caught.value)


def test_a_message_may_only_read_steps_it_depends_on() -> None:
    body = spec("total ${{ steps.later.output }}")
    body["steps"].append(agent_step("later", dependsOn=["ok"]))
    with pytest.raises(DefinitionError, match="not among the step's dependencies"):
        compile_spec(body)
