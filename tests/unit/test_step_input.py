"""Each step's input as the console and `cadenza get -o json` show it (observe/step_input.py):
re-rendered from the record by decide's own function, and checked against the hash the
newest attempt recorded. Values kept apart need a real server: tests/integration/test_cli_runs.py."""

from __future__ import annotations

from typing import Any

import pytest
from cadenza_operator.engine.decide import MissingOutputs, step_input_now, value_hash
from cadenza_operator.engine.state import RunState
from cadenza_operator.observe.step_input import Rendering, StepInput, step_input

from .helpers import Driver, agent_step, compile_spec

NO_CLIENT: Any = None  # nothing is kept apart in these runs: nothing is loaded


def review_flow() -> Any:
    return compile_spec(
        {
            "steps": [
                agent_step("draft", input={"text": "${{ input.text }}"}),
                agent_step("fanout", dependsOn=["draft"], forEach="[1, 2, 3]", input={"n": "${{ item }}"}),
                agent_step(
                    "publish",
                    dependsOn=["draft"],
                    input={"draft": "${{ steps.draft.output }}", "runs": "${{ steps.draft.attempts }}"},
                    retry={"limit": 2, "backoff": {"initial": "1s"}},
                ),
            ]
        }
    )


async def shown(d: Driver, name: str) -> StepInput:
    state = RunState.from_bytes(d.state.to_bytes())  # what a reader of the bucket gets
    found = await step_input(NO_CLIENT, state, d.wf, name)
    assert found is not None
    return found


async def test_what_the_attempt_received_is_shown_rendered_not_as_its_template() -> None:
    d = Driver(review_flow(), input={"text": "hello"})
    d.start()
    draft = await shown(d, "draft")
    assert (draft.shown, draft.value, draft.attempt) == (Rendering.RENDERED, {"text": "hello"}, 1)
    assert draft.label == "rendered input (what attempt 1 received)"
    # What was dispatched is what is shown: the same value the task carried.
    (task,) = [t for t in d.dispatched if t.step == "draft"]
    assert task.body["input"] == draft.value
    d.succeed("draft", {"body": "text"})
    publish = await shown(d, "publish")
    assert publish.shown is Rendering.RENDERED
    assert publish.value == {"draft": {"body": "text"}, "runs": 1}
    assert publish.document() == {
        "shown": "rendered",
        "label": "rendered input (what attempt 1 received)",
        "value": {"draft": {"body": "text"}, "runs": 1},
        "attempt": 1,
    }


async def test_a_record_changed_since_the_attempt_is_marked_as_differing() -> None:
    d = Driver(review_flow(), input={"text": "hello"})
    d.start()
    d.succeed("draft", {"body": "text"})
    # The record moves on after publish's attempt 1 was sent: what it reads is not what it had.
    d.state.steps["draft"].attempt = 7
    publish = await shown(d, "publish")
    assert publish.shown is Rendering.DIFFERS
    assert publish.value == {"draft": {"body": "text"}, "runs": 7}
    assert publish.label == "re-rendered now (differs from what attempt 1 received)"
    # The newest attempt is the one compared with.
    d.state.steps["draft"].attempt = 1
    d.fail("publish", retryable=True)
    d.fire_next_timer()
    again = await shown(d, "publish")
    assert (again.shown, again.attempt) == (Rendering.RENDERED, 2)


async def test_an_attempt_without_a_hash_is_shown_rendered_but_unchecked() -> None:
    d = Driver(review_flow(), input={"text": "hello"})
    d.start()
    d.state.steps["draft"].attempts[-1].inputHash = None  # a record from before the hashes
    draft = await shown(d, "draft")
    assert (draft.shown, draft.value) == (Rendering.UNCHECKED, {"text": "hello"})


async def test_inputs_not_available_yet_and_foreach_items_show_the_template() -> None:
    d = Driver(review_flow(), input={"text": "hello"})
    d.start()
    publish = await shown(d, "publish")  # draft has not finished: publish was never sent
    assert publish.shown is Rendering.TEMPLATE
    assert publish.value == {"draft": "${{ steps.draft.output }}", "runs": "${{ steps.draft.attempts }}"}
    assert publish.label == "template: the step's inputs are not available yet"
    fanout = await shown(d, "fanout")
    assert (fanout.shown, fanout.value, fanout.items) == (Rendering.TEMPLATE, {"n": "${{ item }}"}, None)
    d.succeed("draft", {"body": "text"})
    fanout = await shown(d, "fanout")
    assert (fanout.shown, fanout.items) == (Rendering.TEMPLATE, 3)
    assert fanout.label == "template, rendered for each of 3 items"
    assert await step_input(NO_CLIENT, d.state, d.wf, "nosuch") is None


async def test_an_input_that_no_longer_renders_shows_the_template_and_why() -> None:
    wf = compile_spec({"steps": [agent_step("a", input={"x": "${{ input.a.b }}"})]})
    d = Driver(wf, input={"a": {"b": 1}})
    d.start()
    d.state.input = {"a": "no longer an object"}
    a = await shown(d, "a")
    assert a.shown is Rendering.TEMPLATE
    assert a.value == {"x": "${{ input.a.b }}"}
    assert a.label.startswith("template: it does not render now (")


def test_the_pure_render_asks_for_outputs_kept_apart_and_renders_once_given_them() -> None:
    wf = compile_spec(
        {"steps": [agent_step("a"), agent_step("b", dependsOn=["a"], input={"big": "${{ steps.a.output }}"})]}
    )
    d = Driver(wf, input={})
    d.start()
    big = {"blob": "x" * 40_000}  # above what the record keeps inline
    d.succeed("a", big)
    ref = d.state.steps["a"].outputRef
    assert ref is not None
    with pytest.raises(MissingOutputs) as missing:
        step_input_now(d.state, wf, "b", {})
    assert missing.value.keys == {ref}
    value = step_input_now(d.state, wf, "b", {ref: d.store[ref]})
    assert value == {"big": big}
    assert value_hash(value) == d.state.steps["b"].attempts[-1].inputHash
