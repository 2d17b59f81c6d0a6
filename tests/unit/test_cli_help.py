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


def test_every_command_about_runs_takes_n_for_the_namespace() -> None:
    """`-n NS` as kubectl, argo and `cadenza list` take it, on every command naming a run."""
    parser = build_parser()
    for argv in (
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
        argv += ["--nats", "nats://127.0.0.1:4222"]
        assert parser.parse_args([*argv, "-n", "team-a"]).namespace == "team-a", argv
        assert parser.parse_args([*argv, "--namespace", "team-b"]).namespace == "team-b", argv
        assert parser.parse_args(argv).namespace == "default", argv
