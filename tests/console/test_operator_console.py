"""The console served by the real operator (kopf + engine, Kubernetes API emulator, real
nats-server) when CADENZA_CONSOLE_PORT is set: behind a proxy whose user header it trusts,
the header's user is the approver the engine checks (and RBAC, through the emulator's
answers to SubjectAccessReviews, what they may see and steer: test_console_rbac.py)."""

from __future__ import annotations

import socket
from typing import Any

import aiohttp
import kmock
from cadenza_operator.engine.definition import compile_workflow
from cadenza_operator.kube.settings import OperatorSettings
from cadenza_operator.local.nats_server import NatsServer
from cadenza_operator.models import WorkflowSpec

from ..integration.harness import poll
from ..kube.emulator import KubeEmulator
from ..kube.fixtures import cadenza_crds, kube_emulator
from ..operator.harness import running_operator
from .test_console_access import notice

__all__ = ["cadenza_crds", "kube_emulator"]

RBAC = "rbac.authorization.k8s.io"


def grant(
    emulator: KubeEmulator, namespace: str, name: str, verbs: list[str], subject: dict[str, str]
) -> None:
    """A Role on workflowruns in `namespace` and its RoleBinding to `subject`."""
    rule = {"apiGroups": ["cadenza.dev"], "resources": ["workflowruns"], "verbs": verbs}
    meta = {"name": name, "namespace": namespace}
    emulator.create_object(
        kmock.resource(RBAC, "v1", "roles"),
        {"apiVersion": f"{RBAC}/v1", "kind": "Role", "metadata": meta, "rules": [rule]},
    )
    emulator.create_object(
        kmock.resource(RBAC, "v1", "rolebindings"),
        {
            "apiVersion": f"{RBAC}/v1",
            "kind": "RoleBinding",
            "metadata": meta,
            "roleRef": {"apiGroup": RBAC, "kind": "Role", "name": name},
            "subjects": [{**subject, "apiGroup": RBAC}],
        },
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_settings_read_the_console_from_the_environment() -> None:
    settings = OperatorSettings.from_env(
        {"CADENZA_CONSOLE_PORT": "8088", "CADENZA_CONSOLE_USER_HEADER": "X-Forwarded-User"}
    )
    assert (settings.console_port, settings.console_user_header) == (8088, "X-Forwarded-User")
    assert settings.console_address == "0.0.0.0"
    assert OperatorSettings.from_env({}).console_port == 0  # off unless asked


async def test_the_operator_serves_the_console_with_the_proxy_user(
    kube_emulator: KubeEmulator, cadenza_crds: Any, fresh_nats: NatsServer
) -> None:
    for user in ("ada", "mallory"):  # both may steer runs here; only ada may approve this one
        grant(kube_emulator, "default", user, ["get", "list", "update"], {"kind": "User", "name": user})
    port = free_port()
    wf = compile_workflow(
        "guarded",
        WorkflowSpec.model_validate({"steps": [{"name": "review", "approval": {"approvers": ["ada"]}}]}),
    )
    async with running_operator(
        kube_emulator,
        fresh_nats.url,
        console_port=port,
        console_address="127.0.0.1",
        console_user_header="X-Forwarded-User",
    ) as op:
        run = await op.call(lambda ctx: ctx.engine.client.start(wf, {}))
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as http:

            async def listed() -> bool:
                reply = await http.get(f"{base}/?namespace=default", headers={"X-Forwarded-User": "ada"})
                return reply.status == 200 and f'data-run="{run}"' in await reply.text()

            await poll(listed)

            async def waiting() -> bool:
                state = await op.call(lambda ctx: ctx.engine.client.get(run))
                return state is not None and state.steps.get("review") is not None

            await poll(waiting)
            url = f"{base}/runs/default/{run}/approve"
            own = {"Origin": base}
            reply = await http.post(url, data={"step": "review"}, headers=own, allow_redirects=False)
            assert reply.status == 403  # reached past the proxy: no user
            for user, expected in (("mallory", "not an approver"), ("ada", f"approved {run}/review as ada")):
                reply = await http.post(
                    url,
                    data={"step": "review"},
                    headers={**own, "X-Forwarded-User": user},
                    allow_redirects=False,
                )
                assert expected in notice(reply)[1]

            async def succeeded() -> bool:
                state = await op.call(lambda ctx: ctx.engine.client.get(run))
                return state is not None and state.phase == "Succeeded"

            await poll(succeeded)
