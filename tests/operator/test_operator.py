"""The real operator (kopf + engine, in-process) against the Kubernetes API emulator and a
real nats-server; agents run as local processes (the emulator has no kubelet).

The emulator does not validate objects against the CRD schemas and has no controllers:
the tests play the Deployment controller where status matters, and the operator's own
checks (the same as `cadenza validate`) are what is tested for invalid specs.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import kopf
import pytest
import yaml
from cadenza._protocol import TASKS_STREAM, consumer_name, dumps, task_subject
from cadenza_operator.kube.runs import run_id_of
from cadenza_operator.local.nats_server import NatsServer
from cadenza_operator.local.processes import AgentProcesses
from cadenza_operator.models import Agent

from ..kube.emulator import KubeEmulator
from ..kube.fixtures import wait_for
from .harness import (
    AGENTS,
    DEPLOYMENTS,
    HELLO,
    NAMESPACE,
    SERVICE_ACCOUNTS,
    SERVICES,
    WORKFLOWRUNS,
    WORKFLOWS,
    RunningOperator,
    events_for,
    get,
    manifest,
    reasons_for,
    running_operator,
    status_of,
    workflow_valid,
    writes_to,
)

T = TypeVar("T")

pytestmark = pytest.mark.timeout(120)


async def eventually(probe: Callable[[], Awaitable[T | None]], timeout: float = 60.0) -> T:
    """Poll an async probe until it returns something truthy (a bound on waiting, not a timing test)."""
    deadline = time.monotonic() + timeout
    while True:
        value = await probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout} s: {probe}")
        await asyncio.sleep(0.05)


def _phase(emulator: KubeEmulator, name: str, phase: str) -> Callable[[], dict[str, Any] | None]:
    def probe() -> dict[str, Any] | None:
        status = status_of(emulator, WORKFLOWRUNS, name)
        return status if status.get("phase") == phase else None

    probe.__name__ = f"{name} is {phase}"
    return probe


def _waiting(emulator: KubeEmulator, name: str, step: str) -> Callable[[], dict[str, Any] | None]:
    def probe() -> dict[str, Any] | None:
        status = status_of(emulator, WORKFLOWRUNS, name)
        return status if (status.get("steps") or {}).get(step, {}).get("phase") == "WaitingApproval" else None

    probe.__name__ = f"{name}: {step} waits for approval"
    return probe


def _env(deployment: dict[str, Any]) -> dict[str, str]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e["value"] for e in container["env"]}


def _hello_documents() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted(HELLO.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


@pytest.fixture
def hello_agents(fresh_nats: NatsServer, tmp_path: Path) -> Iterator[AgentProcesses]:
    """The hello example's agents as local processes (what the Deployments would run)."""
    processes = AgentProcesses(fresh_nats.url, NAMESPACE, tmp_path)
    try:
        yield processes
    finally:
        processes.stop()


async def _apply_hello(emulator: KubeEmulator, op: RunningOperator, agents: AgentProcesses) -> None:
    """kubectl apply -f examples/hello, then the agents' pods start (as local processes)."""
    for doc in _hello_documents():
        resource = AGENTS if doc["kind"] == "Agent" else WORKFLOWS
        emulator.create_object(resource, {**doc, "metadata": {**doc["metadata"], "namespace": NAMESPACE}})
    await wait_for(
        lambda: get(emulator, DEPLOYMENTS, "greeter-agent") and get(emulator, DEPLOYMENTS, "analyst-agent"),
        timeout=60,
    )
    for doc in _hello_documents():
        if doc["kind"] == "Agent" and not any(p.agent == doc["metadata"]["name"] for p in agents.procs):
            agents.start(Agent.model_validate(doc), HELLO)
    await wait_for(lambda: workflow_valid(emulator, "hello"), timeout=60)


# ------------------------------------------------------------------------- Agents


