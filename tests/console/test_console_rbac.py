"""Per-namespace access in the operator's console: the API server decides (a
SubjectAccessReview per user, groups, verb and namespace, kube/access.py), answered here by
the Kubernetes API emulator evaluating the Roles and bindings it holds (tests/kube/rbac.py;
an emulator, not a cluster). The real operator (kopf + engine) and the real nats-server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import kmock
from cadenza_operator.engine.definition import compile_workflow
from cadenza_operator.kube.access import AccessReviews
from cadenza_operator.kube.api import ApiError, KubeApi
from cadenza_operator.local.dev import DevServer, serve_console
from cadenza_operator.local.nats_server import NatsServer
from cadenza_operator.manifests import load
from cadenza_operator.models import WorkflowSpec
from cadenza_operator.observe.web import Console, Identity, Permission, serve

from ..integration.harness import poll, unique_namespace, write_project
from ..kube.emulator import KubeEmulator
from ..kube.fixtures import cadenza_crds, kube_emulator
from ..operator.harness import running_operator
from .test_console_access import notice
from .test_console_browser import GATES
from .test_operator_console import RBAC, free_port, grant

__all__ = ["cadenza_crds", "kube_emulator"]

USER, GROUPS = "X-Forwarded-User", "X-Forwarded-Groups"


def revoke(emulator: KubeEmulator, namespace: str, name: str) -> None:
    emulator.delete_object(kmock.resource(RBAC, "v1", "rolebindings"), namespace, name)


def guarded(namespace: str) -> Any:
    spec = WorkflowSpec.model_validate({"steps": [{"name": "review", "approval": {"approvers": ["ada"]}}]})
    return compile_workflow("guarded", spec, namespace=namespace)


async def test_each_namespace_is_seen_and_steered_only_as_rbac_allows(
    kube_emulator: KubeEmulator, cadenza_crds: Any, fresh_nats: NatsServer
) -> None:
    grant(kube_emulator, "team-a", "alice-runs", ["get", "list", "update"], {"kind": "User", "name": "alice"})
    grant(kube_emulator, "team-b", "b-viewers", ["get", "list"], {"kind": "Group", "name": "b-viewers"})
    port = free_port()
    async with running_operator(
        kube_emulator,
        fresh_nats.url,
        console_port=port,
        console_address="127.0.0.1",
        console_user_header=USER,
        console_groups_header=GROUPS,
    ) as op:
        run_a = await op.call(lambda ctx: ctx.engine.client.start(guarded("team-a"), {}))
        run_b = await op.call(lambda ctx: ctx.engine.client.start(guarded("team-b"), {}))
        base = f"http://127.0.0.1:{port}"
        alice = {USER: "alice", "Origin": base}
        bob = {USER: "bob", GROUPS: "devs, b-viewers", "Origin": base}

        async def state(run: str) -> Any:
            return await op.call(lambda ctx: ctx.engine.client.get(run))

        async def waiting(run: str) -> bool:
            s = await state(run)
            return s is not None and s.steps.get("review") is not None

        for run in (run_a, run_b):
            await poll(lambda run=run: waiting(run))

        async with aiohttp.ClientSession() as http:

            async def page(path: str, headers: dict[str, str]) -> tuple[int, str]:
                async with http.get(f"{base}{path}", headers=headers) as reply:
                    return reply.status, await reply.text()

            # The list: alice sees team-a's runs and nothing of team-b, not even its name.
            status, text = await page("/", alice)
            assert status == 200
            assert f'data-run="{run_a}"' in text and f'data-run="{run_b}"' not in text
            assert "team-b" not in text
            status, text = await page("/fragments/runs", alice)
            assert status == 200 and run_a in text and run_b not in text
            # bob, by his group, sees team-b's and not team-a's.
            status, text = await page("/", bob)
            assert status == 200 and f'data-run="{run_b}"' in text and run_a not in text
            # Asked directly for what she may not see: 403 naming the permission.
            status, text = await page("/?namespace=team-b", alice)
            assert status == 403 and "alice may not list workflowruns.cadenza.dev in namespace team-b" in text
            for path in (f"/runs/team-b/{run_b}", f"/runs/team-b/{run_b}/live", "/diagnose/team-b/guarded"):
                status, text = await page(path, alice)
                assert status == 403, path
                assert "workflowruns.cadenza.dev in namespace team-b" in text and run_b not in text
            assert (await page(f"/runs/team-a/{run_a}", alice))[0] == 200
            assert (await page(f"/runs/team-b/{run_b}", bob))[0] == 200
            assert (await page(f"/runs/team-b/{run_b}", {USER: "bob"}))[0] == 403  # the group is the grant
            assert (await page("/", {}))[0] == 403  # past the proxy: nobody to ask about
            assert (await page("/metrics", alice))[0] == 404  # every namespace's series: not here

            async def post(path: str, headers: dict[str, str], **form: str) -> aiohttp.ClientResponse:
                return await http.post(f"{base}{path}", data=form, headers=headers, allow_redirects=False)

            # Forged forms: cancelling team-b's run as alice, by its own URL and by hers.
            reply = await post(f"/runs/team-b/{run_b}/cancel", alice, reason="forged")
            assert reply.status == 403
            assert "alice may not update workflowruns.cadenza.dev in namespace team-b" in await reply.text()
            ok, text = notice(await post(f"/runs/team-a/{run_b}/cancel", alice, reason="forged"))
            assert ok == "0", text
            # A viewer may not act either.
            assert (await post(f"/runs/team-b/{run_b}/cancel", bob, reason="viewer")).status == 403
            for op_name, form in (("approve", {"step": "review"}), ("signal", {"name": "go"}), ("retry", {})):
                reply = await post(f"/runs/team-b/{run_b}/{op_name}", alice, **form)
                assert reply.status == 403, op_name
            s = await state(run_b)
            assert s is not None and s.phase == "Running" and s.cancelledBy is None
            assert s.steps["review"].phase == "WaitingApproval"

            # In her own namespace she may.
            assert notice(await post(f"/runs/team-a/{run_a}/cancel", alice)) == (
                "1",
                f"cancellation of {run_a} requested",
            )

            async def cancelled() -> bool:
                s = await state(run_a)
                return s is not None and s.phase == "Cancelled"

            await poll(cancelled)
            s = await state(run_b)
            assert s is not None and s.phase == "Running"

        # Each review carried exactly the user and groups of the headers.
        subjects = {(r["user"], tuple(r.get("groups") or ())) for r in kube_emulator.access_reviews}
        assert subjects == {("alice", ()), ("bob", ("devs", "b-viewers")), ("bob", ())}
        attrs = {
            (r["user"], a["verb"], a["namespace"], a["group"], a["resource"])
            for r in kube_emulator.access_reviews
            for a in [r["resourceAttributes"]]
        }
        assert ("alice", "update", "team-b", "cadenza.dev", "workflowruns") in attrs
        assert ("alice", "get", "team-b", "cadenza.dev", "workflowruns") in attrs
        assert ("alice", "list", "team-a", "cadenza.dev", "workflowruns") in attrs


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_answers_are_cached_per_user_groups_and_permission_then_asked_again(
    kube_emulator: KubeEmulator,
) -> None:
    grant(kube_emulator, "team-a", "alice-runs", ["get"], {"kind": "User", "name": "alice"})
    clock = Clock()
    api = KubeApi.for_server(str(kube_emulator.url).rstrip("/"))
    reviews = AccessReviews(api, ttl=15, size=3, clock=clock)
    see_a, see_b = Permission("get", "team-a"), Permission("get", "team-b")
    try:
        assert await reviews("alice", (), see_a) is True
        assert await reviews("alice", (), see_b) is False
        assert reviews.reviews == 2
        clock.now += 14
        revoke(kube_emulator, "team-a", "alice-runs")
        assert await reviews("alice", (), see_a) is True  # cached: within the TTL
        assert await reviews("alice", (), see_b) is False  # refusals too
        assert reviews.reviews == 2
        assert await reviews("alice", ("g",), see_a) is False  # other groups: another question
        assert reviews.reviews == 3
        clock.now += 2  # past the TTL: asked again, and the revoked binding shows
        assert await reviews("alice", (), see_a) is False
        assert reviews.reviews == 4
        # Bounded: new keys drop the least recently used, even within the TTL.
        await reviews("bob", (), see_a)
        await reviews("carol", (), see_a)
        assert reviews.reviews == 6
        assert len(reviews._answers) == 3
        assert await reviews("alice", ("g",), see_a) is False  # asked at 1014, dropped: asked again
        assert reviews.reviews == 7
    finally:
        await api.close()


async def test_dev_console_asks_nobody(tmp_path: Path, nats_server: NatsServer) -> None:
    """`cadenza dev` has no cluster: its console shows and steers every run of its
    namespace for the local user, with no header and no review."""
    namespace = unique_namespace()
    write_project(tmp_path / "p", "", GATES)
    bundle = load([tmp_path / "p"], namespace=namespace)
    async with DevServer(bundle, nats_server.url, namespace) as dev:
        runner, port = await serve_console(lambda: dev.engine, 0)
        try:
            run = await dev.engine.client.start(bundle.compiled["gate"], {"text": "x"})
            base = f"http://127.0.0.1:{port}"
            async with aiohttp.ClientSession() as http:
                reply = await http.get(f"{base}/?namespace={namespace}")
                assert reply.status == 200 and f'data-run="{run}"' in await reply.text()
                assert (await http.get(f"{base}/runs/{namespace}/{run}")).status == 200
                reply = await http.post(
                    f"{base}/runs/{namespace}/{run}/cancel", headers={"Origin": base}, allow_redirects=False
                )
                assert notice(reply) == ("1", f"cancellation of {run} requested")
        finally:
            await runner.cleanup()


async def test_a_review_that_fails_refuses_and_nobody_past_the_proxy_is_asked_about() -> None:
    """The API server unreachable (or the operator lacking the permission): 503, never a
    guessed yes; a request without the user header is refused before anyone is asked."""
    asked: list[tuple[str, tuple[str, ...], Permission]] = []

    async def unreachable(user: str, groups: tuple[str, ...], permission: Permission) -> bool:
        asked.append((user, groups, permission))
        raise ApiError(403, "Forbidden", "cannot create subjectaccessreviews")

    started: list[bool] = []

    def engine() -> Any:
        started.append(True)  # the engine is asked only once access is granted
        return None

    console = Console(engine, Identity(user_header=USER, groups_header=GROUPS), unreachable)
    runner, port = await serve(console, "127.0.0.1", 0)
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            reply = await http.get(f"{base}/runs/team-a/x-0123456789", headers={USER: "alice", GROUPS: "g"})
            assert reply.status == 503
            assert "could not ask the Kubernetes API whether alice may do this" in await reply.text()
            reply = await http.post(
                f"{base}/runs/team-a/x-0123456789/cancel", headers={USER: "alice", "Origin": base}
            )
            assert reply.status == 503
            assert asked == [
                ("alice", ("g",), Permission("get", "team-a")),
                ("alice", (), Permission("update", "team-a")),
            ]
            assert not started
            reply = await http.get(f"{base}/runs/team-a/x-0123456789")
            assert reply.status == 403 and f"no user in header {USER}" in await reply.text()
            assert len(asked) == 2
    finally:
        await runner.cleanup()
