"""A crash-looping agent in a cluster: the real operator against the API emulator and a
real nats-server. The test plays the kubelet (the emulator has none): it creates the
Deployment's pod and sets the container statuses a crashing agent gets, with the last log
lines `FallbackToLogsOnError` leaves (the kind suite checks that a real kubelet does).
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cadenza_operator.local.nats_server import NatsServer

from ..kube.emulator import KubeEmulator
from ..kube.fixtures import wait_for
from .harness import (
    AGENTS,
    DEPLOYMENTS,
    NAMESPACE,
    WORKFLOWRUNS,
    WORKFLOWS,
    get,
    manifest,
    reasons_for,
    running_operator,
    status_of,
    writes_to,
)

pytestmark = pytest.mark.timeout(120)

PODS = "v1/pods"
LAST_LINE = "ModuleNotFoundError: No module named 'agents'"
LOGS = f'Traceback (most recent call last):\n  File "/app/main.py", line 1, in <module>\n{LAST_LINE}\n'


def _ago(seconds: float) -> str:
    return (datetime.now(UTC) - timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")


def _crash_looping(restarts: int) -> dict[str, Any]:
    return {
        "phase": "Running",
        "containerStatuses": [
            {
                "name": "agent",
                "ready": False,
                "restartCount": restarts,
                "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 1m20s"}},
                "lastState": {
                    "terminated": {"exitCode": 2, "reason": "Error", "message": LOGS, "finishedAt": _ago(3)}
                },
            }
        ],
    }


def _condition(emulator: KubeEmulator, agent: str, type_: str) -> dict[str, Any]:
    conditions = status_of(emulator, AGENTS, agent).get("conditions") or []
    return next((c for c in conditions if c.get("type") == type_), {})


def _run_message(emulator: KubeEmulator, name: str) -> str:
    return str(status_of(emulator, WORKFLOWRUNS, name).get("message") or "")


async def test_a_crash_looping_agent_is_a_condition_and_a_message_on_the_runs_waiting_for_it(
    kube_emulator: KubeEmulator, cadenza_crds: Any, fresh_nats: NatsServer
) -> None:
    async with running_operator(kube_emulator, fresh_nats.url) as op:
        kube_emulator.create_object(AGENTS, manifest("Agent", "flaky", {"image": "registry.example/a:1"}))
        deployment = await wait_for(lambda: get(kube_emulator, DEPLOYMENTS, "flaky-agent"), timeout=60)
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        await wait_for(lambda: _condition(kube_emulator, "flaky", "Degraded"), timeout=60)

        # A run whose step waits for the agent (no agent process: its task stays queued),
        # and a run on another agent, which must not be told about this one.
        steps = {"steps": [{"name": "classify", "agent": "flaky", "input": {"x": 1}}]}
        kube_emulator.create_object(WORKFLOWS, manifest("Workflow", "triage", steps))
        kube_emulator.create_object(AGENTS, manifest("Agent", "steady", {"image": "registry.example/a:1"}))
        other = {"steps": [{"name": "work", "agent": "steady"}]}
        kube_emulator.create_object(WORKFLOWS, manifest("Workflow", "other", other))
        kube_emulator.create_object(WORKFLOWRUNS, manifest("WorkflowRun", "t1", {"workflowRef": "triage"}))
        kube_emulator.create_object(WORKFLOWRUNS, manifest("WorkflowRun", "o1", {"workflowRef": "other"}))
        for run in ("t1", "o1"):
            await wait_for(
                lambda run=run: status_of(kube_emulator, WORKFLOWRUNS, run).get("phase") == "Running"
            )

        # The kubelet: the agent's pod, its container exiting with code 2 again and again.
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "flaky-agent-7d9f-abcde", "namespace": NAMESPACE, "labels": labels},
            "spec": deployment["spec"]["template"]["spec"],
        }
        kube_emulator.create_object(PODS, pod)
        kube_emulator.patch_object(
            PODS, NAMESPACE, pod["metadata"]["name"], {"status": _crash_looping(5)}, subresource="status"
        )

        degraded = await wait_for(
            lambda: (
                (c := _condition(kube_emulator, "flaky", "Degraded")).get("reason") == "CrashLoopBackOff"
                and c
            ),
            timeout=60,
        )
        assert degraded["status"] == "True"
        assert "exit code 2 (Error)" in degraded["message"] and "5 restarts" in degraded["message"]
        assert degraded["message"].endswith(LAST_LINE)
        assert "flaky-agent-7d9f-abcde" in degraded["message"]
        await wait_for(lambda: "CrashLoopBackOff" in reasons_for(kube_emulator, "flaky"), timeout=60)

        expected = f"step classify waits for agent flaky, which is crash-looping: {LAST_LINE}"
        await wait_for(lambda: _run_message(kube_emulator, "t1") == expected, timeout=60)
        status = status_of(kube_emulator, WORKFLOWRUNS, "t1")
        assert status["phase"] == "Running"  # not failed: Kubernetes keeps restarting it
        assert "crash-looping" not in _run_message(kube_emulator, "o1")
        assert _condition(kube_emulator, "steady", "Degraded").get("reason") != "CrashLoopBackOff"

        # Unchanged pods: nothing more is written, and the Event is not posted again.
        kube_emulator.clear_request_log()
        await asyncio.sleep(op.settings.agent_interval * 5)
        assert writes_to(kube_emulator, "agents") == 0
        assert writes_to(kube_emulator, "workflowruns") == 0
        assert reasons_for(kube_emulator, "flaky").count("CrashLoopBackOff") == 1

        # A fix is rolled out: the container stays up. The condition clears, the message goes.
        fixed = {
            "containerStatuses": [
                {
                    "name": "agent",
                    "ready": True,
                    "restartCount": 6,
                    "state": {"running": {"startedAt": _ago(600)}},
                }
            ]
        }
        kube_emulator.patch_object(
            PODS, NAMESPACE, pod["metadata"]["name"], {"status": fixed}, subresource="status"
        )
        await wait_for(
            lambda: _condition(kube_emulator, "flaky", "Degraded").get("reason") != "CrashLoopBackOff",
            timeout=60,
        )
        await wait_for(lambda: "crash-looping" not in _run_message(kube_emulator, "t1"), timeout=60)
        assert status_of(kube_emulator, WORKFLOWRUNS, "t1")["phase"] == "Running"
