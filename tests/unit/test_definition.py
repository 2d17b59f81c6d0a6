"""compile_workflow: the graph checked and ordered, every problem a DefinitionError with a path."""

from __future__ import annotations

from typing import Any

import pytest
from cadenza_operator.engine.definition import DefinitionError

from .helpers import agent_step, compile_spec


def error_of(spec: dict[str, Any], **kwargs: Any) -> DefinitionError:
    with pytest.raises(DefinitionError) as info:
        compile_spec(spec, **kwargs)
    return info.value


def test_steps_are_ordered_topologically_in_declaration_order() -> None:
    wf = compile_spec(
        {
            "steps": [
                agent_step("report", dependsOn=["merge"]),
                agent_step("fetch"),
                agent_step("merge", dependsOn=["fetch", "parse"]),
                agent_step("parse", dependsOn=["fetch"]),
            ]
        }
    )
    assert wf.order == ("fetch", "parse", "merge", "report")
    assert wf.dependents["fetch"] == ("merge", "parse")
    assert wf.agents == {"worker"}


def test_a_cycle_is_reported_with_its_path() -> None:
    err = error_of(
        {
            "steps": [
                agent_step("a"),
                agent_step("b", dependsOn=["a", "d"]),
                agent_step("c", dependsOn=["b"]),
                agent_step("d", dependsOn=["c"]),
            ]
        }
    )
    assert err.path == "spec.steps[1].dependsOn"
    assert "dependency cycle: b -> d -> c -> b" in str(err)


def test_a_self_dependency_is_rejected() -> None:
    err = error_of({"steps": [agent_step("a", dependsOn=["a"])]})
    assert err.path == "spec.steps[0].dependsOn[0]"


def test_an_unknown_dependency_names_the_field() -> None:
    err = error_of({"steps": [agent_step("a"), agent_step("b", dependsOn=["a", "c"])]})
    assert err.path == "spec.steps[1].dependsOn[1]"
    assert "unknown step 'c'" in err.message


def test_unknown_agents_and_workflows_are_reported_when_known_ones_are_given() -> None:
    spec = {
        "steps": [agent_step("a", agent="classifier"), {"name": "b", "workflow": "child"}],
        "onExit": {"agent": "notifier"},
    }
    compile_spec(spec)  # nothing to check against
    err = error_of(spec, known_agents={"notifier"})
    assert (err.path, err.message) == ("spec.steps[0].agent", "unknown agent 'classifier'")
    err = error_of(spec, known_agents={"classifier", "notifier"}, known_workflows={"other"})
    assert err.path == "spec.steps[1].workflow"
    err = error_of(spec, known_agents={"classifier"}, known_workflows={"child"})
    assert err.path == "spec.onExit.agent"
    compile_spec(spec, known_agents={"classifier", "notifier"}, known_workflows={"child"})


def test_expressions_may_only_read_dependencies() -> None:
    ok = compile_spec(
        {
            "steps": [
                agent_step("a"),
                agent_step("b", dependsOn=["a"]),
                agent_step("c", dependsOn=["b"], input={"x": "${{ steps.a.output }}"}),  # transitive: fine
            ],
            "output": {"all": "${{ [steps.a.output, steps.c.output] }}"},
        }
    )
    assert ok.steps["c"].input.steps == {"a"}
    err = error_of(
        {
            "steps": [
                agent_step("a"),
                agent_step("b"),
                agent_step("c", dependsOn=["a"], when="steps.b.output.ok"),
            ]
        }
    )
    assert err.path == "spec.steps[2]"
    assert "reads steps.b but 'b' is not among the step's dependencies" in err.message
    err = error_of({"steps": [agent_step("a"), agent_step("b", forEach="steps['a'].output")]})
    assert "reads steps.a" in err.message
    err = error_of({"steps": [agent_step("a", input="${{ steps.nope.output }}")]})
    assert "unknown step 'nope'" in err.message
    err = error_of({"steps": [agent_step("a")], "output": "${{ steps.nope }}"})
    assert err.path == "spec.output"
    err = error_of({"steps": [agent_step("a")], "onExit": {"agent": "n", "input": "${{ steps.b }}"}})
    assert err.path == "spec.onExit.input"


