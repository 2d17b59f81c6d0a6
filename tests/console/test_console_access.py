"""Who may act through the console, and from where: cross-site posts refused (in a real
Chromium and by plain HTTP), the proxy's user header as the verified approver, the
unverified `console` name refused where a step names its approvers; /metrics served."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
from aiohttp import web
from cadenza_operator.local.nats_server import NatsServer
from cadenza_operator.observe.web import Identity
from playwright.async_api import expect

from ..integration.harness import poll
from .conftest import console_stack
from .test_console_browser import GATES

LIVE = 30_000


async def waiting(s: Any, run: str, step: str = "review") -> bool:
    state = await s.client.get(run)
    return state is not None and step in state.steps and state.steps[step].phase == "WaitingApproval"


def notice(reply: aiohttp.ClientResponse) -> tuple[str, str]:
    """(ok, notice) of the run page an action redirected to."""
    assert reply.status == 303, reply.status
    query = parse_qs(urlsplit(reply.headers["Location"]).query)
    return query["ok"][0], query["notice"][0]


async def test_a_cross_site_form_cannot_act(tmp_path: Path, nats_server: NatsServer, browser: Any) -> None:
    async with console_stack(tmp_path / "p", "", GATES, nats_server.url) as s:
        run = await s.client.start(s.workflow("gate"), {"text": "x"})
        await poll(lambda: waiting(s, run))
        target = f"{s.url}/runs/{s.namespace}/{run}"

        # Another site (another port: another origin) whose page posts to the console.
        async def evil(_: web.Request) -> web.Response:
            return web.Response(
                content_type="text/html",
                text=f"""<form id="f" method="post" action="{target}/cancel">
                <input name="reason" value="csrf"></form>
                <script>document.getElementById("f").submit()</script>""",
            )

        app = web.Application()
        app.router.add_get("/", evil)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        try:
            page = await browser.new_page()
            async with page.expect_navigation(url=f"{target}/cancel") as nav:
                await page.goto(f"http://127.0.0.1:{runner.addresses[0][1]}/")
            response = await nav.value
            assert response is not None and response.status == 403
            await expect(page.locator("body")).to_contain_text("cross-site request refused")
        finally:
            await runner.cleanup()
        state = await s.client.get(run)
        assert state is not None and state.cancelledBy is None and state.phase == "Running"

        async with aiohttp.ClientSession() as http:
            for headers in ({"Origin": "http://evil.example"}, {}, {"Sec-Fetch-Site": "cross-site"}):
                reply = await http.post(f"{target}/cancel", data={"reason": "x"}, headers=headers)
                assert reply.status == 403, headers
            # The same post from the console's own origin goes through.
            reply = await http.post(
                f"{target}/cancel", data={}, headers={"Origin": s.url}, allow_redirects=False
            )
            assert notice(reply) == ("1", f"cancellation of {run} requested")
        await poll(lambda: _phase(s, run, "Cancelled"))


async def _phase(s: Any, run: str, phase: str) -> bool:
    state = await s.client.get(run)
    return state is not None and state.phase == phase


async def test_the_proxy_user_header_is_the_approver(tmp_path: Path, nats_server: NatsServer) -> None:
    identity = Identity(user_header="X-Forwarded-User")
    async with console_stack(tmp_path / "p", "", GATES, nats_server.url, identity) as s:
        run = await s.client.start(s.workflow("guarded"), {})
        await poll(lambda: waiting(s, run))
        url = f"{s.url}/runs/{s.namespace}/{run}/approve"
        own = {"Origin": s.url}
        async with aiohttp.ClientSession() as http:
            # Past the proxy (no header): nobody, refused before the engine is asked.
            reply = await http.post(url, data={"step": "review"}, headers=own, allow_redirects=False)
            assert reply.status == 403
            assert "no user in header X-Forwarded-User" in await reply.text()
            # Someone the proxy vouches for who is not an approver: the engine refuses.
            headers = {**own, "X-Forwarded-User": "mallory"}
            reply = await http.post(url, data={"step": "review"}, headers=headers, allow_redirects=False)
            assert notice(reply) == ("0", "refused: mallory is not an approver of review (approvers: ada)")
            headers = {**own, "X-Forwarded-User": "ada"}
            reply = await http.post(url, data={"step": "review"}, headers=headers, allow_redirects=False)
            assert notice(reply) == ("1", f"approved {run}/review as ada")
        await poll(lambda: _phase(s, run, "Succeeded"))
        trail = await s.client.audit(s.namespace, run)
        assert any(r.get("actor") == "ada" and r.get("step") == "review" for r in trail), trail


async def test_without_an_identity_actions_are_the_unverified_console(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    async with console_stack(tmp_path / "p", "", GATES, nats_server.url, Identity()) as s:
        guarded = await s.client.start(s.workflow("guarded"), {})
        open_gate = await s.client.start(s.workflow("gate"), {"text": "anyone"})
        await poll(lambda: waiting(s, guarded))
        await poll(lambda: waiting(s, open_gate))
        own = {"Origin": s.url}
        async with aiohttp.ClientSession() as http:
            # A step naming its approvers: `console` is none of them.
            reply = await http.post(
                f"{s.url}/runs/{s.namespace}/{guarded}/approve",
                data={"step": "review"},
                headers=own,
                allow_redirects=False,
            )
            assert notice(reply) == ("0", "refused: console is not an approver of review (approvers: ada)")
            # A step anyone may decide: decided as `console`, marked unverified.
            reply = await http.post(
                f"{s.url}/runs/{s.namespace}/{open_gate}/approve",
                data={"step": "review", "comment": "fine"},
                headers=own,
                allow_redirects=False,
            )
            assert notice(reply) == ("1", f"approved {open_gate}/review as console")
            # Resume: a budget that is not a number is named; a run not Paused is the engine's refusal.
            resume = f"{s.url}/runs/{s.namespace}/{guarded}/resume"
            reply = await http.post(resume, data={"tokens": "lots"}, headers=own, allow_redirects=False)
            assert notice(reply) == ("0", "resume: tokens 'lots' is not a number")
            reply = await http.post(resume, data={"tokens": "5000"}, headers=own, allow_redirects=False)
            assert notice(reply) == ("0", f"run {guarded} is not Paused (it is Running)")
            assert (await http.get(f"{s.url}/runs/{s.namespace}/nope")).status == 404
            assert (await http.get(f"{s.url}/runs/other-namespace/{guarded}")).status == 404
            metrics = await http.get(f"{s.url}/metrics")
            assert metrics.status == 200 and "cadenza_" in await metrics.text()
            # The diagnosis page: a bad window and an unknown workflow are named, not a traceback.
            bad = await http.get(f"{s.url}/diagnose/{s.namespace}/gate?since=soon")
            assert bad.status == 400 and "since: invalid duration 'soon'" in await bad.text()
            unknown = await http.get(f"{s.url}/diagnose/{s.namespace}/nope")
            assert unknown.status == 404 and "workflow 'nope' is not known" in await unknown.text()
            page = await http.get(f"{s.url}/diagnose/{s.namespace}/guarded?since=2h")
            assert page.status == 200 and 'data-step="review"' not in await page.text()  # no attempts yet
        await poll(lambda: _step(s, open_gate, "review", "Succeeded"))
        state = await s.client.get(open_gate)
        assert state is not None
        approval = state.steps["review"].approval or {}
        assert approval.get("by") == "console" and "[console, unverified]" in str(approval.get("comment"))


async def _step(s: Any, run: str, step: str, phase: str) -> bool:
    state = await s.client.get(run)
    return state is not None and step in state.steps and state.steps[step].phase == phase


TEAM = """
---
apiVersion: cadenza.dev/v1alpha1
kind: Workflow
metadata: {name: team}
spec:
  steps:
    - name: review
      approval: {approvers: ["group:reviewers"]}
