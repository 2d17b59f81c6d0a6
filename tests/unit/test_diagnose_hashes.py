"""The hashes `cadenza diagnose` groups attempts by: each step attempt's rendered input and
its output, recorded by the pure decide in the run record (Attempt.inputHash/outputHash)."""

from __future__ import annotations

from cadenza.wire import REF_KEY
from cadenza_operator.engine.decide.context import HASH_CHARS, value_hash
from cadenza_operator.engine.state import RunState

from .helpers import Driver, agent_step, compile_spec


def test_hash_is_of_canonical_json_key_order_and_spacing_do_not_matter() -> None:
    assert value_hash({"a": 1, "b": [1, {"x": "é", "y": None}]}) == value_hash(
        {"b": [1, {"y": None, "x": "é"}], "a": 1}
    )
    assert value_hash({"a": 1}) != value_hash({"a": 2})
    assert value_hash(1) != value_hash("1")  # the JSON type counts
    assert len(value_hash(None)) == HASH_CHARS


def test_a_reference_is_hashed_as_the_reference_never_its_content() -> None:
    ref = {REF_KEY: "r1.a.1.output"}
    assert value_hash(ref) == value_hash({REF_KEY: "r1.a.1.output"})
    assert value_hash(ref) != value_hash({REF_KEY: "r2.a.1.output"})


def test_each_attempt_records_its_input_hash_and_a_success_its_output_hash() -> None:
    wf = compile_spec(
        {
            "steps": [
                agent_step(
                    "a", input={"q": "${{ input.q }}"}, retry={"limit": 1, "backoff": {"initial": "1s"}}
                ),
                agent_step("b", dependsOn=["a"], input={"prev": "${{ steps.a.output }}"}),
            ]
        }
    )
    d = Driver(wf, input={"q": "same"})
    d.start()
    d.fail("a", retryable=True)
    d.fire_next_timer()
    d.succeed("a", {"z": 1, "y": [2]})
    d.succeed("b", "done")
    assert d.phase == "Succeeded"
    # What the record keeps, through its bytes (the KV round trip).
    state = RunState.from_bytes(d.state.to_bytes())
    first, second = state.steps["a"].attempts
    assert first.inputHash == second.inputHash == value_hash({"q": "same"})
    assert first.outputHash is None  # failed: no output
    assert second.outputHash == value_hash({"y": [2], "z": 1})
    (b,) = state.steps["b"].attempts
    assert b.inputHash == value_hash({"prev": {"z": 1, "y": [2]}})
    assert b.outputHash == value_hash("done")


def test_an_output_passed_by_reference_is_hashed_by_its_reference() -> None:
    wf = compile_spec({"steps": [agent_step("a")]})
    d = Driver(wf, input={})
    d.start()
    ref = {REF_KEY: "r1.a.1.output"}
    d.succeed("a", ref)
    assert d.state.steps["a"].attempts[0].outputHash == value_hash(ref)
