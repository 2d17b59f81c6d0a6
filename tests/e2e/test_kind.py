"""End to end on a real cluster: kind, the operator image, the Helm chart, examples/hello.

Opt in with `pytest tests/e2e --with-e2e` on a machine with Docker, kind, kubectl and
helm (`.github/workflows/e2e.yaml` does). Without the flag these tests are skipped with
the reason printed; with it, a missing tool is a failure, not a skip.

What it proves that the emulator tests cannot: the CRDs are accepted by a real API
server (schema, CEL rules), the chart's RBAC suffices, the operator's Deployment really
runs agent pods (securityContext included) that reach NATS, a WorkflowRun created
with kubectl reaches Succeeded with its status mirrored, and a crash-looping agent's last
log line (kept by the kubelet) reaches its Agent condition and the waiting run's message.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
HELLO = ROOT / "examples" / "hello"
NAMESPACE = "cadenza-e2e"
OPERATOR_IMAGE = "cadenza-e2e/operator:e2e"
HELLO_IMAGE = "cadenza-e2e/examples-hello:e2e"
TOOLS = ("docker", "kind", "kubectl", "helm")

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]


def run(*args: str, timeout: float = 600, check: bool = True, input: str | None = None) -> str:
    """Run a command; its output goes into the failure message when it fails."""
    result = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, input=input)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
        )
    return result.stdout


class Cluster:
    def __init__(self, name: str, kubeconfig: Path) -> None:
        self.name = name
        self.kubeconfig = str(kubeconfig)

    def kubectl(self, *args: str, **kw: Any) -> str:
        return run("kubectl", "--kubeconfig", self.kubeconfig, *args, **kw)

    def helm(self, *args: str, **kw: Any) -> str:
        return run("helm", "--kubeconfig", self.kubeconfig, *args, **kw)

    def diagnostics(self) -> str:
        parts = []
        for args in (
            ("get", "agents,workflows,workflowruns,deployments,pods", "-A", "-o", "wide"),
            ("describe", "workflowruns", "-n", NAMESPACE),
            ("get", "events", "-n", NAMESPACE, "--sort-by=.lastTimestamp"),
            ("logs", "-n", "cadenza-system", "-l", "app.kubernetes.io/component=operator", "--tail=200"),
            ("logs", "-n", NAMESPACE, "-l", "app.kubernetes.io/managed-by=cadenza", "--tail=50", "--prefix"),
        ):
            parts.append(f"$ kubectl {' '.join(args)}\n{self.kubectl(*args, check=False)}")
        return "\n".join(parts)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"--with-e2e needs {', '.join(missing)} on PATH")
    name = os.environ.get("CADENZA_E2E_CLUSTER") or f"cadenza-e2e-{uuid.uuid4().hex[:6]}"
    cluster = Cluster(name, tmp_path_factory.mktemp("kind") / "kubeconfig")
    reuse = bool(os.environ.get("CADENZA_E2E_CLUSTER"))
    if not reuse:
        run("kind", "create", "cluster", "--name", name, "--kubeconfig", cluster.kubeconfig, "--wait", "180s")
    else:
        run("kind", "export", "kubeconfig", "--name", name, "--kubeconfig", cluster.kubeconfig)
    try:
        yield cluster
    finally:
        if not reuse and not os.environ.get("CADENZA_E2E_KEEP"):
            run("kind", "delete", "cluster", "--name", name, check=False)


@pytest.fixture(scope="module")
def installed(cluster: Cluster) -> Cluster:
    """Images built and loaded into kind; the chart installed (CRDs, NATS, the operator)."""
    run("docker", "build", "-t", OPERATOR_IMAGE, str(ROOT), timeout=1200)
    run("docker", "build", "-t", HELLO_IMAGE, "-f", str(HELLO / "Dockerfile"), str(ROOT), timeout=1200)
    for image in (OPERATOR_IMAGE, HELLO_IMAGE):
        run("kind", "load", "docker-image", image, "--name", cluster.name)
    repository, tag = OPERATOR_IMAGE.rsplit(":", 1)
    cluster.helm(
        "upgrade",
        "--install",
        "cadenza",
        str(ROOT / "charts" / "cadenza"),
        "--namespace",
        "cadenza-system",
        "--create-namespace",
        "--set",
        f"image.repository={repository}",
        "--set",
        f"image.tag={tag}",
        "--set",
        "image.pullPolicy=Never",
        "--wait",
        "--timeout",
        "10m",
        timeout=900,
    )
    for plural in ("agents", "workflows", "workflowruns"):
        cluster.kubectl("wait", "--for=condition=Established", f"crd/{plural}.cadenza.dev", "--timeout=120s")
    cluster.kubectl("create", "namespace", NAMESPACE, check=False)
    return cluster


def _hello_manifests() -> str:
    """examples/hello with the agents' image replaced by the one built here."""
    docs = []
    for path in sorted(HELLO.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "Agent":
                doc["spec"]["image"] = HELLO_IMAGE
            if doc:
                docs.append(doc)
    return yaml.safe_dump_all(docs)


def _wait_phase(cluster: Cluster, name: str, phase: str, timeout: int = 300) -> dict[str, Any]:
    try:
        cluster.kubectl(
            "wait",
            "-n",
            NAMESPACE,
            f"--for=jsonpath={{.status.phase}}={phase}",
            f"wfr/{name}",
            f"--timeout={timeout}s",
            timeout=timeout + 30,
        )
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{cluster.diagnostics()}") from None
    obj: dict[str, Any] = json.loads(cluster.kubectl("get", "-n", NAMESPACE, f"wfr/{name}", "-o", "json"))
    return obj


def test_hello_runs_on_kind(installed: Cluster) -> None:
    cluster = installed
    cluster.kubectl("apply", "-n", NAMESPACE, "-f", "-", input=_hello_manifests())
    cluster.kubectl(
        "wait",
        "-n",
        NAMESPACE,
        '--for=jsonpath={.status.conditions[?(@.type=="Valid")].status}=True',
        "workflow/hello",
        "--timeout=120s",
    )
    for agent in ("greeter", "analyst"):
        cluster.kubectl(
            "rollout", "status", "-n", NAMESPACE, f"deployment/{agent}-agent", "--timeout=300s", timeout=330
        )
    run_manifest = {
        "apiVersion": "cadenza.dev/v1alpha1",
        "kind": "WorkflowRun",
        "metadata": {"name": "hello-kind", "namespace": NAMESPACE},
        "spec": {"workflowRef": "hello", "input": {"name": "Kind"}},
    }
    cluster.kubectl("create", "-f", "-", input=json.dumps(run_manifest))
    wfr = _wait_phase(cluster, "hello-kind", "Succeeded")
    status = wfr["status"]
    assert status["outputs"]["greeting"] == "Hello, Kind!"
    assert status["progress"] == "3/3"
    # kubectl get shows the printer columns.
    table = cluster.kubectl("get", "wfr", "-n", NAMESPACE, "hello-kind")
    assert "Succeeded" in table and "3/3" in table
    agents = cluster.kubectl("get", "ag", "-n", NAMESPACE)
    assert "1/1" in agents


def test_the_api_server_rejects_what_the_cel_rules_forbid(installed: Cluster) -> None:
    broken = {
        "apiVersion": "cadenza.dev/v1alpha1",
        "kind": "Workflow",
        "metadata": {"name": "two-kinds", "namespace": NAMESPACE},
        "spec": {"steps": [{"name": "a", "agent": "greeter", "approval": {}}]},
    }
    result = subprocess.run(
        ["kubectl", "--kubeconfig", installed.kubeconfig, "create", "-f", "-"],
        input=json.dumps(broken),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "exactly one of agent, workflow, approval, waitFor" in result.stderr


def test_approval_by_annotation_and_cancel_by_delete(installed: Cluster) -> None:
    cluster = installed
    gated = {
        "apiVersion": "cadenza.dev/v1alpha1",
        "kind": "Workflow",
        "metadata": {"name": "gated", "namespace": NAMESPACE},
        "spec": {"steps": [{"name": "gate", "approval": {"message": "ship it?"}}]},
    }
    cluster.kubectl("apply", "-f", "-", input=json.dumps(gated))
    for name in ("gated-approve", "gated-delete"):
        cluster.kubectl(
            "create",
            "-f",
            "-",
            input=json.dumps(
                {
                    "apiVersion": "cadenza.dev/v1alpha1",
                    "kind": "WorkflowRun",
                    "metadata": {"name": name, "namespace": NAMESPACE},
                    "spec": {"workflowRef": "gated"},
                }
            ),
        )
    deadline = time.monotonic() + 120
    while "WaitingApproval" not in cluster.kubectl(
        "get", "-n", NAMESPACE, "wfr/gated-approve", "-o", "jsonpath={.status.steps.gate.phase}"
    ):
        assert time.monotonic() < deadline, cluster.diagnostics()
        time.sleep(1)
    cluster.kubectl(
        "annotate",
        "-n",
        NAMESPACE,
        "wfr/gated-approve",
        "cadenza.dev/approve=gate",
        "cadenza.dev/approved-by=e2e",
    )
    status = _wait_phase(cluster, "gated-approve", "Succeeded")["status"]
    assert status["steps"]["gate"]["approval"]["by"] == "e2e"
    cluster.kubectl(
        "delete", "-n", NAMESPACE, "wfr/gated-delete", "--wait=true", "--timeout=120s", timeout=150
    )


def _agent_condition(cluster: Cluster, agent: str) -> dict[str, Any]:
    obj = json.loads(cluster.kubectl("get", "-n", NAMESPACE, f"agent/{agent}", "-o", "json"))
    conditions = (obj.get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c.get("type") == "Degraded"), {})


def test_a_crash_looping_agent_shows_its_last_log_line_on_the_agent_and_the_run(installed: Cluster) -> None:
    """What the emulator cannot show: a real kubelet puts the tail of the failing container's
    log into its status (terminationMessagePolicy: FallbackToLogsOnError), and the operator
    carries it to the Agent's condition and the waiting WorkflowRun's message."""
    cluster = installed
    failing = "import sys; print('starting'); sys.exit('agent config missing: CRASHER_TOKEN')"
    docs = [
        {
            "apiVersion": "cadenza.dev/v1alpha1",
            "kind": "Agent",
            "metadata": {"name": "crasher", "namespace": NAMESPACE},
            "spec": {"image": HELLO_IMAGE, "command": ["python", "-c", failing]},
        },
        {
            "apiVersion": "cadenza.dev/v1alpha1",
            "kind": "Workflow",
            "metadata": {"name": "crashing", "namespace": NAMESPACE},
            "spec": {"steps": [{"name": "work", "agent": "crasher"}]},
        },
        {
            "apiVersion": "cadenza.dev/v1alpha1",
            "kind": "WorkflowRun",
            "metadata": {"name": "crashing-1", "namespace": NAMESPACE},
            "spec": {"workflowRef": "crashing"},
        },
    ]
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs))
    deadline = time.monotonic() + 300
    while _agent_condition(cluster, "crasher").get("reason") != "CrashLoopBackOff":
        assert time.monotonic() < deadline, cluster.diagnostics()
        time.sleep(2)
    message = _agent_condition(cluster, "crasher")["message"]
    assert "exit code 1" in message and "agent config missing: CRASHER_TOKEN" in message, message
    expected = (
        "step work waits for agent crasher, which is crash-looping: agent config missing: CRASHER_TOKEN"
    )
    while expected not in cluster.kubectl(
        "get", "-n", NAMESPACE, "wfr/crashing-1", "-o", "jsonpath={.status.message}"
    ):
        assert time.monotonic() < deadline, cluster.diagnostics()
        time.sleep(2)
    phase = cluster.kubectl("get", "-n", NAMESPACE, "wfr/crashing-1", "-o", "jsonpath={.status.phase}")
    assert phase == "Running"  # not failed: a fix may be rolled out

    # The fix rolled out: new pods stay up, the condition clears, the message goes.
    patch = {"spec": {"command": ["python", "-c", "import time; time.sleep(3600)"]}}
    cluster.kubectl("patch", "-n", NAMESPACE, "agent/crasher", "--type=merge", "-p", json.dumps(patch))
    cluster.kubectl(
        "rollout", "status", "-n", NAMESPACE, "deployment/crasher-agent", "--timeout=300s", timeout=330
    )
    deadline = time.monotonic() + 300
    while _agent_condition(cluster, "crasher").get("reason") == "CrashLoopBackOff" or "crash-looping" in (
        cluster.kubectl("get", "-n", NAMESPACE, "wfr/crashing-1", "-o", "jsonpath={.status.message}")
    ):
        assert time.monotonic() < deadline, cluster.diagnostics()
        time.sleep(2)
    cluster.kubectl(
        "delete", "-n", NAMESPACE, "wfr/crashing-1", "workflow/crashing", "agent/crasher", "--wait=false"
    )
