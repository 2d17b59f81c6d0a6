"""Engine behaviour the examples needed and did not get: minimal reproductions.

Each test states what the workflow semantics should allow. They are strict xfails: when
the engine is fixed the test passes, the strict marker turns that into a failure, and the
marker (and the example's workaround) should go.
"""

from __future__ import annotations

import pytest

from ..unit.helpers import Driver, agent_step, compile_spec

FALLBACK_SPEC = {
    "steps": [
        agent_step("draft"),
        agent_step("check", dependsOn=["draft"], onFailure="revise"),
        agent_step("revise", dependsOn=["draft"], input={"why": "${{ steps.check.error.message }}"}),
        agent_step(
            "publish",
            dependsOn=["check"],
            input={
                "text": "${{ steps.check.phase == 'Succeeded' ? steps.draft.output.text"
                " : steps.revise.output.text }}"
            },
        ),
    ]
}


@pytest.mark.xfail(
    strict=True,
    reason=(
        "a dependent of a step recovered by its fallback cannot read the fallback's output: "
        "compile_workflow rejects steps.revise in publish's input ('not among the step's "
        "dependencies'), and dependsOn: [revise] is refused ('a fallback step; depend on the step it "
        "stands in for'), so the revised result can reach publish only through the context store "
        "(examples/research-report works around it that way)"
    ),
)
def test_dependent_of_a_recovered_step_reads_the_fallback_output() -> None:
    d = Driver(compile_spec(FALLBACK_SPEC))
    d.start()
    d.succeed("draft", {"text": "v1"})
    d.fail("check", message="too long")
    assert d.task("revise").body["input"] == {"why": "too long"}
    d.succeed("revise", {"text": "v2"})
    assert d.task("publish").body["input"] == {"text": "v2"}
    d.succeed("publish")
    assert d.phase == "Succeeded"


@pytest.mark.xfail(
    strict=True,
    reason=(
        "when a fallback fails too, the run message names only the original step's error "
        "('step check failed: FatalError: rejected'); the fallback's failure, which is what ended "
        "the run, is only in the fallback step's own message (seen in examples/research-report "
        "with max_words: 100)"
    ),
)
def test_run_message_names_the_failed_fallback() -> None:
    spec = {
        "steps": [
            agent_step("draft"),
            agent_step("check", dependsOn=["draft"], onFailure="revise"),
            agent_step("revise", dependsOn=["draft"]),
        ]
    }
    d = Driver(compile_spec(spec))
    d.start()
    d.succeed("draft")
    d.fail("check", message="rejected")
    d.fail("revise", message="cannot fix it")
    assert d.phase == "Failed"
    assert "revise" in d.state.message and "cannot fix it" in d.state.message


@pytest.mark.xfail(
    strict=True,
    reason=(
        "a step cancelled while it waited for approval keeps the approval prompt as its status "
        "message ('Apply the fix?'), so status/--output json show the question instead of why "
        "the step was cancelled (seen in examples/incident-remediation with --timeout)"
    ),
)
def test_cancelled_approval_step_says_why() -> None:
    spec = {"steps": [{"name": "approve", "approval": {"message": "Apply the fix?"}}]}
    d = Driver(compile_spec(spec))
    d.start()
    assert d.step("approve").phase == "WaitingApproval"
    d.send({"type": "cancel", "by": "oncall", "reason": "false alarm"})
    assert d.step("approve").phase == "Cancelled"
    assert d.step("approve").message != "Apply the fix?"