def test_compile_errors_carry_the_expression_path() -> None:
    err = error_of({"steps": [agent_step("a"), agent_step("b", input={"q": ["${{ input. }}"]})]})
    assert err.path == "spec.steps[1].input.q[0]"
    err = error_of({"steps": [agent_step("a", when="input.x ==")]})
    assert err.path == "spec.steps[0].when"
    err = error_of({"steps": [agent_step("a", forEach="nope")]})
    assert err.path == "spec.steps[0].forEach"
    assert "unknown variable 'nope'" in err.message


def test_item_and_index_need_a_for_each() -> None:
    err = error_of({"steps": [agent_step("a", input={"x": "${{ item }}"})]})
    assert err.path == "spec.steps[0].input"
    compile_spec(
        {"steps": [agent_step("a", forEach="input.xs", input={"x": "${{ item }}", "i": "${{ index }}"})]}
    )


@pytest.mark.parametrize(
    ("field", "source"),
    [("when", "item > 1"), ("forEach", "[index]"), ("when", "event.id == 1")],
)
def test_when_and_for_each_are_evaluated_without_item_or_event(field: str, source: str) -> None:
    err = error_of(
        {
            "steps": [agent_step("a", forEach="input.xs", **{field: source})]
            if field == "when"
            else [agent_step("a", forEach=source)]
        }
    )
    assert err.path == f"spec.steps[0].{field}"
    assert "unknown variable" in err.message


def test_the_output_cannot_use_item_or_event() -> None:
    err = error_of({"steps": [agent_step("a")], "output": {"x": "${{ item }}"}})
    assert err.path == "spec.output.x"


def test_a_step_needs_exactly_one_kind() -> None:
    err = error_of({"steps": [{"name": "a"}]})
    assert "exactly one of agent, workflow, approval, waitFor (has none)" in err.message
    err = error_of({"steps": [{"name": "a", "agent": "x", "approval": {}}]})
    assert "(has agent and approval)" in err.message
    err = error_of({"steps": [{"name": "a", "approval": {}, "forEach": "input.xs"}]})
    assert err.path == "spec.steps[0].forEach"


@pytest.mark.parametrize(
    ("step", "field"),
    [
        ({"approval": {}, "timeout": "1m"}, "timeout"),
        ({"approval": {}, "retry": {"limit": 1}}, "retry"),
        ({"waitFor": {"signal": "s"}, "heartbeatTimeout": "1m"}, "heartbeatTimeout"),
        ({"waitFor": {"signal": "s"}, "timeout": "1m"}, "timeout"),
        ({"workflow": "child", "heartbeatTimeout": "1m"}, "heartbeatTimeout"),
    ],
)
def test_settings_a_step_kind_ignores_are_rejected(step: dict[str, Any], field: str) -> None:
    err = error_of({"steps": [{"name": "a", **step}]})
    assert err.path == f"spec.steps[0].{field}"
    assert "has no effect" in err.message


def test_fallback_steps_are_validated() -> None:
    wf = compile_spec(
        {"steps": [agent_step("a", onFailure="b"), agent_step("b"), agent_step("c", dependsOn=["a"])]}
    )
    assert wf.fallbacks == {"b"}
    assert wf.steps["a"].on_failure == "b"
    err = error_of({"steps": [agent_step("a", onFailure="nope")]})
    assert err.path == "spec.steps[0].onFailure"
    assert "unknown step 'nope'" in err.message
    err = error_of({"steps": [agent_step("a", onFailure="a")]})
    assert "its own fallback" in err.message
    err = error_of(
        {"steps": [agent_step("a", onFailure="b"), agent_step("b"), agent_step("c", dependsOn=["b"])]}
    )
    assert err.path == "spec.steps[2].dependsOn[0]"
    assert "is a fallback step" in err.message


def test_a_fallback_may_read_the_step_it_stands_in_for() -> None:
    wf = compile_spec(
        {
            "steps": [
                agent_step("a", onFailure="b"),
                agent_step("b", input={"why": "${{ steps.a.error }}"}),
            ]
        }
    )
    assert wf.steps["b"].input.steps == {"a"}


def test_a_fallback_cannot_wait_for_the_step_it_stands_in_for() -> None:
    # b would wait for a, and a's dependents for b: a run that hangs.
    err = error_of({"steps": [agent_step("a", onFailure="b"), agent_step("b", dependsOn=["a"])]})
    assert err.path == "spec.steps[1].dependsOn"
    assert err.message == "dependency cycle: b -> b (a's fallback)"
    err = error_of(
        {
            "steps": [
                agent_step("a", onFailure="b"),
                agent_step("c", dependsOn=["a"]),
                agent_step("b", dependsOn=["c"]),
            ]
        }
    )
    assert err.message == "dependency cycle: c -> b (a's fallback) -> c"


