"""RUN given to the CLI as a WorkflowRun's name: looked up with the kubeconfig (the
Kubernetes API emulator here) and turned into the run id the WorkflowRun's status holds,
for every command that takes RUN; without a kubeconfig, a clear exit 2."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from cadenza_operator.engine.definition import compile_workflow
from cadenza_operator.local.nats_server import NatsServer
from cadenza_operator.models import WorkflowSpec

from ..conftest import cadenza
from ..integration.harness import poll, running_engine, unique_namespace
from ..kube.emulator import KubeEmulator
from .harness import WORKFLOWRUNS, manifest


async def test_a_workflowrun_name_stands_for_its_run(
    kube_emulator: KubeEmulator, cadenza_crds: Any, kubeconfig: Path, nats_server: NatsServer, tmp_path: Path
) -> None:
    namespace = unique_namespace()
    kube_emulator.create_object("v1/namespaces", {"metadata": {"name": namespace}})
    spec = WorkflowSpec.model_validate({"steps": [{"name": "gate", "approval": {}}]})
    wf = compile_workflow("gated", spec, namespace)

    def workflowrun(name: str, run_id: str | None, *, annotation: bool = False) -> None:
        body = manifest("WorkflowRun", name, {"workflowRef": "gated"})
        body["metadata"]["namespace"] = namespace
        if run_id and annotation:
            body["metadata"]["annotations"] = {"cadenza.dev/run-id": run_id}
        kube_emulator.create_object(WORKFLOWRUNS, body)
        if run_id and not annotation:
            kube_emulator.patch_object(
                WORKFLOWRUNS, namespace, name, {"status": {"runId": run_id}}, subresource="status"
            )

    nats = ("--nats", nats_server.url, "--namespace", namespace)
    async with running_engine(nats_server.url, namespace) as engine:
        run = await engine.client.start(wf, {})
        other = await engine.client.start(wf, {})

        async def waiting() -> bool:
            states = [await engine.client.get(r) for r in (run, other)]
            return all(s is not None and s.steps.get("gate") is not None for s in states)

        await poll(waiting)
        workflowrun("nightly", run)
        workflowrun("annotated", other, annotation=True)
        workflowrun("not-started", None)

        got = await asyncio.to_thread(cadenza, "get", "nightly", *nats, "--kubeconfig", str(kubeconfig))
        assert got.returncode == 0, got
        assert got.stdout.startswith(f"{run}  Running"), got.stdout
        # the same resolution for a command an engine answers ($KUBECONFIG this time)
        approved = await asyncio.to_thread(cadenza, "approve", "nightly", "gate", *nats, "--by", "ada")
        assert approved.returncode == 0, approved
        assert f"approved {run}/gate as ada" in approved.stdout
        audit = await asyncio.to_thread(cadenza, "audit", "annotated", *nats)
        assert audit.returncode == 0 and other in audit.stdout, audit

        not_started = await asyncio.to_thread(cadenza, "get", "not-started", *nats)
        assert not_started.returncode == 2, not_started
        assert f"no run not-started in namespace {namespace}" in not_started.stderr
        assert "Traceback" not in not_started.stderr
        # Another namespace's WorkflowRun of that name is not this one's.
        elsewhere = await asyncio.to_thread(
            cadenza, "get", "nightly", "--nats", nats_server.url, "-n", "default"
        )
        assert elsewhere.returncode == 2 and "no run nightly in namespace default" in elsewhere.stderr

        # No kubeconfig anywhere: the name cannot be looked up, and the error says how to.
        bare = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"} | {"HOME": str(tmp_path)}
        unknown = await asyncio.to_thread(cadenza, "get", "nightly", *nats, env=bare)
        assert unknown.returncode == 2, unknown
        assert "configure a kubeconfig: --kubeconfig, $KUBECONFIG or ~/.kube/config" in unknown.stderr
        assert "Traceback" not in unknown.stderr
