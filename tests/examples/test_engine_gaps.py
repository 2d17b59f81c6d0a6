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
