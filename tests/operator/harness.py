"""Running the real operator (kopf + engine) in-process against the Kubernetes API
emulator and a real nats-server, and playing the rest of the cluster around it.

The test's own actions (what a user does with kubectl, what kubelet or the Deployment
controller would do) go through the emulator's in-process methods, never over HTTP, so
that the emulator's request log holds the operator's requests only: that is what the
write-count assertions and the RBAC usage set are computed from.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from cadenza.wire import dumps, loads
from cadenza_operator.engine.control import control_subject
from cadenza_operator.kube.api import KubeApi
from cadenza_operator.kube.context import OperatorContext
from cadenza_operator.kube.main import serve
from cadenza_operator.kube.settings import OperatorSettings

from ..kube.emulator import KubeEmulator
from ..kube.fixtures import wait_for

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[2]
HELLO = ROOT / "examples" / "hello"

AGENTS = "cadenza.dev/v1alpha1/agents"
WORKFLOWS = "cadenza.dev/v1alpha1/workflows"
WORKFLOWRUNS = "cadenza.dev/v1alpha1/workflowruns"
DEPLOYMENTS = "apps/v1/deployments"
SERVICES = "v1/services"
SERVICE_ACCOUNTS = "v1/serviceaccounts"
EVENTS = "v1/events"
NAMESPACE = "default"


def operator_settings(nats_url: str, **overrides: Any) -> OperatorSettings:
    """Standalone (no peering), no HTTP ports, short timers; status debounce as shipped."""
    base = OperatorSettings(
        nats_url=nats_url,
        peering="",
        metrics_port=0,
        health_port=0,
        peer_id="test-operator",
        agent_interval=0.3,
        workflow_interval=0.3,
        scale_down_window=0.0,
    )
    return dataclasses.replace(base, **overrides)


class RunningOperator:
    """One operator instance in a thread of its own, with its own event loop, as in a pod.

    Not in the test's loop: kopf takes every task created after it started for one of
    its own, and cancels them when it stops (the emulator's, the test's). `restart()`
    stops it and starts a fresh one (new registry, new engine, new kopf). `call()` runs a
    coroutine in the operator's loop, for a test reaching into its engine or NATS.
    """

    def __init__(self, emulator: KubeEmulator, settings: OperatorSettings) -> None:
        self.emulator = emulator
        self.settings = settings
        self.ctx: OperatorContext | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._error: BaseException | None = None

    async def start(self) -> None:
        self._stop, ready = threading.Event(), threading.Event()
        self._error = None
        api = KubeApi.for_server(str(self.emulator.url).rstrip("/"), token="test-token")

        def keep(ctx: OperatorContext) -> None:
            self.ctx = ctx
            self._loop = asyncio.get_running_loop()

        def main() -> None:
            try:
                asyncio.run(
                    serve(self.settings, stop_flag=self._stop, ready_flag=ready, api=api, on_context=keep)
                )
            except BaseException as exc:
                self._error = exc
                ready.set()

        self._thread = threading.Thread(target=main, name="operator", daemon=True)
        self._thread.start()
        if not await asyncio.to_thread(ready.wait, 30):
            raise AssertionError("the operator did not become ready within 30 s")
        if self._error is not None:
            raise AssertionError("the operator failed to start") from self._error

    async def stop(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        await asyncio.to_thread(self._thread.join, 30)
        alive = self._thread.is_alive()
        self._thread, self.ctx, self._loop = None, None, None
        if alive:
            raise AssertionError("the operator did not stop within 30 s")
        if self._error is not None:
            raise AssertionError("the operator failed") from self._error

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    @property
    def context(self) -> OperatorContext:
        if self.ctx is None:
            raise AssertionError("the operator is not running")
        return self.ctx

    async def call(self, fn: Callable[[OperatorContext], Awaitable[T]]) -> T:
        """`await op.call(lambda ctx: ctx.engine.client.get(run))`, run in the operator's loop."""
        if self._loop is None:
            raise AssertionError("the operator is not running")
        ctx = self.context

        async def run() -> T:
            return await fn(ctx)

        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(run(), self._loop))


