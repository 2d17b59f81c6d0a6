"""The Kubernetes API requests the operator makes, pinned: a change here is a change the
Helm chart's RBAC must follow (the chart's tests call `collect_operator_requests()`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cadenza_operator.local.nats_server import NatsServer

from ..kube.emulator import KubeEmulator
from .harness import running_operator, used_permissions
from .scenarios import account_seed_file, representative_scenario

EXPECTED: set[tuple[str, str, str, str | None]] = {
    # kopf: resource discovery and the watched resources
    ("list", "apiextensions.k8s.io", "customresourcedefinitions", None),
    ("watch", "apiextensions.k8s.io", "customresourcedefinitions", None),
    ("list", "cadenza.dev", "agents", None),
    ("watch", "cadenza.dev", "agents", None),
    ("list", "cadenza.dev", "workflows", None),
    ("watch", "cadenza.dev", "workflows", None),
    ("list", "cadenza.dev", "workflowruns", None),
    ("watch", "cadenza.dev", "workflowruns", None),
    # kopf: finalizers and handled-state annotations; status after handlers
    ("patch", "cadenza.dev", "agents", None),
    ("patch", "cadenza.dev", "workflows", None),
    ("patch", "cadenza.dev", "workflowruns", None),
    ("patch", "cadenza.dev", "agents", "status"),
    ("patch", "cadenza.dev", "workflows", "status"),
    ("patch", "cadenza.dev", "workflowruns", "status"),
    # a WorkflowRun whose Workflow is not published yet: is it missing, or invalid?
    ("get", "cadenza.dev", "workflows", None),
    # an Agent's Models, rendered into its Deployment; kopf watches Models (a change
    # re-reconciles the Agents naming them) and reports on them in their status
    ("get", "cadenza.dev", "models", None),
    ("list", "cadenza.dev", "models", None),
    ("watch", "cadenza.dev", "models", None),
    ("patch", "cadenza.dev", "models", None),
    ("patch", "cadenza.dev", "models", "status"),
    # Events (kopf posts core/v1 Events)
    ("create", "", "events", None),
    # what an Agent becomes
    ("get", "apps", "deployments", None),
    ("create", "apps", "deployments", None),
    ("patch", "apps", "deployments", None),
    ("get", "", "serviceaccounts", None),
    ("create", "", "serviceaccounts", None),
    ("get", "", "services", None),
    ("create", "", "services", None),
    ("delete", "", "services", None),
    # an Agent's pods: is its container crash-looping, and what did it log last?
    ("list", "", "pods", None),
    # each Agent's own NATS credential (the chart's authenticated NATS): written, never read
    ("create", "", "secrets", None),
    ("patch", "", "secrets", None),
    # runs started by triggers are mirrored as WorkflowRuns; finished ones beyond the
    # Workflow's runHistoryLimit are deleted
    ("create", "cadenza.dev", "workflowruns", None),
    ("delete", "cadenza.dev", "workflowruns", None),
}


async def test_operator_api_use_is_the_pinned_set(
    kube_emulator: KubeEmulator, cadenza_crds: Any, fresh_nats: NatsServer, tmp_path: Path
) -> None:
    seed = account_seed_file(tmp_path)
    async with running_operator(kube_emulator, fresh_nats.url, nats_account_seed_file=seed) as op:
        await representative_scenario(kube_emulator, op)
    used = used_permissions(kube_emulator)
    assert used == EXPECTED, f"new: {sorted(used - EXPECTED)}; no longer used: {sorted(EXPECTED - used)}"


def test_collect_operator_requests_runs_on_its_own(tmp_path: Any) -> None:
    """The entry point the chart's RBAC test uses: no fixtures, no event loop needed."""
    from .scenarios import collect_operator_requests

    assert collect_operator_requests(tmp_path) == EXPECTED
