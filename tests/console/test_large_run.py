"""A run of 200 steps, one a forEach of 1,000 items, with several attempts each: its page
renders in Chromium with a node per step and stays bounded in size
(counts for the items, a capped timeline, outputs cut at 64 KiB)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import aiohttp
from cadenza.wire import dumps
from cadenza_operator.engine.definition import compile_workflow
from cadenza_operator.engine.state import Attempt, ForEachState, RunState, StepState
from cadenza_operator.local.nats_server import NatsServer
from cadenza_operator.models import WorkflowSpec
from cadenza_operator.observe.web import layout
from playwright.async_api import expect

from .conftest import console_stack

STEPS = 200
ATTEMPTS = 5  # per step: a record of 1,000 attempts stays under a KV value's 1 MiB
MAX_PAGE_BYTES = 2 * 1024 * 1024


def big_workflow(namespace: str) -> Any:
    # Ten chains of twenty: a wide and deep picture; the last step fans out over 1,000 items.
    steps: list[dict[str, Any]] = []
    for i in range(STEPS - 1):
        step: dict[str, Any] = {"name": f"step_{i:03d}", "agent": "worker"}
        if i >= 10:
            step["dependsOn"] = [f"step_{i - 10:03d}"]
        steps.append(step)
    steps.append(
        {"name": "each", "agent": "worker", "forEach": "input.items", "dependsOn": ["step_198"], "input": {}}
    )
    spec = WorkflowSpec.model_validate({"steps": steps})
    return compile_workflow("big", spec, namespace)


def big_record(wf: Any, run: str) -> RunState:
    now = time.time()
    steps = {}
    for i, name in enumerate(wf.order):
        if name == "each":
            steps[name] = StepState(
                phase="Running",
                forEach=ForEachState(
                    total=1000, next=600, counts={"Succeeded": 537, "Failed": 3}, retries=12
                ),
                outputRef=f"{run}.each.*",
            )
            continue
        attempts = [
            Attempt(
                n=n,
                readyAt=now - 100 + i * 0.1,
                queuedAt=now - 99 + i * 0.1,
                startedAt=now - 98 + i * 0.1,
                finishedAt=now - 97 + i * 0.1,
                outcome="Failed" if n < ATTEMPTS else "Succeeded",
                error={"type": "Boom", "message": "boom"} if n < ATTEMPTS else None,
            )
            for n in range(1, ATTEMPTS + 1)
        ]
        steps[name] = StepState(
            phase="Succeeded", attempt=ATTEMPTS, attempts=attempts, output={"text": "y" * 100}
        )
    return RunState(
        run=run,
        namespace=wf.namespace,
        workflow=wf.name,
        definition=wf.key,
        phase="Running",
        createdAt=now - 100,
        startedAt=now - 100,
        steps=steps,
        inputRef=f"{run}.input",  # a large input is kept apart
    )


async def test_a_200_step_run_with_1000_items_renders_bounded(
    tmp_path: Path, nats_server: NatsServer, browser: Any
) -> None:
    async with console_stack(tmp_path / "p", "", "", nats_server.url) as s:
        wf = big_workflow(s.namespace)
        await s.client.publish_definition(wf)
        run = "big-0001"
        # The record as an engine would have written it (no engine runs it: no event is sent).
        await s.client.kv.put(run, big_record(wf, run).to_bytes())
        await s.client.outputs_kv.put(
            f"{run}.input", dumps({"items": list(range(1000)), "blob": "z" * 200_000})
        )
        for i in range(540):  # the items that finished have their outputs apart
            await s.client.outputs_kv.put(f"{run}.each.{i}", dumps({"item": i, "text": "w" * 300}))
        url = f"{s.url}/runs/{s.namespace}/{run}"
        async with aiohttp.ClientSession() as http:
            page_html = await (await http.get(url)).text()
            live_html = await (await http.get(url + "/live")).text()
        assert len(page_html.encode()) < MAX_PAGE_BYTES, len(page_html)
        assert len(live_html.encode()) < MAX_PAGE_BYTES
        omitted = (STEPS - 1) * ATTEMPTS - layout.MAX_BARS
        assert f"{omitted} more attempts not drawn" in page_html
        assert "truncated: first 64 KiB" in page_html  # the run's input (200 kB)

        page = await browser.new_page(viewport={"width": 1400, "height": 1000})
        await page.goto(url)
        await expect(page.locator("svg.dag g.node")).to_have_count(STEPS)
        each = page.locator('svg.dag g.node[data-step="each"]')
        await expect(each).to_have_attribute("data-phase", "Running")
        await expect(each.locator(".detail")).to_have_text("540/1000")
        await expect(page.locator("svg.timeline g.bar")).to_have_count(layout.MAX_BARS)
        await expect(page.locator('details[data-step="each"] summary')).to_contain_text("items 540/1000")
