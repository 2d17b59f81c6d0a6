"""A crash-looping agent in a cluster, the pure parts: what its pods' statuses say, the
Agent condition, the WorkflowRun message, and the container policy that keeps its last
log lines. The operator wiring is in `test_crash_loops.py`."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from cadenza_operator.engine.state import RunState, StepState
from cadenza_operator.kube import builders
from cadenza_operator.kube.pods import SETTLE_SECONDS, crash_loop, log_tail
from cadenza_operator.kube.status import agent_status, agent_waits_message, run_status
from cadenza_operator.models import Agent

NOW = 1_700_000_000.0
TRACEBACK = (
    "starting agent classifier\n"
    "Traceback (most recent call last):\n"
    '  File "/app/agents.py", line 3, in <module>\n'
    "    import missing_dependency\n"
    "ModuleNotFoundError: No module named 'missing_dependency'\n"
)


def _at(seconds_ago: float) -> str:
    return datetime.fromtimestamp(NOW - seconds_ago, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _pod(name: str, *statuses: dict[str, Any], deleting: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "labels": {builders.AGENT_LABEL: "classifier"}}
    if deleting:
        meta["deletionTimestamp"] = _at(1)
    return {"metadata": meta, "status": {"containerStatuses": list(statuses)}}


def _exited(code: int, message: str = TRACEBACK, reason: str = "Error") -> dict[str, Any]:
    return {"exitCode": code, "reason": reason, "message": message, "finishedAt": _at(5)}


def backing_off(restarts: int, code: int = 1, message: str = TRACEBACK) -> dict[str, Any]:
    """What the kubelet reports between two restarts of a crashing container."""
    return {
        "name": "agent",
        "ready": False,
        "restartCount": restarts,
        "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s restarting"}},
        "lastState": {"terminated": _exited(code, message)},
    }


def running(restarts: int, up_for: float, last_exit: int | None = 1) -> dict[str, Any]:
    status: dict[str, Any] = {
        "name": "agent",
        "ready": True,
        "restartCount": restarts,
        "state": {"running": {"startedAt": _at(up_for)}},
    }
    if last_exit is not None:
        status["lastState"] = {"terminated": _exited(last_exit)}
    return status


def test_a_container_in_crash_loop_back_off_is_read_with_its_exit_and_last_log_lines() -> None:
    found = crash_loop([_pod("classifier-agent-1", backing_off(4))], NOW)
    assert found is not None
    assert (found.pod, found.container, found.restarts, found.exit_code, found.reason) == (
        "classifier-agent-1",
        "agent",
        4,
        1,
        "Error",
    )
    assert found.last_line == "ModuleNotFoundError: No module named 'missing_dependency'"
    message = found.message()
    assert "exit code 1 (Error)" in message and "4 restarts" in message and "classifier-agent-1" in message
    assert message.endswith("ModuleNotFoundError: No module named 'missing_dependency'")


def test_healthy_completed_and_deleted_pods_are_not_crash_loops() -> None:
    assert crash_loop([], NOW) is None
    assert crash_loop([_pod("fresh", running(0, up_for=5, last_exit=None))], NOW) is None
    # Restarted once long ago after a crash, up since: recovered, not looping.
    assert crash_loop([_pod("recovered", running(3, up_for=SETTLE_SECONDS + 1))], NOW) is None
    # Restarted after a clean exit (exit 0): the kubelet says CrashLoopBackOff if it loops.
    assert crash_loop([_pod("clean", running(1, up_for=2, last_exit=0))], NOW) is None
    # An old pod of a rollout, going away while the fixed one starts.
    assert crash_loop([_pod("old", backing_off(9), deleting=True)], NOW) is None
    # Pods without statuses yet (Pending, not scheduled).
    assert crash_loop([{"metadata": {"name": "p"}, "status": {}}, {"metadata": {"name": "q"}}], NOW) is None


def test_between_two_crashes_a_restarted_container_still_counts_as_crash_looping() -> None:
    # Up for a few seconds after a crash (ready: agents have no readiness probe): without
    # this the condition would flip at every restart, each flip a write and an Event.
    found = crash_loop([_pod("p", running(2, up_for=3))], NOW)
    assert found is not None and found.exit_code == 1 and found.last_line.startswith("ModuleNotFoundError")
    # The moment it exited, before the kubelet restarts it.
    exited = {"name": "agent", "restartCount": 2, "state": {"terminated": _exited(137, "", "OOMKilled")}}
    found = crash_loop([_pod("p", exited)], NOW)
    assert found is not None and found.exit_code == 137 and found.reason == "OOMKilled"
    assert "left no log lines" in found.message()
    # The first exit, not yet restarted: not a loop yet.
    first = {"name": "agent", "restartCount": 0, "state": {"terminated": _exited(1)}}
    assert crash_loop([_pod("p", first)], NOW) is None


def test_the_pod_with_most_restarts_is_named_and_the_others_counted() -> None:
    pods = [
        _pod("a", backing_off(2, message="first\nconnection refused\n")),
        _pod("b", backing_off(7)),
        _pod("c", running(0, up_for=100, last_exit=None)),
    ]
    found = crash_loop(pods, NOW)
    assert found is not None and found.pod == "b" and found.pods == 2
    assert "(and 1 more pods)" in found.message()


def test_long_logs_keep_their_newest_lines_within_the_condition_bound() -> None:
    logs = "".join(f"log line {i}: {'x' * 60}\n" for i in range(80)) + "RuntimeError: the end\n"
    found = crash_loop([_pod("p", backing_off(3, message=logs))], NOW)
    assert found is not None
    message = found.message()
    assert len(message) <= 512
    assert message.endswith("RuntimeError: the end") and "log line 79" in message
    assert "log line 0:" not in message
    # One line longer than the bound: its end is kept.
    assert log_tail("y" * 1000 + "Error: boom", 50).endswith("Error: boom")
    assert len(log_tail("y" * 1000 + "Error: boom", 50)) <= 50


def test_a_crash_loop_makes_the_agent_degraded_with_its_message() -> None:
    found = crash_loop([_pod("p", backing_off(4))], NOW)
    assert found is not None
    status = agent_status(
        generation=1,
        replicas=1,
        ready_replicas=0,
        pending=2,
        in_flight=0,
        crash_loop=found.message(),
        now=NOW,
    )
    conditions = {c["type"]: c for c in status["conditions"]}
    degraded = conditions["Degraded"]
    assert (degraded["status"], degraded["reason"]) == ("True", "CrashLoopBackOff")
    assert "exit code 1" in degraded["message"] and "missing_dependency" in degraded["message"]
    assert conditions["Ready"]["status"] == "False"
    # The next observation, unchanged: an identical status (no write).
    again = agent_status(
        generation=1,
        replicas=1,
        ready_replicas=0,
        pending=2,
        in_flight=0,
        crash_loop=found.message(),
        previous=status["conditions"],
        now=NOW + 30,
    )
    assert again == status


def _run(**phases: str) -> RunState:
    steps = {name: StepState(phase=phase) for name, phase in phases.items()}  # type: ignore[arg-type]
    return RunState(
        run="r1",
        workflow="triage",
        definition="d",
        phase="Running",
        createdAt=NOW,
        startedAt=NOW,
        steps=steps,
    )


def test_a_run_says_which_steps_wait_for_a_crash_looping_agent() -> None:
    state = _run(
        classify="Running", lookup="Running", notify="Pending", gate="WaitingApproval", done="Succeeded"
    )
    agents = {
        "classify": "classifier",
        "lookup": "crm",
        "notify": "classifier",
        "gate": None,
        "done": "classifier",
    }
    crashing = {"classifier": "ModuleNotFoundError: No module named 'missing_dependency'"}
    message = agent_waits_message(state, agents, crashing)
    assert message == (
        "step classify waits for agent classifier, which is crash-looping: "
        "ModuleNotFoundError: No module named 'missing_dependency'"
    )
    assert run_status(state, blocked=message)["message"] == (
        "waiting for approval of gate (kubectl annotate wfr NAME cadenza.dev/approve=gate); " + message
    )
    assert run_status(state, blocked=message)["phase"] == "Running"  # not failed: a fix may come
    assert agent_waits_message(state, agents, {}) == ""
    assert agent_waits_message(state, agents, {"classifier": ""}).endswith("which is crash-looping")
    two = _run(a="Running", b="Running")
    assert agent_waits_message(two, {"a": "x", "b": "x"}, {"x": "boom"}) == (
        "steps a, b wait for agent x, which is crash-looping: boom"
    )


def test_a_finished_run_or_its_own_message_comes_first() -> None:
    failed = _run(classify="Failed")
    failed.phase, failed.message = "Failed", "step classify failed: boom"
    assert (
        run_status(failed, blocked="step classify waits for agent c")["message"]
        == "step classify failed: boom"
    )
    succeeded = _run(classify="Succeeded")
    succeeded.phase = "Succeeded"
    assert run_status(succeeded, blocked="step x waits for agent c")["message"] == ""


def test_the_agent_container_keeps_its_last_log_lines_when_it_fails() -> None:
    agent = Agent.model_validate(
        {"metadata": {"name": "classifier", "namespace": "team-a"}, "spec": {"image": "registry.example/a:1"}}
    )
    deployment = builders.build_deployment(agent, nats_url="nats://nats:4222", replicas=1)
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
