"""Trigger events that can never start a run are dead-lettered once, with a Warning; events
held back by maxActiveRuns are not poison (real nats-server, engine and triggers)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
import structlog
from cadenza_operator.engine import triggers as triggers_module
from cadenza_operator.engine.client import RunClient
from cadenza_operator.engine.triggers import TRIGGERS_STREAM
from cadenza_operator.local.dev import DevServer
from cadenza_operator.local.nats_server import NatsServer
from cadenza_operator.manifests import load
from prometheus_client import REGISTRY

from .harness import poll, unique_namespace, write_project

# No agent: an approval step keeps each run alive (and active) without agent processes.
WORKFLOW = """
apiVersion: cadenza.dev/v1alpha1
kind: Workflow
metadata: {{name: {name}}}
spec:
  triggers:
    - nats: {trigger}
  {extra}
  steps:
    - name: gate
      approval: {{message: "ticket ${{{{ input.ticket }}}}"}}
"""


@pytest.fixture
def captured() -> Iterator[list[dict[str, Any]]]:
    """The triggers' structlog records (a logger bound inside capture_logs, so caching of an
    earlier one does not hide them)."""
    with structlog.testing.capture_logs() as logs:
        saved = triggers_module.log
        triggers_module.log = structlog.get_logger("cadenza.triggers")
        try:
            yield logs
        finally:
            triggers_module.log = saved


async def _dead_letters(js: Any, subject: str) -> list[dict[str, Any]]:
    from cadenza_operator.engine.deadletters import read_dead_letters

    return [d for d in await read_dead_letters(js) if d["subject"] == subject]


def _dead_letters_counted(reason: str) -> float:
    value = REGISTRY.get_sample_value(
        "cadenza_dead_letters_total", {"source": TRIGGERS_STREAM, "reason": reason}
    )
    return value or 0.0


async def _poison_then_good(
    tmp_path: Path,
    url: str,
    trigger: str,
    bad: dict[str, Any],
    good: dict[str, Any],
    captured: list[dict[str, Any]],
    expression: str,
    field: str,
) -> dict[str, Any]:
    namespace = unique_namespace()
    subject = f"alerts.{namespace}"
    name = "paged"
    root = write_project(
        tmp_path / "p",
        "",
        WORKFLOW.format(name=name, trigger=trigger.replace("SUBJECT", subject), extra=""),
    )
    bundle = load([root], namespace=namespace)
    counted = _dead_letters_counted("expression")
    async with DevServer(bundle, url, namespace) as dev:
        nc = await nats.connect(dev.url)
        js = nc.jetstream()
        try:
            await js.publish(subject, json.dumps(bad).encode())
            await js.publish(subject, json.dumps(good).encode())
            assert dev.triggers is not None
            wf = bundle.compiled[name]
            runs = await poll(lambda: dev.triggers.active_runs(wf))  # type: ignore[union-attr]
            assert len(runs) == 1
            state = await poll(lambda: dev.engine.client.get(runs[0]))

            letters = await poll(lambda: _dead_letters(js, subject))
            # The good event started its run; the bad one is in the dead letters, once.
            info = await js.consumer_info(TRIGGERS_STREAM, f"trigger_{namespace}_{name}")
            assert info.num_ack_pending == 0 and info.num_pending == 0
            assert info.num_redelivered == 0
            assert info.delivered.consumer_seq == 2  # one delivery each: no retry of the bad one
            assert len(await _dead_letters(js, subject)) == 1
        finally:
            await nc.close()
    letter = letters[0]
    assert letter["source"] == TRIGGERS_STREAM
    assert letter["reason"].startswith("expression:")
    assert expression in letter["reason"] and field in letter["reason"]
    assert json.loads(letter["data"]) == bad  # the original message, unchanged
    assert _dead_letters_counted("expression") == counted + 1
    warnings = [r for r in captured if r["log_level"] == "warning" and r.get("trigger") == field]
    assert len(warnings) == 1, captured
    assert warnings[0]["workflow"] == f"{namespace}/{name}"
    assert warnings[0]["expression"] == expression
    assert "no such key" in warnings[0]["error"]
    return state.input  # type: ignore[no-any-return]


async def test_a_dedup_key_that_fails_dead_letters_the_event_once(
    tmp_path: Path, nats_server: NatsServer, captured: list[dict[str, Any]]
) -> None:
    run_input = await _poison_then_good(
        tmp_path,
        nats_server.url,
        '{subject: "SUBJECT", dedupKey: "event.ticket.id"}',
        bad={"other": 1},
        good={"ticket": {"id": "T-1"}},
        captured=captured,
        expression="event.ticket.id",
        field="spec.triggers[0].nats.dedupKey",
    )
    assert run_input == {"ticket": {"id": "T-1"}}


async def test_an_input_mapping_that_fails_dead_letters_the_event_once(
    tmp_path: Path, nats_server: NatsServer, captured: list[dict[str, Any]]
) -> None:
    run_input = await _poison_then_good(
        tmp_path,
        nats_server.url,
        '{subject: "SUBJECT", input: {ticket: "${{ event.ticket.id }}", source: nats}}',
        bad={"other": 1},
        good={"ticket": {"id": "T-2"}},
        captured=captured,
        expression="event.ticket.id",
        field="spec.triggers[0].nats.input",
    )
    assert run_input == {"ticket": "T-2", "source": "nats"}


async def test_an_event_held_back_by_max_active_runs_is_not_poison(
    tmp_path: Path, fresh_nats: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With two deliveries allowed, an event waiting for a run slot longer than two retry
    periods still starts its run when the slot frees, and nothing is dead-lettered."""
    monkeypatch.setenv("CADENZA_ENGINE_MAX_DELIVER", "2")
    monkeypatch.setattr(triggers_module, "RETRY_WHEN_FULL", 0.2)
    namespace = unique_namespace()
    subject = f"alerts.{namespace}"
    root = write_project(
        tmp_path / "p",
        "",
        WORKFLOW.format(name="serial", trigger=f'{{subject: "{subject}"}}', extra="maxActiveRuns: 1"),
    )
    bundle = load([root], namespace=namespace)
    async with DevServer(bundle, fresh_nats.url, namespace) as dev:
        nc = await nats.connect(dev.url)
        js = nc.jetstream()
        try:
            wf = bundle.compiled["serial"]
            assert dev.triggers is not None
            await js.publish(subject, json.dumps({"ticket": 1}).encode())
            first = (await poll(lambda: dev.triggers.active_runs(wf)))[0]  # type: ignore[union-attr]
            await js.publish(subject, json.dumps({"ticket": 2}).encode())
            consumer = f"trigger_{namespace}_serial"
            # Held through ten re-checks, far more than the two deliveries allowed.
            await asyncio.sleep(10 * triggers_module.RETRY_WHEN_FULL)
            info = await js.consumer_info(TRIGGERS_STREAM, consumer)
            assert info.num_ack_pending == 1 and info.num_redelivered == 0
            assert await dev.triggers.active_runs(wf) == [first]
            await RunClient(nc).approve(namespace, first, "gate", True, by="test")

            async def second_run() -> list[str]:
                return [r for r in await dev.triggers.active_runs(wf) if r != first]  # type: ignore[union-attr]

            await poll(second_run)
            info = await js.consumer_info(TRIGGERS_STREAM, consumer)
            assert info.num_redelivered == 0
            assert await _dead_letters(js, subject) == []
        finally:
            await nc.close()


async def test_approval_message_is_rendered_in_status_and_audit(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    from cadenza_operator.engine.audit import read_audit

    namespace = unique_namespace()
    subject = f"alerts.{namespace}"
    root = write_project(
        tmp_path / "p", "", WORKFLOW.format(name="asks", trigger=f'{{subject: "{subject}"}}', extra="")
    )
    bundle = load([root], namespace=namespace)
    async with DevServer(bundle, nats_server.url, namespace) as dev:
        nc = await nats.connect(dev.url)
        js = nc.jetstream()
        try:
            await js.publish(subject, json.dumps({"ticket": "T-9"}).encode())
            wf = bundle.compiled["asks"]
            run = (await poll(lambda: dev.triggers.active_runs(wf)))[0]  # type: ignore[union-attr]

            async def waiting() -> Any:
                state = await dev.engine.client.get(run)
                return state if state and state.steps["gate"].phase == "WaitingApproval" else None

            state = await poll(waiting)
            assert state.steps["gate"].message == "ticket T-9"
            records = await read_audit(js, namespace, run)
            assert any(r["to"] == "WaitingApproval" and r["reason"] == "ticket T-9" for r in records)
        finally:
            await nc.close()
