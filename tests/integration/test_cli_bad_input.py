"""Bad input given to the CLI: exit code 2 and one message naming the file, the object and
the field, never a traceback. Each case made `cadenza validate` or `cadenza run` crash."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ..conftest import EXAMPLES, ROOT, cadenza

AGENT = """\
apiVersion: cadenza.dev/v1alpha1
kind: Agent
metadata: {name: worker}
spec: {command: [python, agents.py]}
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def assert_invalid(result: subprocess.CompletedProcess[str], *expected: str) -> None:
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output[-3000:]
    assert result.returncode == 2, output[-3000:]
    for text in expected:
        assert text in result.stderr, result.stderr[-3000:]


@pytest.mark.parametrize("kind", ["[Agent]", "{a: 1}"])
def test_a_kind_that_is_not_a_string(tmp_path: Path, kind: str) -> None:
    path = write(tmp_path, "agent.yaml", AGENT.replace("kind: Agent", f"kind: {kind}"))
    assert_invalid(cadenza("validate", str(path)), "agent.yaml: document 1: kind: unknown kind")


def test_a_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_bytes(AGENT.replace("python", "py\xff").encode("latin-1"))
    assert_invalid(
        cadenza("validate", str(path)), "agent.yaml: line 4, column 20: not UTF-8 text (byte 0xff)"
    )


def test_yaml_nested_20000_deep(tmp_path: Path) -> None:
    path = write(tmp_path, "deep.yaml", "a: " + "[" * 20_000 + "]" * 20_000 + "\n")
    assert_invalid(cadenza("validate", str(path)), "deep.yaml: line 1, column 131: nested deeper")


def test_a_yaml_alias_bomb_in_a_step_input(tmp_path: Path) -> None:
    levels = ["l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    levels += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 10)]
    path = tmp_path / "bomb.yaml"
    path.write_text(
        "apiVersion: cadenza.dev/v1alpha1\nkind: Workflow\nmetadata: {name: w}\nspec:\n  steps:\n"
        "    - name: a\n      agent: worker\n      input:\n" + "".join(f"        {line}\n" for line in levels)
    )
    # Under a 1 GiB address-space limit: without the bound this grew to 5.6 GB.
    result = subprocess.run(
        [sys.executable, "-m", "cadenza_operator.cli", "validate", str(path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, "CADENZA_LOG_FORMAT": "json"},
        stdin=subprocess.DEVNULL,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30)),
    )
    assert_invalid(result, "bomb.yaml: line ", "expands to more than")


def test_text_that_looks_like_markup_is_printed_as_it_is(tmp_path: Path) -> None:
    # Messages are printed with rich: `[/x]` was taken for a closing tag (MarkupError) and
    # `[a-z]` in a pattern was swallowed as a style.
    path = write(
        tmp_path,
        "wf.yaml",
        """\
        apiVersion: cadenza.dev/v1alpha1
        kind: Workflow
        metadata: {name: w}
        spec:
          steps:
            - {name: a, agent: "[/x]"}
        """,
    )
    assert_invalid(
        cadenza("validate", str(path)), "wf.yaml: Workflow/w: spec.steps[0].agent: unknown agent '[/x]'"
    )
    bad_name = write(tmp_path, "bad.yaml", AGENT.replace("name: worker", "name: Worker"))
    assert_invalid(
        cadenza("validate", str(bad_name)),
        "bad.yaml: Agent/Worker: metadata.name: ",
        "String should match pattern '^[a-z0-9]([-a-z0-9]*[a-z0-9])?$'",
    )


@pytest.mark.parametrize("name", ["in", "true", "null"])
def test_a_step_named_with_a_cel_reserved_word(tmp_path: Path, name: str) -> None:
    path = write(
        tmp_path,
        "wf.yaml",
        f"""\
        apiVersion: cadenza.dev/v1alpha1
        kind: Workflow
        metadata: {{name: w}}
        spec:
          steps:
            - {{name: "{name}", agent: worker}}
        """,
    )
    assert_invalid(
        cadenza("validate", str(path)), "wf.yaml: Workflow/w: spec.steps[0].name:", "reserved word"
    )


def test_a_trigger_subject_under_cadenzas_own_namespace(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "wf.yaml",
        """\
        apiVersion: cadenza.dev/v1alpha1
        kind: Workflow
        metadata: {name: w}
        spec:
          steps:
            - {name: a, agent: worker}
          triggers:
            - nats: {subject: "cadenza.event.>"}
        """,
    )
    assert_invalid(
        cadenza("validate", str(path)), "wf.yaml: Workflow/w: spec.triggers[0].nats.subject:", "cadenza.>"
    )


def test_seven_nested_maps_in_a_when(tmp_path: Path) -> None:
    when = "input.items"
    for i in range(7):
        when = f"input.items.map(x{i}, {when})"
    path = write(
        tmp_path,
        "wf.yaml",
        f"""\
        apiVersion: cadenza.dev/v1alpha1
        kind: Workflow
        metadata: {{name: w}}
        spec:
          steps:
            - {{name: a, agent: worker, when: "{when}.size() > 0"}}
        """,
    )
    assert_invalid(cadenza("validate", str(path)), "wf.yaml: Workflow/w: spec.steps[0].when:", "too costly")


def test_a_huge_backoff_factor(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "wf.yaml",
        """\
        apiVersion: cadenza.dev/v1alpha1
        kind: Workflow
        metadata: {name: w}
        spec:
          steps:
            - {name: a, agent: worker, retry: {limit: 5, backoff: {initial: 1ms, factor: 1e308}}}
        """,
    )
    assert_invalid(cadenza("validate", str(path)), "wf.yaml: Workflow/w: spec.steps[0].retry.backoff.factor:")


@pytest.mark.parametrize(
    ("depth", "problem"), [(100_000, "nested too deeply to parse"), (150, "nested deeper")]
)
def test_a_run_input_file_nested_too_deeply(tmp_path: Path, depth: int, problem: str) -> None:
    (tmp_path / "deep.json").write_text("[" * depth + "]" * depth)
    result = cadenza("run", str(EXAMPLES / "hello"), "--input", f"@{tmp_path / 'deep.json'}")
    assert_invalid(result, "Workflow/hello:", "deep.json: input:", problem)


def test_an_inline_run_input_nested_too_deeply() -> None:
    depth = 60_000  # as deep as one argument may be long (128 KiB)
    result = cadenza("run", str(EXAMPLES / "hello"), "--input", "[" * depth + "]" * depth)
    assert_invalid(result, "Workflow/hello: --input: nested too deeply to parse")


def test_a_run_input_file_that_is_not_utf8(tmp_path: Path) -> None:
    (tmp_path / "input.json").write_bytes(b'{"name": "\xff"}')
    result = cadenza("run", str(EXAMPLES / "hello"), "--input", f"@{tmp_path / 'input.json'}")
    assert_invalid(result, "Workflow/hello:", "input.json: input: cannot read it as UTF-8 text")
