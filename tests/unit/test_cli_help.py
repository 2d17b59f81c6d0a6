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
