"""Bounds on what users hand Cadenza: backoff arithmetic, the cost of CEL expressions,
nesting and alias expansion of manifests, reserved step names and trigger subjects.

Each case was found wedging a run, blocking an engine or crashing `cadenza validate`.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from cadenza_operator.engine.definition import DefinitionError
from cadenza_operator.expressions import ExpressionError, compile_expr
from cadenza_operator.manifests import InvalidManifests, load
from cadenza_operator.models import NatsTrigger, WorkflowRunSpec
from pydantic import ValidationError

from .helpers import Driver, agent_step, compile_spec

# ------------------------------------------------------------------------------ backoff


def test_a_huge_backoff_factor_is_capped_at_max_for_every_attempt() -> None:
    # Validation now refuses such a factor; a definition stored before it did must still
    # run: 1e308 ** 2 raised OverflowError in decide at attempt 3 and wedged the run.
    wf = compile_spec(
        {"steps": [agent_step("a", retry={"limit": 8, "backoff": {"initial": "1ms", "max": "30s"}})]}
    )
    wf.steps["a"] = dataclasses.replace(wf.steps["a"], backoff_factor=1e308)
    d = Driver(wf)
    d.start()
    delays = []
    for attempt in range(1, 9):
        assert d.task("a").attempt == attempt
        failed_at = d.now
        d.fail("a", retryable=True)
        timer = d.state.timers[f"retry:a:{attempt + 1}"]
        delays.append(timer.at - failed_at)
        d.fire_next_timer()
    assert 0 < delays[0] <= 0.001
    assert all(0 < delay <= 30 for delay in delays)
    assert delays[-1] >= 30 * (1 - 0.2)  # capped at max, less at most the jitter
    d.fail("a", retryable=True)
    assert d.step("a").phase == "Failed" and d.step("a").attempt == 9
    assert d.phase == "Failed"


def test_a_backoff_factor_above_ten_is_rejected_at_validation() -> None:
    with pytest.raises(ValidationError) as caught:
        compile_spec({"steps": [agent_step("a", retry={"limit": 3, "backoff": {"factor": 1e308}})]})
    (error,) = caught.value.errors()
    assert error["loc"] == ("steps", 0, "retry", "backoff", "factor")


@pytest.mark.parametrize("duration", ["99999999999999999999d", "1" * 400 + "s", "3651d"])
def test_durations_are_bounded(duration: str) -> None:
    with pytest.raises(ValidationError) as caught:
        compile_spec({"steps": [agent_step("a", timeout=duration)]})
    (error,) = caught.value.errors()
    assert error["loc"] == ("steps", 0, "timeout")


# -------------------------------------------------------------------------- CEL cost

TEN = "[" + ", ".join(str(i) for i in range(10)) + "]"


def nested_maps(over: str, depth: int) -> str:
    inner = "x0"
    for i in range(depth):
        inner = f"{over}.map(x{i}, {inner})"
    return inner


@pytest.mark.parametrize("over", ["input.items", TEN])
def test_seven_nested_maps_are_rejected_at_validation(over: str) -> None:
    when = f"{nested_maps(over, 7)}.size() > 0"
    with pytest.raises(DefinitionError) as caught:
        compile_spec({"steps": [agent_step("a", when=when)]})
    assert caught.value.path == "spec.steps[0].when"
    assert "too costly" in caught.value.message
    assert repr(when) in caught.value.message


def test_a_costly_expression_in_an_input_template_is_rejected_at_validation() -> None:
    expr = nested_maps("input.items", 3)
    with pytest.raises(DefinitionError) as caught:
        compile_spec({"steps": [agent_step("a", input={"x": "${{ " + expr + " }}"})]})
    assert caught.value.path == "spec.steps[0].input.x"
    assert "too costly" in caught.value.message


def test_two_nested_comprehensions_and_chains_pass_validation_and_evaluate() -> None:
    env = {"input": {"a": [1, 2, 3], "b": [3, 4]}}
    assert compile_expr("input.a.exists(x, input.b.exists(y, x == y))").evaluate(env) is True
    assert compile_expr("input.a.map(x, x * 2).filter(y, y > 2).map(z, z + 1)").evaluate(env) == [5, 7]
    assert compile_expr("[1, 2].map(x, x > 1, x * 10)").evaluate(env) == [20]
    assert compile_expr("'a.map(x, y)' + string(input.a.size())").evaluate(env) == "a.map(x, y)3"


def test_an_overlong_expression_is_rejected_at_validation() -> None:
    when = " + ".join(["1"] * 2500) + " > 0"  # the Rust evaluator recurses per operator
    with pytest.raises(DefinitionError) as caught:
        compile_spec({"steps": [agent_step("a", when=when)]})
    assert caught.value.path == "spec.steps[0].when"
    assert "characters long" in caught.value.message


COSTLY_WHEN = "input.items.all(x, input.items.exists(y, y == x))"  # 100 x 100 estimated: passes


def test_a_costly_expression_that_passed_validation_is_stopped_and_fails_its_step() -> None:
    wf = compile_spec({"steps": [agent_step("a", when=COSTLY_WHEN), agent_step("b")]})
    d = Driver(wf, input={"items": list(range(2000))})  # ~2,000,000 steps: over the budget
    d.start()
    a = d.step("a")
    assert a.phase == "Failed"
    assert a.error is not None and a.error["type"] == "ExpressionError"
    assert COSTLY_WHEN in a.message and "100,000 comprehension steps" in a.message
    assert not d.open_tasks("a")
    assert d.phase in ("Failed", "Running")  # b may still be running; the run will fail
    d.run_agents()
    assert d.phase == "Failed"


def test_the_budget_stops_an_evaluation_even_where_or_ignores_an_error() -> None:
    # `||` absorbs an error of one side; a stopped comprehension must still fail the step.
    expr = compile_expr(f"({COSTLY_WHEN}) || true")
    with pytest.raises(ExpressionError, match="comprehension steps"):
        expr.evaluate({"input": {"items": list(range(2000))}})
    assert expr.evaluate({"input": {"items": list(range(50))}}) is True


# ------------------------------------------------------------------ names and subjects


@pytest.mark.parametrize("name", ["in", "true", "null", "false", "let", "namespace", "while"])
def test_cel_reserved_words_are_not_step_names(name: str) -> None:
    with pytest.raises(ValidationError) as caught:
        compile_spec({"steps": [agent_step(name)]})
    (error,) = caught.value.errors()
    assert error["loc"] == ("steps", 0, "name")
    assert "reserved word" in error["msg"]


def test_cel_reserved_words_are_not_on_exit_names() -> None:
    with pytest.raises(ValidationError) as caught:
        compile_spec({"steps": [agent_step("a")], "onExit": {"name": "if", "agent": "worker"}})
    assert caught.value.errors()[0]["loc"] == ("onExit", "name")


@pytest.mark.parametrize(
    "subject", ["cadenza.>", "cadenza.event.>", "cadenza.task.default.worker", ">", "*.event.>", "$JS.API.>"]
)
def test_trigger_subjects_under_cadenzas_own_namespace_are_rejected(subject: str) -> None:
    with pytest.raises(ValidationError):
        NatsTrigger(subject=subject)


@pytest.mark.parametrize("subject", ["orders.>", "orders.*.created", "tickets"])
def test_other_trigger_subjects_are_accepted(subject: str) -> None:
    assert NatsTrigger(subject=subject).subject == subject


# ------------------------------------------------------------------ nesting and aliases


def deep_list(depth: int) -> Any:
    value: Any = []
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("depth", [101, 100_000])
def test_a_run_input_nested_too_deeply_is_rejected_naming_the_field(depth: int) -> None:
    with pytest.raises(ValidationError) as caught:
        WorkflowRunSpec.model_validate({"workflowRef": "w", "input": deep_list(depth)})
    (error,) = caught.value.errors()
    assert error["loc"] == ("input",)
    assert "nested deeper than 100 levels" in error["msg"]
    WorkflowRunSpec.model_validate({"workflowRef": "w", "input": deep_list(99)})


@pytest.mark.parametrize("depth", [101, 100_000])
def test_an_engine_start_rejects_an_input_nested_too_deeply(depth: int) -> None:
    """What a trigger or an API client hands to start_run, not only what the CLI parses."""
    from cadenza_operator.engine.inputs import InputError, validate_input

    wf = compile_spec({"steps": [agent_step("a")]})
    with pytest.raises(InputError, match="nested deeper than 100 levels"):
        validate_input(wf, {"payload": deep_list(depth)})
    validate_input(wf, {"payload": deep_list(90)})


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def test_yaml_nested_20000_deep_is_rejected_naming_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path / "deep.yaml", "a: " + "[" * 20_000 + "]" * 20_000 + "\n")
    with pytest.raises(InvalidManifests) as caught:
        load([path])
    (error,) = caught.value.errors
    assert (error.obj, error.path) == ("", "line 1, column 131")
    assert error.file.endswith("deep.yaml")
    assert "nested deeper than 128 levels" in error.message


def test_a_value_nested_past_the_value_limit_is_named_by_its_field(tmp_path: Path) -> None:
    path = write(
        tmp_path / "wf.yaml",
        f"""
        apiVersion: cadenza.dev/v1alpha1
        kind: Workflow
        metadata: {{name: w}}
        spec:
          steps:
            - {{name: a, agent: x, input: {"[" * 110 + "]" * 110}}}
        """,
    )
    with pytest.raises(InvalidManifests) as caught:
        load([path])
    (error,) = caught.value.errors
    assert (error.obj, error.path) == ("Workflow/w", "spec.steps[0].input")


def alias_bomb(levels: int = 9) -> str:
    lines = ["l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, levels + 1):
        lines.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]")
    return textwrap.indent("\n".join(lines), " " * 8)


BOMB = (
    textwrap.dedent(
        """\
        apiVersion: cadenza.dev/v1alpha1
        kind: Workflow
        metadata: {name: w}
        spec:
          steps:
            - name: a
              agent: x
              input:
        """
    )
    + alias_bomb()
    + "\n"
)

LOAD_UNDER_A_MEMORY_LIMIT = """
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))  # a blow-up fails, not the machine
from cadenza_operator.manifests import InvalidManifests, load
try:
    load([sys.argv[1]])
    error = None
