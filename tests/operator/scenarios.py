"""A representative operator scenario, and the Kubernetes API requests it makes.

`collect_operator_requests()` runs the real operator against a fresh API emulator and a
fresh nats-server through everything it does in a cluster, and returns the set of
`(verb, group, resource, subresource)` it used: what the Helm chart's RBAC must grant.
The chart's tests call it; `test_rbac_usage.py` pins the set.

No agent process is needed: the workflows use approval steps (decided by annotation, or
by an approval timeout) so that runs start, wait, succeed, get cancelled and get
garbage-collected with nothing but the operator and NATS.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from pathlib import Path

from cadenza._protocol import dumps
from cadenza_operator.local.nats_server import NatsServer
from cadenza_operator.security.nats_auth import AuthKeys

from ..kube.emulator import KubeEmulator
from ..kube.fixtures import CRDS_DIR, wait_for
from .harness import (
    AGENTS,
    DEPLOYMENTS,
    NAMESPACE,
    SERVICES,
    WORKFLOWRUNS,
    WORKFLOWS,
    RunningOperator,
    get,
    manifest,
    operator_settings,
    status_of,
    used_permissions,
)

Permission = tuple[str, str, str, str | None]

APPROVAL_ONLY = {"steps": [{"name": "gate", "approval": {"message": "go?"}}]}
AUTO_APPROVED = {
    "steps": [{"name": "gate", "approval": {"timeout": "10ms", "onTimeout": "approve"}}],
    "triggers": [{"nats": {"subject": "scenario.auto"}}],
    "runHistoryLimit": 0,
}


def _phase(emulator: KubeEmulator, name: str) -> str:
    return str(status_of(emulator, WORKFLOWRUNS, name).get("phase", ""))


def _waiting(emulator: KubeEmulator, name: str) -> bool:
    steps = status_of(emulator, WORKFLOWRUNS, name).get("steps") or {}
    return steps.get("gate", {}).get("phase") == "WaitingApproval"


async def representative_scenario(emulator: KubeEmulator, op: RunningOperator) -> None:
    """Everything the operator does, once: agents, workflows, runs, approvals, deletion,
    triggered runs and their garbage collection, Events."""
    # An Agent: ServiceAccount, Deployment, metrics Service; then a spec change.
    emulator.create_object(
        AGENTS, manifest("Agent", "worker", {"image": "registry.example/a:1", "metrics": {"enabled": True}})
    )
    await wait_for(lambda: get(emulator, SERVICES, "worker-agent"), timeout=60)
    emulator.patch_object(
        DEPLOYMENTS, NAMESPACE, "worker-agent", {"status": {"readyReplicas": 1}}, subresource="status"
    )
    emulator.patch_object(
        AGENTS,
        NAMESPACE,
        "worker",
        {"spec": {"metrics": {"enabled": False}, "autoscaling": {"minReplicas": 0, "maxReplicas": 2}}},
    )
    await wait_for(lambda: get(emulator, SERVICES, "worker-agent") is None, timeout=60)
    await wait_for(
        lambda: (get(emulator, DEPLOYMENTS, "worker-agent") or {})["spec"]["replicas"] == 0, timeout=20
    )
    # An Agent calling a Model: the Model's spec is read into the Deployment.
    emulator.create_object(
        "cadenza.dev/v1alpha1/models",
        manifest("Model", "fast", {"baseURL": "http://llm.example/v1", "model": "tiny"}),
    )
    emulator.create_object(
        AGENTS, manifest("Agent", "caller", {"image": "registry.example/a:1", "models": ["fast"]})
    )
    await wait_for(lambda: get(emulator, DEPLOYMENTS, "caller-agent"), timeout=60)

    # Workflows: one invalid (condition + Warning Event), two valid.
    emulator.create_object(
        WORKFLOWS,
        manifest("Workflow", "broken", {"steps": [{"name": "a", "agent": "worker", "dependsOn": ["nope"]}]}),
    )
    emulator.create_object(WORKFLOWS, manifest("Workflow", "gated", APPROVAL_ONLY))
    emulator.create_object(WORKFLOWS, manifest("Workflow", "auto", AUTO_APPROVED))
    for name in ("broken", "gated", "auto"):
        await wait_for(lambda name=name: status_of(emulator, WORKFLOWS, name).get("conditions"), timeout=60)

    # A run approved by annotation; a run deleted while it waits (cancelled).
    emulator.create_object(WORKFLOWRUNS, manifest("WorkflowRun", "approved", {"workflowRef": "gated"}))
    emulator.create_object(WORKFLOWRUNS, manifest("WorkflowRun", "deleted", {"workflowRef": "gated"}))
    await wait_for(lambda: _waiting(emulator, "approved") and _waiting(emulator, "deleted"), timeout=30)
    emulator.patch_object(
        WORKFLOWRUNS,
        NAMESPACE,
        "approved",
        {"metadata": {"annotations": {"cadenza.dev/approve": "gate", "cadenza.dev/approved-by": "scenario"}}},
    )
    emulator.delete_object(WORKFLOWRUNS, NAMESPACE, "deleted")
    await wait_for(lambda: _phase(emulator, "approved") == "Succeeded", timeout=30)
    await wait_for(lambda: get(emulator, WORKFLOWRUNS, "deleted") is None, timeout=30)

    # A run created before its Workflow: it waits (reading the Workflow), then runs.
    emulator.create_object(WORKFLOWRUNS, manifest("WorkflowRun", "early", {"workflowRef": "later"}))
    await wait_for(
        lambda: "waiting for Workflow" in str(status_of(emulator, WORKFLOWRUNS, "early").get("message")),
        timeout=60,
    )
    emulator.create_object(WORKFLOWS, manifest("Workflow", "later", {**AUTO_APPROVED, "triggers": []}))
    await wait_for(lambda: _phase(emulator, "early") == "Succeeded", timeout=30)

    # A triggered run: mirrored as a WorkflowRun, finished, then garbage-collected.
    before = len(emulator.request_log)
    await op.call(lambda ctx: ctx.nc.publish("scenario.auto", dumps({})))

    def collected() -> bool:
        calls = emulator.request_log[before:]
        return any(c.verb == "create" and c.resource == "workflowruns" for c in calls) and any(
            c.verb == "delete" and c.resource == "workflowruns" for c in calls
        )

    await wait_for(collected, timeout=30)


async def collect_operator_requests_async(workdir: Path | None = None) -> set[Permission]:
    """Run the scenario on a fresh emulator and nats-server; return the requests' set."""
    emulator = KubeEmulator()
    emulator.resources.load_bundled()
    with NatsServer(store_dir=str(workdir / "jetstream") if workdir else None) as server:
        async with emulator.serving():
            if not emulator.load_crds(CRDS_DIR):
                raise RuntimeError(f"no CRDs in {CRDS_DIR}: run `cadenza crds`")
            # With the account seed, as the chart runs it: each Agent's credential Secret
            op = RunningOperator(
                emulator,
                operator_settings(
                    server.url, nats_account_seed_file=account_seed_file(Path(server.store_dir))
                ),
            )
            await op.start()
            try:
                await representative_scenario(emulator, op)
            finally:
                await op.stop()
            if emulator.errors:
                raise RuntimeError(f"the emulator failed on requests: {emulator.errors}")
            return used_permissions(emulator)


def account_seed_file(folder: Path) -> str:
    """A CADENZA account seed in a file, as the chart mounts it for the operator."""
    path = folder / "account.nk"
    path.write_text(AuthKeys.generate().account_seed)
    return str(path)


def collect_operator_requests(workdir: Path | None = None) -> set[Permission]:
    """Synchronous form, callable from any test (it runs in a thread of its own)."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, collect_operator_requests_async(workdir)).result(timeout=300)


__all__ = [
    "account_seed_file",
    "collect_operator_requests",
    "collect_operator_requests_async",
    "representative_scenario",
]
