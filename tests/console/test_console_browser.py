"""The console in a real headless Chromium over a real `cadenza dev` stack (nats-server,
engine, agent processes): list -> run page -> graph -> timeline -> approve -> the run
finishes, each part seen changing live, without a reload; reject, cancel, signals and
the engine's refusals shown in the page; user data rendered as text, never as markup."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cadenza_operator.local.nats_server import NatsServer
from playwright.async_api import expect

from ..integration.harness import agent_manifest
from .conftest import console_stack

LIVE = 30_000  # ms: the bound of every wait for a live change (a poll, not a measure)

AGENTS = """
from cadenza import Agent

echo = Agent("echo")

@echo.handler
async def handle(task):
    task.log.info("echoing <b>input</b>", keys=sorted(task.input))
    return {"echo": task.input}

if __name__ == "__main__":
    echo.run()
"""

REVIEW = """
---
apiVersion: cadenza.dev/v1alpha1
kind: Workflow
metadata: {name: review}
spec:
  steps:
    - {name: draft, agent: echo, input: {text: "${{ input.text }}"}}
    - name: fanout
      agent: echo
      dependsOn: [draft]
      forEach: "[1, 2, 3]"
      input: {n: "${{ item }}"}
    - name: review
      dependsOn: [draft]
      approval: {message: "Publish the draft?"}
    - {name: publish, agent: echo, dependsOn: [review, fanout], input: {done: true}}
  onExit: {name: cleanup, agent: echo, input: {phase: "${{ run.phase }}"}}
"""

# No agents: steps that wait for people only.
GATES = """
---
apiVersion: cadenza.dev/v1alpha1
kind: Workflow
metadata: {name: gate}
spec:
  steps:
    - name: review
      approval: {message: "${{ input.text }}"}
    - name: go
      waitFor: {signal: go}
---
apiVersion: cadenza.dev/v1alpha1
kind: Workflow
metadata: {name: guarded}
spec:
  steps:
    - name: review
      approval: {approvers: [ada]}
