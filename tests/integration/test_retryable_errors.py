"""Plain exceptions are retryable: a handler raising what an HTTP client raises
(ConnectionResetError) is retried under the step's retry policy; FatalError and the types
the step lists in `retry.nonRetryable` (or a base of them) are not. Real nats-server, real
agent processes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cadenza_operator.local.nats_server import NatsServer

from .harness import agent_manifest, run_project, write_project

AGENTS = """
from cadenza import Agent, FatalError, RetryableError

worker = Agent("worker")

@worker.handler
async def handle(task):
    mode = task.input["mode"]
    if mode == "reset" or (mode == "reset-twice" and task.attempt < 3):
        raise ConnectionResetError(104, f"Connection reset by peer (attempt {task.attempt})")
    if mode == "fatal":
        raise FatalError("the ticket is not valid")
    if mode == "rate-limited" and task.attempt < 3:
        raise RetryableError("rate limited")
    if mode == "own-timeout":   # an HTTP client's read timeout, not the attempt's timeout
        raise TimeoutError("read timed out")
    if mode == "key":
        return {}["missing"]
    return {"attempt": task.attempt}

if __name__ == "__main__":
    worker.run()
"""

BACKOFF = "backoff: {initial: 50ms, factor: 1, jitter: 0}"

# name: (mode, retry policy or None)
STEPS: dict[str, tuple[str, str | None]] = {
    "reset_exhausted": ("reset", f"{{limit: 2, {BACKOFF}}}"),
    "reset_recovers": ("reset-twice", f"{{limit: 2, {BACKOFF}}}"),
    "reset_listed": ("reset", f"{{limit: 2, nonRetryable: [ValueError, ConnectionResetError], {BACKOFF}}}"),
    "base_listed": ("reset", f"{{limit: 2, nonRetryable: [OSError], {BACKOFF}}}"),
    "fatal": ("fatal", f"{{limit: 2, {BACKOFF}}}"),
    "retryable_error": ("rate-limited", f"{{limit: 2, nonRetryable: [OSError], {BACKOFF}}}"),
    "no_policy": ("key", None),
    "own_timeout_listed": ("own-timeout", f"{{limit: 2, nonRetryable: [TimeoutError], {BACKOFF}}}"),
}


def workflow(steps: dict[str, tuple[str, str | None]], on_failure: str) -> str:
    lines = ["---", "apiVersion: cadenza.dev/v1alpha1", "kind: Workflow", "metadata: {name: wf}", "spec:"]
    lines.append("  steps:")
    for name, (mode, retry) in steps.items():
        lines += [f"    - name: {name}", "      agent: worker", f"      input: {{mode: {mode}}}"]
        # An attempt timeout in force: a TimeoutError the handler raises must not pass for it.
        lines += [f"      onFailure: {on_failure}", "      timeout: 30s"]
        if retry is not None:
            lines.append(f"      retry: {retry}")
    return "\n".join(lines) + "\n"


def project(tmp_path: Path, steps: dict[str, tuple[str, str | None]], on_failure: str) -> Path:
    return write_project(tmp_path / "proj", AGENTS, agent_manifest("worker") + workflow(steps, on_failure))


def outcomes(step: dict[str, Any]) -> list[str]:
    return [a["outcome"] for a in step["history"]]


async def test_a_connection_reset_is_retried_to_the_limit_then_fails_the_run(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    steps = {"call": ("reset", f"{{limit: 2, {BACKOFF}}}")}
    summary, code = await run_project(project(tmp_path, steps, "fail"), nats_server.url)
    assert code == 1, summary
    assert summary["phase"] == "Failed"
    call = summary["steps"]["call"]
    assert (call["phase"], call["attempts"]) == ("Failed", 3)
    assert outcomes(call) == ["Failed"] * 3
    error = call["error"]
    assert error["type"] == "ConnectionResetError"
    assert error["types"] == ["ConnectionResetError", "ConnectionError", "OSError", "Exception"]
    assert error["message"] == "[Errno 104] Connection reset by peer (attempt 3)"
    assert error["retriesExhausted"] is True
    assert "ConnectionResetError" in error["traceback"] and len(error["traceback"]) <= 4000


async def test_each_kind_of_failure_is_retried_or_not_as_the_step_says(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    # One run, independent steps (onFailure: continue): one agent process for every case.
    summary, code = await run_project(project(tmp_path, STEPS, "continue"), nats_server.url)
    steps = summary["steps"]
    phases = {name: (s["phase"], s["attempts"]) for name, s in steps.items()}
    assert phases == {
        "reset_exhausted": ("Failed", 3),
        "reset_recovers": ("Succeeded", 3),
        "reset_listed": ("Failed", 1),
        "base_listed": ("Failed", 1),  # nonRetryable: [OSError] covers ConnectionResetError
        "fatal": ("Failed", 1),
        "retryable_error": ("Succeeded", 3),  # still retried: it is no OSError
        "no_policy": ("Failed", 1),  # retryable, but no retry policy: limit 0
        "own_timeout_listed": ("Failed", 1),
    }, summary
    assert (summary["phase"], code) == ("Succeeded", 0)  # every failed step said continue
    assert steps["reset_recovers"]["history"][0]["error"]["type"] == "ConnectionResetError"
    assert steps["reset_listed"]["error"]["nonRetryable"] == "ConnectionResetError"
    assert steps["base_listed"]["error"]["nonRetryable"] == "OSError"
    assert "retriesExhausted" not in steps["base_listed"]["error"]
    assert steps["fatal"]["error"]["type"] == "FatalError"
    assert steps["no_policy"]["error"]["type"] == "KeyError"
    assert steps["no_policy"]["error"]["retryable"] is True  # the agent's verdict; the policy said no retry
    # A TimeoutError the handler raised is its own exception, not the attempt's timeout.
    own = steps["own_timeout_listed"]["error"]
    assert (own["type"], own["nonRetryable"], own.get("timeout")) == ("TimeoutError", "TimeoutError", None)
