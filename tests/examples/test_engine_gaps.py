"""Engine behaviour the examples asked for, as minimal reproductions on the pure decide.

They began as strict xfails written while building the examples; the engine now does what
each one states, so they stay as regression tests.
"""

from __future__ import annotations

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


def test_cancelled_approval_step_says_why() -> None:
    spec = {"steps": [{"name": "approve", "approval": {"message": "Apply the fix?"}}]}
    d = Driver(compile_spec(spec))
    d.start()
    assert d.step("approve").phase == "WaitingApproval"
    d.send({"type": "cancel", "by": "oncall", "reason": "false alarm"})
    assert d.step("approve").phase == "Cancelled"
    assert d.step("approve").message != "Apply the fix?"
    # What `cadenza get` and the WorkflowRun's status show: who cancelled, and why.
    assert d.step("approve").message == "cancelled by oncall: false alarm"
    assert d.phase == "Cancelled"
    assert d.state.message == "cancelled by oncall: false alarm"