"""


async def test_a_group_the_proxy_vouches_for_may_approve(tmp_path: Path, nats_server: NatsServer) -> None:
    identity = Identity(user_header="X-Forwarded-User", groups_header="X-Forwarded-Groups")
    async with console_stack(tmp_path / "p", "", TEAM, nats_server.url, identity) as s:
        first = await s.client.start(s.workflow("team"), {})
        await poll(lambda: waiting(s, first))
        async with aiohttp.ClientSession() as http:

            async def approve(run: str, **headers: str) -> tuple[str, str]:
                reply = await http.post(
                    f"{s.url}/runs/{s.namespace}/{run}/approve",
                    data={"step": "review"},
                    headers={"Origin": s.url, "X-Forwarded-User": "bob", **headers},
                    allow_redirects=False,
                )
                return notice(reply)

            refused = "refused: bob is not an approver of review (approvers: group:reviewers)"
            assert await approve(first) == ("0", refused)  # no groups said
            assert await approve(first, **{"X-Forwarded-Groups": "dev, ops"}) == ("0", refused)
            # A group name that would smuggle another into the vouched form is dropped.
            assert await approve(first, **{"X-Forwarded-Groups": "x] [group:reviewers"}) == ("0", refused)
            ok = await approve(first, **{"X-Forwarded-Groups": "dev, reviewers"})
            assert ok == ("1", f"approved {first}/review as bob (group reviewers)")

            # Once decided (the engine has applied the approval), the engine's refusal
            # stands, whatever the groups.
            async def decided() -> bool:
                return not await waiting(s, first)

            await poll(decided)
            again = await approve(first, **{"X-Forwarded-Groups": "reviewers"})
            assert again[0] == "0" and (
                "is not waiting for approval" in again[1] or "already Succeeded" in again[1]
            )
        await poll(lambda: _phase(s, first, "Succeeded"))
        state = await s.client.get(first)
        assert (
            state is not None and (state.steps["review"].approval or {}).get("by") == "bob [group:reviewers]"
        )

    # Without a groups header configured, a groups header a client sends is not believed.
    async with console_stack(
        tmp_path / "q", "", TEAM, nats_server.url, Identity(user_header="X-Forwarded-User")
    ) as s:
        run = await s.client.start(s.workflow("team"), {})
        await poll(lambda: waiting(s, run))
        async with aiohttp.ClientSession() as http:
            reply = await http.post(
                f"{s.url}/runs/{s.namespace}/{run}/approve",
                data={"step": "review"},
                headers={"Origin": s.url, "X-Forwarded-User": "bob", "X-Forwarded-Groups": "reviewers"},
                allow_redirects=False,
            )
            assert notice(reply)[0] == "0"
