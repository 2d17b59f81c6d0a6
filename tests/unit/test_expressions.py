"""`${{ }}` templates and bare CEL expressions."""

from __future__ import annotations

from typing import Any

import pytest
from cadenza_operator.expressions import ExpressionError, compile_expr, compile_template

ENV: dict[str, Any] = {
    "input": {"n": 3, "name": "ada", "tags": ["a", "b"], "nested": {"ok": True}, "none": None},
    "steps": {"classify": {"phase": "Succeeded", "output": {"category": "billing", "score": 0.5}}},
    "run": {"id": "r1", "phase": "Running"},
}


def render(value: Any, env: dict[str, Any] = ENV) -> Any:
    return compile_template(value, "spec").render(env)


@pytest.mark.parametrize(
    ("template", "value"),
    [
        ("${{ input.n }}", 3),
        ("${{input.n + 1}}", 4),
        ("${{ input.tags }}", ["a", "b"]),
        ("${{ input.nested }}", {"ok": True}),
        ("${{ input.none }}", None),
        ("${{ input.n > 2 }}", True),
        ("${{ steps.classify.output.score }}", 0.5),
        ("${{ 'a' + '}}' }}", "a}}"),
    ],
)
def test_a_whole_expression_yields_the_typed_value(template: str, value: Any) -> None:
    assert render(template) == value
    assert type(render(template)) is type(value)


@pytest.mark.parametrize(
    ("template", "value"),
    [
        ("hello ${{ input.name }}", "hello ada"),
        ("${{ input.n }} items", "3 items"),
        ("${{ input.name }}-${{ input.n }}", "ada-3"),
        ("tags=${{ input.tags }}", 'tags=["a", "b"]'),
        ("ok: ${{ input.nested.ok }}", "ok: true"),
        ("none: ${{ input.none }}", "none: null"),
        ("no expressions", "no expressions"),
        ("  ${{ input.n }}  ", "  3  "),
    ],
)
def test_expressions_inside_a_longer_string_are_interpolated(template: str, value: str) -> None:
    assert render(template) == value


def test_templates_walk_lists_and_maps_and_keep_other_values() -> None:
    tree = {"a": ["${{ input.n }}", 1, None, True], "b": {"c": "x ${{ run.id }}"}, "d": 2.5}
    assert render(tree) == {"a": [3, 1, None, True], "b": {"c": "x r1"}, "d": 2.5}


def test_templates_report_the_steps_and_variables_they_read() -> None:
    t = compile_template(
        {"a": "${{ steps.classify.output }}", "b": "${{ steps['lookup'].output }}", "c": "${{ input.n }}"},
        "spec",
    )
    assert t.steps == {"classify", "lookup"}
    assert t.variables == {"steps", "input"}
    assert compile_template("plain").steps == frozenset()


def test_a_compile_error_names_the_path() -> None:
    with pytest.raises(ExpressionError, match="does not compile") as info:
        compile_template({"x": ["ok", "${{ input.n + }}"]}, "spec.steps[0].input")
    assert info.value.path == "spec.steps[0].input.x[1]"
    with pytest.raises(ExpressionError) as info2:
        compile_expr("steps.a.output ==", "spec.steps[1].when")
    assert info2.value.path == "spec.steps[1].when"


def test_an_unknown_variable_is_a_compile_error() -> None:
    with pytest.raises(ExpressionError, match="unknown variable 'inputs'") as info:
        compile_template("${{ inputs.n }}", "spec.output")
    assert info.value.path == "spec.output"
    with pytest.raises(ExpressionError, match="unknown variable 'item'"):
        compile_expr("item.x", "w", frozenset({"input", "steps"}))


def test_variables_bound_by_macros_are_not_unknown_variables() -> None:
    expr = compile_expr("input.tags.map(t, t + '!').filter(s, s != 'b!')", "spec.steps[0].forEach")
    assert expr.evaluate(ENV) == ["a!"]
    assert compile_expr("input.tags.exists(x, x == 'a') && input.tags.all(y, size(y) == 1)").evaluate(ENV)
    assert compile_expr("input.tags.exists_one(z, z == 'b')").evaluate(ENV) is True
    with pytest.raises(ExpressionError, match="unknown variable 'u'"):
        compile_expr("input.tags.map(t, u)")


def test_evaluation_errors_are_expression_errors() -> None:
    for source in ("input.missing", "1 / (input.n - 3)", "input.name + 1", "input.none.x"):
        with pytest.raises(ExpressionError, match="input"):
            compile_expr(source).evaluate(ENV)


def test_bare_expressions_evaluate_cel() -> None:
    assert compile_expr("steps.classify.output.category != 'spam'").evaluate(ENV) is True
    assert compile_expr("has(input.nested.ok) && !has(input.nested.other)").evaluate(ENV) is True
    assert compile_expr("input.tags").evaluate(ENV) == ["a", "b"]
    assert compile_expr("{'k': input.n}").evaluate(ENV) == {"k": 3}
    assert compile_expr("steps.classify.output").steps == {"classify"}