except InvalidManifests as exc:
    error = str(exc)
# This process's own peak: ru_maxrss would also carry over the peak of the process that
# started it (pytest, after a test of 64 MiB values), as Linux keeps it across exec.
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(json.dumps({"error": error, "maxrss_kb": peak}))
"""


def test_a_yaml_alias_bomb_in_a_step_input_is_rejected_with_bounded_memory(tmp_path: Path) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)
    result = subprocess.run(
        [sys.executable, "-c", LOAD_UNDER_A_MEMORY_LIMIT, str(path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report["error"] is not None and "bomb.yaml: line " in report["error"]
    assert "expands to more than" in report["error"]
    assert report["maxrss_kb"] < 300 * 1024


def test_aliases_that_stay_small_still_load(tmp_path: Path) -> None:
    path = write(
        tmp_path / "wf.yaml",
        """
        apiVersion: cadenza.dev/v1alpha1
        kind: Workflow
        metadata: {name: w}
        spec:
          steps:
            - {name: a, agent: x, retry: &std {limit: 2, backoff: {initial: 1s}}}
            - {name: b, agent: x, retry: *std, input: {tags: &tags [p, q], again: *tags}}
        ---
        apiVersion: cadenza.dev/v1alpha1
        kind: Agent
        metadata: {name: x}
        spec: {}
        """,
    )
    bundle = load([path])
    assert bundle.compiled["w"].steps["b"].retry_limit == 2


def test_a_recursive_alias_is_rejected(tmp_path: Path) -> None:
    path = write(tmp_path / "loop.yaml", "a: &a [1, *a]\n")
    with pytest.raises(InvalidManifests) as caught:
        load([path])
    assert "alias refers to a node that contains it" in str(caught.value)


# ------------------------------------------------------------------ the widest forEach


def test_the_widest_forEach_window_keeps_the_record_writable() -> None:
    """maxParallel 10,000 used to pass validation and make the start's record 3.6 MB,
    which NATS (1 MiB per message) never stores: the run could never start. The widest
    window allowed keeps the record, with its 1,000 task commands, well under the limit."""
    from cadenza_operator.engine.decide import decide, outbox
    from cadenza_operator.engine.state import RunState
    from cadenza_operator.models import MAX_PARALLEL, WorkflowSpec

    with pytest.raises(ValidationError, match="less than or equal to 1000"):
        WorkflowSpec.model_validate(
            {"steps": [agent_step("f", forEach="input.xs", maxParallel=10_000, input={"x": "${{ item }}"})]}
        )
    for window in ({"maxParallel": MAX_PARALLEL}, {}):  # the widest, and the default
        wf = compile_spec(
            {"steps": [agent_step("f", forEach="input.xs", input={"x": "${{ item }}"}, **window)]}
        )
        state = RunState(
            run="r" * 60, workflow="wf", definition=wf.key, createdAt=1.0, input={"xs": list(range(10_000))}
        )
        decision = decide(state, {"type": "start", "run": state.run, "at": 1.0}, wf)
        record = decision.state
        record.outbox = outbox(decision)
        assert len(decision.commands) == MAX_PARALLEL
        assert len(record.to_bytes()) < 768 * 1024