@contextlib.asynccontextmanager
async def running_operator(
    emulator: KubeEmulator, nats_url: str, **overrides: Any
) -> AsyncIterator[RunningOperator]:
    op = RunningOperator(emulator, operator_settings(nats_url, **overrides))
    await op.start()
    try:
        yield op
    finally:
        await op.stop()


# ------------------------------------------------------------------ playing the cluster


def manifest(kind: str, name: str, spec: dict[str, Any], **meta: Any) -> dict[str, Any]:
    return {
        "apiVersion": "cadenza.dev/v1alpha1",
        "kind": kind,
        "metadata": {"name": name, "namespace": NAMESPACE, **meta},
        "spec": spec,
    }


def get(emulator: KubeEmulator, resource: str, name: str) -> dict[str, Any] | None:
    return emulator.get_object(resource, NAMESPACE, name)


def status_of(emulator: KubeEmulator, resource: str, name: str) -> dict[str, Any]:
    obj = get(emulator, resource, name)
    return dict((obj or {}).get("status") or {})


def events_for(emulator: KubeEmulator, name: str) -> list[dict[str, Any]]:
    return [
        e for e in emulator.list_objects(EVENTS, NAMESPACE) if e.get("involvedObject", {}).get("name") == name
    ]


def reasons_for(emulator: KubeEmulator, name: str) -> list[str]:
    return [str(e.get("reason")) for e in events_for(emulator, name)]


def writes_to(emulator: KubeEmulator, plural: str, namespace: str = NAMESPACE) -> int:
    """PATCH/PUT requests the operator made to objects of this resource (any subresource)."""
    return sum(
        1
        for call in emulator.request_log
        if call.resource == plural and call.verb in ("patch", "update") and call.namespace == namespace
    )


def used_permissions(emulator: KubeEmulator) -> set[tuple[str, str, str, str | None]]:
    """(verb, group, resource, subresource) of every request in the log."""
    return {(c.verb, c.group, c.resource, c.subresource) for c in emulator.request_log}


# --------------------------------------------------------- runs through the operator
GATE = {"steps": [{"name": "gate", "approval": {}}]}
"""A Workflow of one approval step: a run waits there until approved or rejected."""


def workflow_valid(emulator: KubeEmulator, workflow: str) -> bool:
    conditions = status_of(emulator, WORKFLOWS, workflow).get("conditions") or []
    return any(c["type"] == "Valid" and c["status"] == "True" for c in conditions)


def step_phase(emulator: KubeEmulator, workflowrun: str, step: str) -> str:
    steps = status_of(emulator, WORKFLOWRUNS, workflowrun).get("steps") or {}
    return str((steps.get(step) or {}).get("phase"))


async def gate_workflow(emulator: KubeEmulator, name: str) -> None:
    """The GATE Workflow `name`, once the operator has found it valid."""
    emulator.create_object(WORKFLOWS, manifest("Workflow", name, GATE))
    await wait_for(lambda: workflow_valid(emulator, name), timeout=60)


async def rejected_workflowrun(emulator: KubeEmulator, workflow: str, name: str) -> str:
    """A WorkflowRun `name` of the GATE Workflow `workflow`, its approval rejected by
    annotation, once Failed: its run id."""
    emulator.create_object(WORKFLOWRUNS, manifest("WorkflowRun", name, {"workflowRef": workflow}))
    await wait_for(lambda: step_phase(emulator, name, "gate") == "WaitingApproval", timeout=30)
    emulator.patch_object(
        WORKFLOWRUNS, NAMESPACE, name, {"metadata": {"annotations": {"cadenza.dev/reject": "gate"}}}
    )
    await wait_for(lambda: status_of(emulator, WORKFLOWRUNS, name).get("phase") == "Failed", timeout=30)
    return str(status_of(emulator, WORKFLOWRUNS, name)["runId"])


async def ask_control(operator: RunningOperator, request: dict[str, Any]) -> dict[str, Any]:
    """A control request on the subject `cadenza retry` uses, answered by the operator's engine."""

    async def send(ctx: Any) -> dict[str, Any]:
        msg = await ctx.nc.request(control_subject(NAMESPACE), dumps(request), timeout=10)
        reply: dict[str, Any] = loads(msg.data)
        return reply

    return await operator.call(send)