"""

XSS_INPUT = '"><img src=x onerror="window.pwned=1">'
XSS_OUTPUT = "<script>window.pwned=1</script>"


async def node(page: Any, step: str) -> Any:
    return page.locator(f'svg.dag g.node[data-step="{step}"]')


async def test_list_open_graph_timeline_approve_finish(
    tmp_path: Path, nats_server: NatsServer, browser: Any, artifacts: Path
) -> None:
    async with console_stack(tmp_path / "p", AGENTS, agent_manifest("echo") + REVIEW, nats_server.url) as s:
        page = await browser.new_page(viewport={"width": 1400, "height": 1000})
        await page.goto(f"{s.url}/?namespace={s.namespace}")  # the session's server has others' runs
        await expect(page.locator("tbody#runs")).to_contain_text("no runs match these filters")

        run = await s.client.start(s.workflow("review"), {"text": "hello"})
        row = page.locator(f'tr[data-run="{run}"]')
        await expect(row).to_be_visible(timeout=LIVE)  # live: the page was not reloaded
        await expect(row).to_contain_text("waits for approval", timeout=LIVE)

        await row.get_by_role("link", name=run).click()
        await expect(page).to_have_url(f"{s.url}/runs/{s.namespace}/{run}")
        # One node per step and one for onExit, coloured by phase.
        await expect(page.locator("svg.dag g.node")).to_have_count(5)
        await expect(await node(page, "review")).to_have_attribute("data-phase", "WaitingApproval")
        await expect(await node(page, "review")).to_have_class(
            "node phase-WaitingApproval kind-approval role-step"
        )
        await expect(await node(page, "draft")).to_have_attribute("data-phase", "Succeeded")
        await expect(await node(page, "fanout")).to_have_attribute("data-phase", "Succeeded", timeout=LIVE)
        await expect((await node(page, "fanout")).locator(".detail")).to_have_text("3/3")
        await expect(await node(page, "publish")).to_have_attribute("data-phase", "Pending")
        await expect(await node(page, "cleanup")).to_have_class("node phase-Pending kind-agent role-exit")
        assert await page.locator("svg.dag path.edge").count() >= 4
        # The timeline: draft's attempt waited, then executed; fanout's items as one span.
        draft_bar = page.locator('svg.timeline g.bar[data-step="draft"]')
        await expect(draft_bar).to_have_count(1)
        await expect(draft_bar.locator("rect.exec")).to_have_count(1)
        await expect(draft_bar.locator("rect.wait")).to_have_count(1)
        await expect(page.locator('svg.timeline g.bar[data-step="fanout"]')).to_have_count(1)
        await page.locator('details[data-step="draft"] summary').click()
        await expect(page.locator('details[data-step="draft"] pre.output')).to_contain_text('"text": "hello"')
        # Its input as the attempt received it (re-rendered, checked by hash), not its template;
        # fanout's items and publish (not sent yet) show their templates, labelled so.
        draft_input = page.locator('details[data-step="draft"] pre.input')
        await expect(draft_input).to_contain_text('"text": "hello"')
        await expect(draft_input).not_to_contain_text("${{")
        await expect(page.locator('details[data-step="draft"] h3').first).to_have_text(
            "rendered input (what attempt 1 received)"
        )
        for step, label, template in (
            ("fanout", "template, rendered for each of 3 items", "${{ item }}"),
            ("publish", "template: the step's inputs are not available yet", '"done": true'),
        ):
            await page.locator(f'details[data-step="{step}"] summary').click()
            await expect(page.locator(f'details[data-step="{step}"] h3').first).to_have_text(label)
            await expect(page.locator(f'details[data-step="{step}"] pre.input')).to_contain_text(template)
        # The step's logs (the run-log stream), as text.
        await expect(page.locator('details[data-step="draft"] pre.logs')).to_contain_text(
            "draft attempt 1 INFO echoing <b>input</b> keys=", timeout=LIVE
        )
        await page.screenshot(path=str(artifacts / "console-run.png"), full_page=True)

        await expect(page.locator("#run-outputs")).to_have_text("(none yet)")  # still running
        approval = page.locator('section.approval[data-step="review"]')
        await approval.locator("input[name=comment]").fill("looks good")
        await approval.get_by_role("button", name="Approve").click()
        await expect(page.locator(".notice.ok")).to_contain_text(f"approved {run}/review as tester")
        await expect(page.locator("#run-phase")).to_have_text("Succeeded", timeout=LIVE)
        await expect(await node(page, "publish")).to_have_attribute("data-phase", "Succeeded")
        await expect(await node(page, "cleanup")).to_have_attribute("data-phase", "Succeeded")
        await expect(page.locator("table.audit")).to_contain_text("tester")
        # The workflow declares no output: once it has ended, none is expected any more.
        await expect(page.locator("#run-outputs")).to_have_text("(none)")
        await page.screenshot(path=str(artifacts / "console-run-done.png"), full_page=True)

        # The workflow's diagnosis, linked from the run page.
        await page.get_by_role("link", name="diagnose review").click()
        await expect(page.locator("#diagnose-runs")).to_contain_text("1 runs")
        await expect(page.locator('table.diagnose-steps tr[data-step="draft"]')).to_be_visible()
        await expect(page.locator("table.trace")).to_contain_text(run)
        await page.screenshot(path=str(artifacts / "console-diagnose.png"), full_page=True)

        # The list follows the run's end as well.
        await page.goto(f"{s.url}/?namespace={s.namespace}&workflow=review&phase=Succeeded")
        await expect(page.locator(f'tr[data-run="{run}"] .phase')).to_have_text("Succeeded")
        await page.goto(f"{s.url}/?namespace={s.namespace}&phase=Failed")
        await expect(page.locator(f'tr[data-run="{run}"]')).to_have_count(0)
        await page.goto(f"{s.url}/?namespace={s.namespace}")
        waiting = await s.client.start(s.workflow("review"), {"text": "second"})
        await expect(page.locator(f'tr[data-run="{waiting}"]')).to_contain_text(
            "waits for approval", timeout=LIVE
        )
        await page.screenshot(path=str(artifacts / "console-list.png"))


async def test_reject_refusals_cancel_and_signals(
    tmp_path: Path, nats_server: NatsServer, browser: Any
) -> None:
    async with console_stack(tmp_path / "p", "", GATES, nats_server.url) as s:
        page = await browser.new_page()
        rejected = await s.client.start(s.workflow("gate"), {"text": "ship it?"})
        await page.goto(f"{s.url}/runs/{s.namespace}/{rejected}")
        approval = page.locator('section.approval[data-step="review"]')
        await expect(approval).to_contain_text("ship it?", timeout=LIVE)  # live: appears once waiting
        await approval.get_by_role("button", name="Reject").click()
        await expect(page.locator(".notice.ok")).to_contain_text(f"rejected {rejected}/review as tester")
        await expect(page.locator("#run-phase")).to_have_text("Failed", timeout=LIVE)
        await expect(await node(page, "review")).to_have_attribute("data-phase", "Failed")
        # The engine refuses what no longer applies, and the page says why.
        await page.get_by_role("button", name="Cancel run").click()
        await expect(page.locator(".notice.refused")).to_contain_text(f"run {rejected} already Failed")
        # Retry: a new run, whose page the console opens; the rejected approval waits again.
        await page.get_by_role("button", name="Retry").click()
        await expect(page.locator(".notice.ok")).to_contain_text(f"retry of {rejected} started: run gate-")
        path = urlsplit(page.url).path
        assert path.startswith(f"/runs/{s.namespace}/gate-") and not path.endswith(rejected)
        await expect(await node(page, "review")).to_have_attribute(
            "data-phase", "WaitingApproval", timeout=LIVE
        )

        # Someone who is not an approver: the engine's refusal, the step still waits.
        guarded = await s.client.start(s.workflow("guarded"), {})
        await page.goto(f"{s.url}/runs/{s.namespace}/{guarded}")
        await (
            page.locator('section.approval[data-step="review"]')
            .get_by_role("button", name="Approve")
            .click(timeout=LIVE)
        )
        await expect(page.locator(".notice.refused")).to_contain_text(
            "refused: tester is not an approver of review (approvers: ada)"
        )
        await expect(await node(page, "review")).to_have_attribute("data-phase", "WaitingApproval")

        # Signals: a payload that is not JSON is refused by the console, naming the field.
        cancelled = await s.client.start(s.workflow("gate"), {"text": "later"})
        await page.goto(f"{s.url}/runs/{s.namespace}/{cancelled}")
        signal = page.locator("form.signal")
        await signal.locator("input[name=name]").fill("go")
        await signal.locator("input[name=payload]").fill("{not json")
        await signal.get_by_role("button", name="Send signal").click()
        await expect(page.locator(".notice.refused")).to_contain_text("signal go: payload is not JSON")
        await signal.locator("input[name=name]").fill("stop")
        await signal.locator("input[name=payload]").fill("{}")
        await signal.get_by_role("button", name="Send signal").click()
        await expect(page.locator(".notice.refused")).to_contain_text(
            "no step of workflow gate waits for signal stop"
        )
        await signal.locator("input[name=name]").fill("go")
        await signal.locator("input[name=payload]").fill('{"ok": true}')
        await signal.get_by_role("button", name="Send signal").click()
        await expect(page.locator(".notice.ok")).to_contain_text(f"signal go sent to {cancelled}")
        await expect(await node(page, "go")).to_have_attribute("data-phase", "Succeeded", timeout=LIVE)
        # Cancel: the waiting approval is cancelled with the run.
        await page.locator("input[name=reason]").fill("not today")
        await page.get_by_role("button", name="Cancel run").click()
        await expect(page.locator(".notice.ok")).to_contain_text(f"cancellation of {cancelled} requested")
        await expect(page.locator("#run-phase")).to_have_text("Cancelled", timeout=LIVE)
        await expect(await node(page, "review")).to_have_attribute("data-phase", "Cancelled")
        state = await s.client.get(cancelled)
        assert state is not None and state.cancelledBy == "tester"


async def test_user_data_is_shown_as_text_never_run(
    tmp_path: Path, nats_server: NatsServer, browser: Any
) -> None:
    async with console_stack(tmp_path / "p", "", GATES, nats_server.url) as s:
        run = await s.client.start(s.workflow("gate"), {"text": XSS_INPUT})
        await s.client.signal(s.namespace, run, "go", {"html": XSS_OUTPUT}, by="test")
        page = await browser.new_page()
        dialogs: list[str] = []
        page.on("dialog", lambda d: dialogs.append(d.message))
        await page.goto(f"{s.url}/runs/{s.namespace}/{run}")
        await expect(await node(page, "go")).to_have_attribute("data-phase", "Succeeded", timeout=LIVE)
        # The approval message (rendered from the input) and the signal's payload, as text.
        await expect(page.locator('section.approval[data-step="review"] .message')).to_have_text(XSS_INPUT)
        await page.locator('details[data-step="go"] summary').click()
        await expect(page.locator('details[data-step="go"] pre.output')).to_contain_text(XSS_OUTPUT)
        await expect(page.locator("#run-input")).to_contain_text("<img src=x onerror=")
        await page.wait_for_timeout(2 * 1500)  # two live refreshes: their fragments are escaped too
        assert await page.evaluate("window.pwned") is None
        assert await page.locator("img[src=x]").count() == 0
        assert await page.locator("main script").count() == 0
        assert dialogs == []
        await page.goto(s.url + "/")
        await expect(page.locator(f'tr[data-run="{run}"]')).to_be_visible()
        assert await page.evaluate("window.pwned") is None


SPENDER = """
from cadenza import Agent