async def test_agent_becomes_a_deployment_with_owner_env_and_security(
    kube_emulator: KubeEmulator, operator: RunningOperator, fresh_nats: NatsServer
) -> None:
    spec = {
        "image": "registry.example/agents:1.0",
        "command": ["python", "agents.py", "greeter"],
        "replicas": 2,
        "concurrency": 8,
        "ackWait": "45s",
        "env": [{"name": "MODEL", "value": "small"}],
        "metrics": {"enabled": True, "port": 9100},
    }
    agent = kube_emulator.create_object(AGENTS, manifest("Agent", "scribe", spec))
    deployment = await wait_for(lambda: get(kube_emulator, DEPLOYMENTS, "scribe-agent"), timeout=60)

    (owner,) = deployment["metadata"]["ownerReferences"]
    assert owner == {
        "apiVersion": "cadenza.dev/v1alpha1",
        "kind": "Agent",
        "name": "scribe",
        "uid": agent["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }
    assert deployment["spec"]["replicas"] == 2
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "registry.example/agents:1.0"
    assert container["command"] == ["python", "agents.py", "greeter"]
    env = _env(deployment)
    assert env["CADENZA_NATS_URL"] == fresh_nats.url
    assert env["CADENZA_AGENT"] == "scribe"
    assert env["CADENZA_NAMESPACE"] == NAMESPACE
    assert env["CADENZA_CONCURRENCY"] == "8"
    assert env["CADENZA_ACK_WAIT"] == "45"
    assert env["CADENZA_LOG_FORMAT"] == "json"
    assert env["MODEL"] == "small"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert pod["serviceAccountName"] == "scribe-agent"
    account = await wait_for(lambda: get(kube_emulator, SERVICE_ACCOUNTS, "scribe-agent"))
    assert account["metadata"]["ownerReferences"][0]["uid"] == agent["metadata"]["uid"]
    service = await wait_for(lambda: get(kube_emulator, SERVICES, "scribe-agent"))
    assert service["spec"]["ports"][0]["port"] == 9100
    assert service["spec"]["selector"] == {"cadenza.dev/agent": "scribe"}

    # The JetStream durable consumer the agent's replicas share exists.
    info = await operator.call(
        lambda ctx: ctx.js.consumer_info(TASKS_STREAM, consumer_name(NAMESPACE, "scribe"))
    )
    assert info.config.ack_wait == 45

    # Play the Deployment controller: two replicas become ready.
    kube_emulator.patch_object(
        DEPLOYMENTS,
        NAMESPACE,
        "scribe-agent",
        {"status": {"replicas": 2, "readyReplicas": 2}},
        subresource="status",
    )
    status = await wait_for(
        lambda: (s := status_of(kube_emulator, AGENTS, "scribe")).get("ready") == "2/2" and s, timeout=20
    )
    assert status["replicas"] == 2 and status["readyReplicas"] == 2
    assert status["pending"] == 0 and status["inFlight"] == 0
    assert status["observedGeneration"] == 1
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Ready"]["status"] == "True"
    assert conditions["Degraded"]["status"] == "False"


async def test_agents_mount_the_nats_credentials_the_operator_is_told_of(
    kube_emulator: KubeEmulator, cadenza_crds: Any, fresh_nats: NatsServer
) -> None:
    async with running_operator(
        kube_emulator, fresh_nats.url, agent_nats_creds_secret="agents-nats", agent_nats_creds_key="a.creds"
    ):
        kube_emulator.create_object(AGENTS, manifest("Agent", "vault", {"image": "registry.example/a:1"}))
        deployment = await wait_for(lambda: get(kube_emulator, DEPLOYMENTS, "vault-agent"), timeout=60)
    pod = deployment["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == "nats-creds")
    assert volume["secret"]["secretName"] == "agents-nats"
    assert _env(deployment)["CADENZA_NATS_CREDS"] == "/etc/cadenza/nats/a.creds"


async def test_agent_spec_change_updates_the_deployment(
    kube_emulator: KubeEmulator, operator: RunningOperator
) -> None:
    spec = {
        "image": "registry.example/agents:1.0",
        "env": [{"name": "MODEL", "value": "small"}],
        "metrics": {"enabled": True},
    }
    kube_emulator.create_object(AGENTS, manifest("Agent", "editor", spec))
    first = await wait_for(lambda: get(kube_emulator, DEPLOYMENTS, "editor-agent"), timeout=60)
    await wait_for(lambda: get(kube_emulator, SERVICES, "editor-agent"))

    kube_emulator.patch_object(
        AGENTS,
        NAMESPACE,
        "editor",
        {
            "spec": {
                "image": "registry.example/agents:2.0",
                "concurrency": 2,
                "env": [],
                "metrics": {"enabled": False},
                "resources": {"limits": {"memory": "256Mi"}},
            }
        },
    )

    def updated() -> dict[str, Any] | None:
        deployment = get(kube_emulator, DEPLOYMENTS, "editor-agent")
        return deployment if deployment and _env(deployment)["CADENZA_CONCURRENCY"] == "2" else None

    deployment = await wait_for(updated, timeout=60)
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "registry.example/agents:2.0"
    assert "MODEL" not in _env(deployment)  # a removed variable goes (lists are replaced, not merged)
    assert container["resources"] == {"limits": {"memory": "256Mi"}}
    assert deployment["metadata"]["uid"] == first["metadata"]["uid"]  # patched in place, not re-created
    await wait_for(lambda: get(kube_emulator, SERVICES, "editor-agent") is None, timeout=60)
    await wait_for(
        lambda: status_of(kube_emulator, AGENTS, "editor").get("observedGeneration") == 2, timeout=20
    )


async def test_agent_autoscales_on_queue_depth_to_zero_and_back(
    kube_emulator: KubeEmulator, operator: RunningOperator
) -> None:
    spec = {
        "image": "registry.example/agents:1.0",
        "replicas": 1,
        "autoscaling": {"minReplicas": 0, "maxReplicas": 3, "targetPendingPerReplica": 2},
    }
    kube_emulator.create_object(AGENTS, manifest("Agent", "bursty", spec))
    await wait_for(lambda: get(kube_emulator, DEPLOYMENTS, "bursty-agent"), timeout=60)

    def replicas() -> int:
        return int((get(kube_emulator, DEPLOYMENTS, "bursty-agent") or {})["spec"]["replicas"])

    # Nothing queued and no replica running: scaled to zero.
    await wait_for(lambda: replicas() == 0, timeout=60)
    for n in range(5):  # 5 tasks, 2 per replica: ceil(5/2) = 3 = maxReplicas
        await operator.call(
            lambda ctx, n=n: ctx.js.publish(task_subject(NAMESPACE, "bursty"), dumps({"n": n}))
        )
    await wait_for(lambda: replicas() == 3, timeout=60)
    await wait_for(lambda: status_of(kube_emulator, AGENTS, "bursty").get("pending") == 5, timeout=60)
    await wait_for(lambda: "Scaled" in reasons_for(kube_emulator, "bursty"))
    await operator.call(
        lambda ctx: ctx.js.purge_stream(TASKS_STREAM, subject=task_subject(NAMESPACE, "bursty"))
    )
    await wait_for(lambda: replicas() == 0, timeout=60)
    status = await wait_for(
        lambda: (s := status_of(kube_emulator, AGENTS, "bursty")).get("pending") == 0 and s
    )
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "ScaledToZero"


async def test_agent_without_image_is_reported_not_crash_looped(
    kube_emulator: KubeEmulator, operator: RunningOperator
) -> None:
    kube_emulator.create_object(AGENTS, manifest("Agent", "imageless", {"command": ["python", "a.py"]}))

    def reported() -> dict[str, Any] | None:
        conditions = status_of(kube_emulator, AGENTS, "imageless").get("conditions") or []
        return next((c for c in conditions if c["reason"] == "InvalidSpec"), None)

    ready = await wait_for(reported, timeout=60)
    assert ready["type"] == "Ready" and ready["status"] == "False"
    assert ready["message"].startswith("spec.image:")
    await wait_for(lambda: "InvalidSpec" in reasons_for(kube_emulator, "imageless"))
    assert get(kube_emulator, DEPLOYMENTS, "imageless-agent") is None


# ---------------------------------------------------------------------- Workflows


async def test_invalid_workflow_gets_an_invalid_condition_and_a_warning_event(
    kube_emulator: KubeEmulator, operator: RunningOperator
) -> None:
    steps = [{"name": "a", "agent": "greeter"}, {"name": "b", "agent": "greeter", "dependsOn": ["nope"]}]
    kube_emulator.create_object(WORKFLOWS, manifest("Workflow", "broken", {"steps": steps}))

    def condition() -> dict[str, Any] | None:
        conditions = status_of(kube_emulator, WORKFLOWS, "broken").get("conditions") or []
        return next((c for c in conditions if c["type"] == "Valid"), None)

    valid = await wait_for(condition, timeout=60)
    assert valid["status"] == "False" and valid["reason"] == "Invalid"
    assert valid["message"] == "spec.steps[1].dependsOn[0]: unknown step 'nope'"
    warnings = await wait_for(
        lambda: [e for e in events_for(kube_emulator, "broken") if e["reason"] == "Invalid"]
    )
    assert warnings[0]["type"] == "Warning"
    assert warnings[0]["message"] == valid["message"]

    # Fixed: valid again, and published for the engine.
    kube_emulator.patch_object(WORKFLOWS, NAMESPACE, "broken", {"spec": {"steps": steps[:1]}})
    await wait_for(lambda: workflow_valid(kube_emulator, "broken"), timeout=60)
    status = status_of(kube_emulator, WORKFLOWS, "broken")
    assert status["steps"] == 1
    assert status["observedGeneration"] == 2
    definition = await operator.call(lambda ctx: ctx.client.latest_definition(NAMESPACE, "broken"))
    assert definition.key == status["definition"]


async def test_workflow_failing_the_model_names_the_field(
    kube_emulator: KubeEmulator, operator: RunningOperator
) -> None:
    kube_emulator.create_object(
        WORKFLOWS, manifest("Workflow", "misnamed", {"steps": [{"name": "Bad-Name", "agent": "greeter"}]})
    )

    def message() -> str:
        conditions = status_of(kube_emulator, WORKFLOWS, "misnamed").get("conditions") or []
        return next((c["message"] for c in conditions if c["type"] == "Valid" and c["status"] == "False"), "")

    assert (await wait_for(message, timeout=60)).startswith("spec.steps[0].name:")


# ------------------------------------------------------------------- WorkflowRuns


async def test_editing_a_started_workflowrun_is_refused_with_an_event(
    kube_emulator: KubeEmulator, operator: RunningOperator, hello_agents: AgentProcesses
) -> None:
    await _apply_hello(kube_emulator, operator, hello_agents)
    kube_emulator.create_object(
        WORKFLOWRUNS,
        manifest("WorkflowRun", "hello-edit", {"workflowRef": "hello", "input": {"name": "Ada"}}),
    )
    await wait_for(lambda: status_of(kube_emulator, WORKFLOWRUNS, "hello-edit").get("runId"), timeout=30)
    kube_emulator.patch_object(WORKFLOWRUNS, NAMESPACE, "hello-edit", {"spec": {"input": {"name": "Bob"}}})

    event = await wait_for(
        lambda: next(
            (e for e in events_for(kube_emulator, "hello-edit") if e["reason"] == "SpecChangeIgnored"), None
        ),
        timeout=60,
    )
    assert event["type"] == "Warning"
    assert event["message"].startswith("spec.input changed after the WorkflowRun was created")
    status = await wait_for(_phase(kube_emulator, "hello-edit", "Succeeded"), timeout=30)
    assert status["outputs"]["greeting"] == "Hello, Ada!"  # the spec it was created with


async def test_workflowrun_succeeds_with_status_mirrored_and_bounded_api_writes(
    kube_emulator: KubeEmulator,
    operator: RunningOperator,
    hello_agents: AgentProcesses,
    record_property: Callable[[str, object], None],
) -> None:
    await _apply_hello(kube_emulator, operator, hello_agents)
    interval = operator.settings.status_interval

    # -- a 3-step run
    kube_emulator.clear_request_log()
    started = time.monotonic()
    kube_emulator.create_object(
        WORKFLOWRUNS, manifest("WorkflowRun", "hello-ada", {"workflowRef": "hello", "input": {"name": "Ada"}})
    )
    status = await wait_for(_phase(kube_emulator, "hello-ada", "Succeeded"), timeout=30)
    elapsed = time.monotonic() - started
    await asyncio.sleep(interval * 1.5)  # a late write would show up now
    writes = writes_to(kube_emulator, "workflowruns")

    assert status["outputs"] == {
        "greeting": "Hello, Ada!",
        "shouted": "HELLO, ADA!",
        "summary": "2 words, 8 letters",
    }
    assert status["progress"] == "3/3"
    assert {n: s["phase"] for n, s in status["steps"].items()} == {
        "greet": "Succeeded",
        "shout": "Succeeded",
        "count": "Succeeded",
    }
    assert all(s["attempts"] == 1 for s in status["steps"].values())
    assert status["startedAt"] and status["finishedAt"] and status["duration"]
    assert status["runId"].startswith("hello-ada-")
    (succeeded,) = status["conditions"]
    assert (succeeded["type"], succeeded["status"], succeeded["reason"]) == ("Succeeded", "True", "Succeeded")
    reasons = await wait_for(
        lambda: (r := reasons_for(kube_emulator, "hello-ada")) and "RunSucceeded" in r and r
    )
    assert reasons.count("RunStarted") == 1 and reasons.count("RunSucceeded") == 1
    state = await operator.call(lambda ctx: ctx.engine.client.get(status["runId"]))
    assert state is not None and state.phase == "Succeeded"
    assert state.labels == {"cadenza.dev/workflowrun": "hello-ada"}

    # Coalesced status writes: at most one per interval while running, plus the last;
    # kopf's own bookkeeping adds a fixed few (finalizer, handled configuration).
    status_writes = sum(
        1
        for c in kube_emulator.request_log
        if c.resource == "workflowruns" and c.subresource == "status" and c.verb == "patch"
    )
    assert status_writes <= 2 + math.ceil(elapsed / interval)
    assert writes - status_writes <= 3
    record_property("api_writes_3_step_run", writes)

    # -- a 1,000-item forEach run: same write budget (the bound does not grow with items)
    fanout = {
        "steps": [
            {
                "name": "count",
                "agent": "analyst",
                "forEach": "input.texts",
                "input": {"text": "${{ item }}", "op": "count"},
            }
        ],
        "output": {"items": "${{ size(input.texts) }}"},
    }
    kube_emulator.create_object(WORKFLOWS, manifest("Workflow", "fanout", fanout))
    await wait_for(lambda: workflow_valid(kube_emulator, "fanout"), timeout=60)
    kube_emulator.clear_request_log()
    started = time.monotonic()
    texts = [f"item number {i}" for i in range(1000)]
    kube_emulator.create_object(
        WORKFLOWRUNS,
        manifest("WorkflowRun", "fanout-1k", {"workflowRef": "fanout", "input": {"texts": texts}}),
    )
    status = await wait_for(_phase(kube_emulator, "fanout-1k", "Succeeded"), timeout=90)
    elapsed = time.monotonic() - started
    await asyncio.sleep(interval * 1.5)
    writes_1k = writes_to(kube_emulator, "workflowruns")
    status_writes_1k = sum(
        1
        for c in kube_emulator.request_log
        if c.resource == "workflowruns" and c.subresource == "status" and c.verb == "patch"
    )
    assert status["steps"]["count"]["items"] == {"total": 1000, "Succeeded": 1000}
    assert status["outputs"] == {"items": 1000}
    assert status_writes_1k <= 2 + math.ceil(elapsed / interval)
    assert writes_1k - status_writes_1k <= 3
    assert writes_1k < 1000 / 20  # nowhere near one write per item
    # kopf's copy of the spec (for diffs) leaves the 17 KiB input out of the annotations.
    annotations = get(kube_emulator, WORKFLOWRUNS, "fanout-1k")["metadata"].get("annotations") or {}
    assert len(json.dumps(annotations)) < 2048
    record_property("api_writes_1000_item_run", writes_1k)
    print(
        f"\nAPI writes per run: 3-step {writes} ({status_writes} status); "
        f"1,000-item forEach {writes_1k} ({status_writes_1k} status, run took {elapsed:.1f} s)"
    )


async def test_run_input_rejected_by_the_schema_fails_the_workflowrun(
    kube_emulator: KubeEmulator, operator: RunningOperator, hello_agents: AgentProcesses
) -> None:
    await _apply_hello(kube_emulator, operator, hello_agents)
    kube_emulator.create_object(
        WORKFLOWRUNS, manifest("WorkflowRun", "hello-empty", {"workflowRef": "hello", "input": {"name": ""}})
    )
    status = await wait_for(_phase(kube_emulator, "hello-empty", "Failed"), timeout=60)
    assert status["message"].startswith("spec.input.name:")
    await wait_for(lambda: "InvalidInput" in reasons_for(kube_emulator, "hello-empty"))


async def test_workflowrun_spec_its_model_rejects_fails_naming_the_field(
    kube_emulator: KubeEmulator, operator: RunningOperator
) -> None:
    # The API server's schema would refuse this; the emulator stores it, so the
    # operator's own check (the one `cadenza validate` makes) is what answers.
    kube_emulator.create_object(
        WORKFLOWRUNS, manifest("WorkflowRun", "typo", {"workflowRef": "hello", "inptu": {"name": "Ada"}})
    )
    status = await wait_for(_phase(kube_emulator, "typo", "Failed"), timeout=60)
    assert status["message"] == "spec.inptu: unknown field"
    (failed,) = status["conditions"]
    assert (failed["type"], failed["status"], failed["reason"]) == ("Succeeded", "False", "InvalidSpec")
    await wait_for(lambda: "InvalidSpec" in reasons_for(kube_emulator, "typo"))


async def test_workflowrun_waits_for_its_workflow(
    kube_emulator: KubeEmulator, operator: RunningOperator
) -> None:
    kube_emulator.create_object(WORKFLOWRUNS, manifest("WorkflowRun", "early", {"workflowRef": "later"}))
    await wait_for(
        lambda: (
            "waiting for Workflow later" in status_of(kube_emulator, WORKFLOWRUNS, "early").get("message", "")
        ),
        timeout=60,
    )
    await wait_for(lambda: "WorkflowNotFound" in reasons_for(kube_emulator, "early"))
    # An approval that times out into "approve" needs no agent: the run just succeeds.
    spec = {"steps": [{"name": "gate", "approval": {"timeout": "10ms", "onTimeout": "approve"}}]}
    kube_emulator.create_object(WORKFLOWS, manifest("Workflow", "later", spec))
    await wait_for(_phase(kube_emulator, "early", "Succeeded"), timeout=30)


GATED = {
    "steps": [
        {"name": "greet", "agent": "greeter", "input": {"name": "gate keeper"}},
        {"name": "gate", "dependsOn": ["greet"], "approval": {"message": "ship it?"}},
    ],
    "output": {"greeting": "${{ steps.greet.output.greeting }}"},
}


async def _gated(kube_emulator: KubeEmulator, op: RunningOperator, agents: AgentProcesses, run: str) -> str:
    await _apply_hello(kube_emulator, op, agents)
    if get(kube_emulator, WORKFLOWS, "gated") is None:
        kube_emulator.create_object(WORKFLOWS, manifest("Workflow", "gated", GATED))
    await wait_for(lambda: workflow_valid(kube_emulator, "gated"), timeout=60)
    kube_emulator.create_object(WORKFLOWRUNS, manifest("WorkflowRun", run, {"workflowRef": "gated"}))
    status = await wait_for(_waiting(kube_emulator, run, "gate"), timeout=30)
    assert status["phase"] == "Running"
    assert any(c["type"] == "WaitingApproval" for c in status["conditions"])
    assert "cadenza.dev/approve=gate" in status["message"]
    await wait_for(lambda: "ApprovalWaiting" in reasons_for(kube_emulator, run))
    return str(status["runId"])


async def test_approval_by_annotation(
    kube_emulator: KubeEmulator, operator: RunningOperator, hello_agents: AgentProcesses
) -> None:
    await _gated(kube_emulator, operator, hello_agents, "gated-approve")
    kube_emulator.patch_object(
        WORKFLOWRUNS,
        NAMESPACE,
        "gated-approve",
        {
            "metadata": {
                "annotations": {
                    "cadenza.dev/approve": "gate",
                    "cadenza.dev/approved-by": "alice",
                    "cadenza.dev/comment": "lgtm",
                }
            }
        },
    )
    status = await wait_for(_phase(kube_emulator, "gated-approve", "Succeeded"), timeout=30)
    assert status["steps"]["gate"]["approval"] == {"decision": "approved", "by": "alice", "comment": "lgtm"}
    assert status["outputs"] == {"greeting": "Hello, gate keeper!"}
    await wait_for(lambda: "ApprovalSent" in reasons_for(kube_emulator, "gated-approve"))


async def test_rejection_by_annotation_fails_the_run(
    kube_emulator: KubeEmulator, operator: RunningOperator, hello_agents: AgentProcesses
) -> None:
    await _gated(kube_emulator, operator, hello_agents, "gated-reject")
    kube_emulator.patch_object(
        WORKFLOWRUNS, NAMESPACE, "gated-reject", {"metadata": {"annotations": {"cadenza.dev/reject": "gate"}}}
    )
    status = await wait_for(_phase(kube_emulator, "gated-reject", "Failed"), timeout=30)
    assert status["steps"]["gate"]["phase"] == "Failed"
    await wait_for(lambda: {"RunFailed", "StepFailed"} <= set(reasons_for(kube_emulator, "gated-reject")))


async def test_deleting_a_running_workflowrun_cancels_the_run(
    kube_emulator: KubeEmulator, operator: RunningOperator, hello_agents: AgentProcesses
) -> None:
    run_id = await _gated(kube_emulator, operator, hello_agents, "gated-delete")
    assert (
        "cadenza.dev/finalizer" in get(kube_emulator, WORKFLOWRUNS, "gated-delete")["metadata"]["finalizers"]
    )
    kube_emulator.delete_object(WORKFLOWRUNS, NAMESPACE, "gated-delete")
    await wait_for(lambda: get(kube_emulator, WORKFLOWRUNS, "gated-delete") is None, timeout=60)

    async def cancelled() -> Any:
        state = await operator.call(lambda ctx: ctx.engine.client.get(run_id))
        return state if state is not None and state.phase == "Cancelled" else None

    state = await eventually(cancelled)
    assert state.cancelledBy == "kubectl delete"
    assert state.steps["gate"].phase in ("Cancelled", "Skipped")


async def test_operator_restarted_mid_run_completes_the_run_once(
    kube_emulator: KubeEmulator, operator: RunningOperator, hello_agents: AgentProcesses
) -> None:
    run_id = await _gated(kube_emulator, operator, hello_agents, "gated-restart")
    await operator.stop()
    # Approved while no operator runs: the new one sees the annotation it has not handled.
    kube_emulator.patch_object(
        WORKFLOWRUNS,
        NAMESPACE,
        "gated-restart",
        {"metadata": {"annotations": {"cadenza.dev/approve": "gate"}}},
    )
    await operator.start()
    status = await wait_for(_phase(kube_emulator, "gated-restart", "Succeeded"), timeout=30)
    assert status["runId"] == run_id
    assert reasons_for(kube_emulator, "gated-restart").count("RunStarted") == 1

    # One engine run for this WorkflowRun: the restart did not start another.
    async def runs_for(ctx: Any) -> list[str]:
        found = []
        for key in await ctx.engine.kv.keys():
            entry = await ctx.engine.kv.get(key)
            if b'"cadenza.dev/workflowrun":"gated-restart"' in (entry.value or b""):
                found.append(key)
        return found

    assert await operator.call(runs_for) == [run_id]


async def test_triggered_runs_are_mirrored_and_garbage_collected(
    kube_emulator: KubeEmulator, operator: RunningOperator, hello_agents: AgentProcesses
) -> None:
    await _apply_hello(kube_emulator, operator, hello_agents)
    spec = {
        "steps": [{"name": "greet", "agent": "greeter", "input": {"name": "${{ input.name }}"}}],
        "triggers": [{"nats": {"subject": "test.operator.greet"}}],
        "runHistoryLimit": 1,
    }
    kube_emulator.create_object(WORKFLOWS, manifest("Workflow", "greet-on", spec))
    await wait_for(lambda: workflow_valid(kube_emulator, "greet-on"), timeout=60)

    def creates() -> int:
        return sum(
            1 for c in kube_emulator.request_log if c.resource == "workflowruns" and c.verb == "create"
        )

    assert creates() == 0
    for name in ("ann", "bob", "cyd"):
        await operator.call(
            lambda ctx, name=name: ctx.nc.publish("test.operator.greet", dumps({"name": name}))
        )

    def mirrored() -> list[dict[str, Any]]:
        return [
            r
            for r in kube_emulator.list_objects(WORKFLOWRUNS, NAMESPACE)
            if (r["metadata"].get("labels") or {}).get("cadenza.dev/workflow") == "greet-on"
        ]

    await wait_for(lambda: creates() == 3, timeout=30)
    # All three succeed; the two oldest go (runHistoryLimit 1), the newest stays.
    await wait_for(
        lambda: len(mirrored()) == 1 and mirrored()[0].get("status", {}).get("phase") == "Succeeded",
        timeout=40,
    )
    (kept,) = mirrored()
    assert kept["metadata"]["labels"]["cadenza.dev/trigger"] == "nats"
    assert kept["metadata"]["annotations"]["cadenza.dev/run-id"] == kept["status"]["runId"]

    def counted() -> dict[str, Any] | None:
        status = status_of(kube_emulator, WORKFLOWS, "greet-on")
        return status if status.get("runs") == {"Succeeded": 1} else None

    status = await wait_for(counted, timeout=60)
    assert status["lastRun"] == kept["metadata"]["name"]
    assert status["activeRuns"] == 0
    assert status["lastRunPhase"] == "Succeeded"
    assert status["runs"] == {"Succeeded": 1}


async def test_deleting_a_workflowrun_right_after_it_started_cancels_the_run(
    kube_emulator: KubeEmulator, operator: RunningOperator
) -> None:
    """Deleted before the engine wrote its first record: the cancel follows the start."""
    kube_emulator.create_object(
        WORKFLOWS, manifest("Workflow", "waits", {"steps": [{"name": "gate", "approval": {}}]})
    )
    await wait_for(lambda: workflow_valid(kube_emulator, "waits"), timeout=60)
    kube_emulator.create_object(
        WORKFLOWRUNS, manifest("WorkflowRun", "short-lived", {"workflowRef": "waits"})
    )

    def handled() -> dict[str, Any] | None:
        obj = get(kube_emulator, WORKFLOWRUNS, "short-lived") or {}
        annotations = obj.get("metadata", {}).get("annotations") or {}
        return obj if "operator.cadenza.dev/last-handled-configuration" in annotations else None

    obj = await wait_for(handled, timeout=60)
    kube_emulator.delete_object(WORKFLOWRUNS, NAMESPACE, "short-lived")
    await wait_for(lambda: get(kube_emulator, WORKFLOWRUNS, "short-lived") is None, timeout=60)

    run_id = run_id_of(kopf.Body(obj))

    async def cancelled() -> Any:
        state = await operator.call(lambda ctx: ctx.engine.client.get(run_id))
        return state if state is not None and state.phase == "Cancelled" else None

    await eventually(cancelled)
