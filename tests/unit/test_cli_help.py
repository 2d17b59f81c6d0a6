"""`cadenza --help` says how a step's attempts behave: what a user reads before the README."""

from __future__ import annotations

from cadenza_operator.cli import build_parser


def test_help_describes_timeouts_retryable_errors_shared_context_and_timing() -> None:
    text = " ".join(build_parser().format_help().split())
    for phrase in (
        "timeout start-to-close: counts from the moment an agent starts the attempt",
        "queueTimeout schedule-to-start",
        "retryable QueueTimeout",
        "every exception a handler raises is retried up to limit",
        "FatalError is not",
        "retry.nonRetryable",
        "update(key, fn, default)",
        "compare-and- swap",
        "update_sync",
        "waiting (scheduling: ready -> queued, queued: queued -> started)",
    ):
        assert phrase in text, phrase


NATS = ["--nats", "nats://127.0.0.1:4222"]


def test_every_command_about_runs_takes_n_for_the_namespace() -> None:
    """`-n NS` as kubectl, argo and `cadenza list` take it, on every command naming a run."""
    parser = build_parser()
    for command in (
        ["approve", "r1", "gate"],
        ["signal", "r1", "go"],
        ["cancel", "r1"],
        ["resume", "r1"],
        ["audit", "r1"],
        ["logs", "r1"],
        ["get", "r1"],
        ["retry", "r1"],
        ["list"],
        ["diagnose", "wf"],
    ):
        argv = [*command, *NATS]
        assert parser.parse_args([*argv, "-n", "team-a"]).namespace == "team-a", argv
        assert parser.parse_args([*argv, "--namespace", "team-b"]).namespace == "team-b", argv
        assert parser.parse_args(argv).namespace == "default", argv


def test_every_command_with_an_output_format_takes_o() -> None:
    parser = build_parser()
    for command in (
        ["audit", "r1"],
        ["diagnose", "wf"],
        ["logs", "r1"],
        ["list"],
        ["get", "r1"],
        ["dead-letters"],
    ):
        assert parser.parse_args([*command, *NATS, "-o", "json"]).output == "json", command
    assert parser.parse_args(["run", ".", "-o", "json"]).output == "json"
