"""`cadenza diagnose`'s arguments: a bad window is exit 2 naming --since, before any
connection is tried (the NATS URL here reaches nothing)."""

from __future__ import annotations

import pytest
from cadenza_operator.cli import EXIT_INVALID, build_parser, main

NOWHERE = "nats://127.0.0.1:1"


@pytest.mark.parametrize("since", ["soon", "0s", "-1h", "99999d"])
def test_a_bad_since_is_exit_2_naming_it(since: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["diagnose", "wf", "--nats", NOWHERE, f"--since={since}"]) == EXIT_INVALID
    err = capsys.readouterr().err
    assert "--since" in err and "Traceback" not in err


def test_namespace_window_and_output_as_the_other_run_commands() -> None:
    args = build_parser().parse_args(
        ["diagnose", "wf", "-n", "team-a", "--since", "30m", "--nats", NOWHERE, "--output", "json"]
    )
    assert (args.workflow, args.namespace, args.since, args.output) == ("wf", "team-a", "30m", "json")
    defaults = build_parser().parse_args(["diagnose", "wf", "--nats", NOWHERE])
    got = (defaults.namespace, defaults.since, defaults.output, defaults.creds)
    assert got == ("default", "1h", "text", None)