def test_fallback_chains_cannot_loop() -> None:
    err = error_of(
        {
            "steps": [
                agent_step("x", onFailure="a"),
                agent_step("a", onFailure="b"),
                agent_step("b", onFailure="a"),
            ]
        }
    )
    assert "fallback cycle: a -> b -> a" in err.message


def test_on_exit_must_not_reuse_a_step_name() -> None:
    err = error_of({"steps": [agent_step("onExit")], "onExit": {"agent": "n"}})
    assert err.path == "spec.onExit.name"


def test_durations_and_retry_settings_are_compiled() -> None:
    wf = compile_spec(
        {
            "steps": [
                agent_step(
                    "a",
                    timeout="1m30s",
                    heartbeatTimeout="10s",
                    retry={
                        "limit": 4,
                        "backoff": {"initial": "500ms", "factor": 3, "max": "20s", "jitter": 0},
                    },
                ),
                agent_step("b"),
                agent_step("c", retry={"limit": 2, "backoff": {"initial": "0s", "max": "0s"}}),
                {"name": "d", "approval": {"timeout": "1h"}},
                {"name": "e", "waitFor": {"signal": "go", "timeout": "2m"}},
            ],
            "deadline": "1d",
        }
    )
    a, b, c = wf.steps["a"], wf.steps["b"], wf.steps["c"]
    assert (a.timeout, a.heartbeat, a.retry_limit) == (90.0, 10.0, 4)
    assert (a.backoff_initial, a.backoff_factor, a.backoff_max, a.backoff_jitter) == (0.5, 3.0, 20.0, 0.0)
    assert (b.timeout, b.heartbeat, b.retry_limit, b.backoff_initial, b.backoff_max) == (
        None,
        None,
        0,
        1.0,
        300.0,
    )
    assert (c.backoff_initial, c.backoff_max) == (0.0, 0.0)
    assert wf.steps["d"].approval_timeout == 3600.0
    assert wf.steps["e"].signal_timeout == 120.0
    assert wf.deadline == 86400.0


def test_for_each_window_defaults_to_a_bound() -> None:
    wf = compile_spec(
        {"steps": [agent_step("a", forEach="input.xs", maxParallel=7), agent_step("b", forEach="input.xs")]}
    )
    assert wf.steps["a"].window == 7
    assert wf.steps["b"].window == 1000


def test_max_parallel_needs_a_for_each() -> None:
    err = error_of({"steps": [agent_step("a", maxParallel=3)]})
    assert err.path == "spec.steps[0].maxParallel"


def test_long_chains_compile() -> None:
    # Declared last step first: a recursive depth-first search would run out of stack.
    n = 3000
    steps = [agent_step("s0")] + [agent_step(f"s{i}", dependsOn=[f"s{i - 1}"]) for i in range(1, n)]
    wf = compile_spec({"steps": steps[::-1]})
    assert wf.order == tuple(f"s{i}" for i in range(n))


def test_triggers_and_input_schema_are_checked() -> None:
    err = error_of({"steps": [agent_step("a")], "triggers": [{}]})
    assert err.path == "spec.triggers[0]"
    err = error_of({"steps": [agent_step("a")], "triggers": [{"schedule": {"cron": "every day"}}]})
    assert err.path == "spec.triggers[0].schedule.cron"
    err = error_of(
        {"steps": [agent_step("a")], "triggers": [{"nats": {"subject": "x", "dedupKey": "input.id"}}]}
    )
    assert err.path == "spec.triggers[0].nats.dedupKey"
    err = error_of({"steps": [agent_step("a")], "inputSchema": {"type": "nonsense"}})
    assert err.path == "spec.inputSchema"
    compile_spec(
        {
            "steps": [agent_step("a")],
            "inputSchema": {"type": "object"},
            "triggers": [
                {"nats": {"subject": "x", "dedupKey": "event.id"}},
                {"schedule": {"cron": "0 * * * *"}},
            ],
        }
    )


def test_the_digest_follows_the_content() -> None:
    one = compile_spec({"steps": [agent_step("a")]})
    again = compile_spec({"steps": [agent_step("a")]})
    other = compile_spec({"steps": [agent_step("a", timeout="1s")]})
    assert one.key == again.key == f"default.wf.{one.digest}"
    assert other.digest != one.digest