spender = Agent("spender")

@spender.handler
async def spend(task):
    task.record_usage(model="fast", input_tokens=45, output_tokens=15, cost=0.03)
    return {"step": task.step}

if __name__ == "__main__":
    spender.run()
"""

BUDGETED = """
---
apiVersion: cadenza.dev/v1alpha1
kind: Workflow
metadata: {name: capped}
spec:
  budget: {tokens: 100}
  steps:
    - {name: a, agent: spender}
    - {name: b, agent: spender, dependsOn: [a]}
    - {name: c, agent: spender, dependsOn: [b]}
"""


async def test_a_paused_run_shows_its_usage_and_resumes_with_a_new_budget(
    tmp_path: Path, nats_server: NatsServer, browser: Any
) -> None:
    manifests = agent_manifest("spender") + BUDGETED
    async with console_stack(tmp_path / "p", SPENDER, manifests, nats_server.url) as s:
        run = await s.client.start(s.workflow("capped"), {})
        page = await browser.new_page()
        await page.goto(f"{s.url}/runs/{s.namespace}/{run}")
        # a and b use 60 tokens each: c waits for a new budget.
        await expect(page.locator("#run-phase")).to_have_text("Paused", timeout=LIVE)
        await expect(page.locator("section.summary")).to_contain_text("90 in / 30 out tokens")
        await page.locator("input[name=tokens]").fill("1000")
        await page.get_by_role("button", name="Resume").click()
        await expect(page.locator(".notice.ok")).to_contain_text(
            f"resume of {run} requested with a budget of tokens 1000"
        )
        await expect(page.locator("#run-phase")).to_have_text("Succeeded", timeout=LIVE)
        await expect(page.locator("section.summary")).to_contain_text("135 in / 45 out tokens")
        await page.locator('details[data-step="c"] summary').click()
        await expect(page.locator('details[data-step="c"]')).to_contain_text("45 in / 15 out tokens")
