"""Workflow triggers: NATS subjects and cron schedules that start runs.

NATS triggers are durable: trigger subjects are captured by the JetStream stream
CADENZA_TRIGGERS, and each Workflow has its own durable consumer on it, so an alert
published while no engine runs still starts its run later. A `dedupKey` (CEL over
`event`) makes a repeated event start nothing: the key is claimed once in the triggers
bucket with a create (compare-and-swap), and the run id is derived from it.

Schedules keep a cursor (the last fire time) in the triggers bucket, advanced with CAS,
so several engines fire each tick once.

`concurrencyPolicy` decides what an event does while runs of the workflow are active:
Allow (start another, up to `maxActiveRuns`; beyond it the event waits and is
redelivered), Forbid (skip it), Replace (cancel the active runs, then start).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import structlog
from cadenza._protocol import dumps, loads
from cadenza._pull import PullConsumer

from ..expressions import compile_expr
from .client import send_cancel
from .definition import CompiledWorkflow
from .infra import TRIGGERS_BUCKET
from .runtime import Engine, InputError

log = structlog.get_logger("cadenza.triggers")

TRIGGERS_STREAM = "CADENZA_TRIGGERS"
RETRY_WHEN_FULL = 2.0  # seconds before an event held back by maxActiveRuns is offered again

RunStarted = Callable[[CompiledWorkflow, str, dict[str, Any]], Awaitable[None] | None]


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class Triggers:
    """Runs the triggers of a set of workflows against one engine."""

    def __init__(self, engine: Engine, on_started: RunStarted | None = None) -> None:
        self.engine = engine
        self.js = engine.js
        self.on_started = on_started
        self.kv: Any = None
        self._workflows: dict[str, CompiledWorkflow] = {}
        self._consumers: dict[str, PullConsumer] = {}
        self._schedules: dict[str, asyncio.Task[None]] = {}

    async def start(self) -> None:
        self.kv = await self.js.key_value(TRIGGERS_BUCKET)

    async def stop(self) -> None:
        for consumer in self._consumers.values():
            await consumer.stop()
        for task in self._schedules.values():
            task.cancel()
        self._consumers.clear()
        self._schedules.clear()

    async def set_workflow(self, wf: CompiledWorkflow) -> None:
        """Start (or restart with the new definition) the triggers of one workflow."""
        await self.remove_workflow(wf.namespace, wf.name)
        ident = f"{wf.namespace}.{wf.name}"
        self._workflows[ident] = wf
        subjects = [t.nats.subject for t in wf.spec.triggers if t.nats]
        if subjects:
            await self._ensure_stream(subjects)
            self._consumers[ident] = await self._consume(wf, subjects)
        for index, trigger in enumerate(wf.spec.triggers):
            if trigger.schedule:
                task = asyncio.get_running_loop().create_task(self._schedule_loop(wf, index))
                self._schedules[f"{ident}.{index}"] = task

    async def remove_workflow(self, namespace: str, name: str) -> None:
        ident = f"{namespace}.{name}"
        self._workflows.pop(ident, None)
        consumer = self._consumers.pop(ident, None)
        if consumer:
            await consumer.stop()
        for key in [k for k in self._schedules if k.startswith(f"{ident}.")]:
            self._schedules.pop(key).cancel()

    # ----------------------------------------------------------------- NATS
    async def _ensure_stream(self, subjects: list[str]) -> None:
        from nats.js.api import RetentionPolicy, StorageType, StreamConfig

        try:
            info = await self.js.stream_info(TRIGGERS_STREAM)
            current = list(info.config.subjects or [])
        except Exception:
            current = []
        wanted = sorted(set(current) | set(subjects))
        cfg = StreamConfig(
            name=TRIGGERS_STREAM,
            subjects=wanted,
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            max_age=7 * 86400.0,
            duplicate_window=600.0,
        )
        if not current:
            await self.js.add_stream(cfg)
        elif wanted != sorted(current):
            await self.js.update_stream(cfg)

    async def _consume(self, wf: CompiledWorkflow, subjects: list[str]) -> PullConsumer:
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        durable = f"trigger_{wf.namespace}_{wf.name}"
        with contextlib.suppress(Exception):
            await self.js.delete_consumer(TRIGGERS_STREAM, durable)  # subjects may have changed
        await self.js.add_consumer(
            TRIGGERS_STREAM,
            ConsumerConfig(
                durable_name=durable,
                filter_subjects=subjects,
                ack_policy=AckPolicy.EXPLICIT,
                deliver_policy=DeliverPolicy.NEW,
                ack_wait=30,
                max_deliver=-1,
            ),
        )
        dedup = [
            compile_expr(t.nats.dedupKey, allowed=frozenset({"event"}))
            if t.nats and t.nats.dedupKey
            else None
            for t in wf.spec.triggers
            if t.nats
        ]
        # One dedupKey per workflow in practice; the first one that is set applies.
        key_expr = next((d for d in dedup if d is not None), None)

        async def handle(msg: Any) -> None:
            try:
                decision = await self._on_message(wf, msg, key_expr)
            except Exception:
                log.exception("trigger failed", workflow=wf.name)
                await msg.nak(delay=RETRY_WHEN_FULL)
                return
            if decision == "wait":
                await msg.nak(delay=RETRY_WHEN_FULL)
            else:
                await msg.ack()

        consumer = PullConsumer(self.engine.nc, TRIGGERS_STREAM, durable, handle, concurrency=1)
        await consumer.start()
        return consumer

    async def _on_message(self, wf: CompiledWorkflow, msg: Any, key_expr: Any) -> str:
        try:
            event = loads(msg.data) if msg.data else {}
        except ValueError:
            event = {"data": msg.data.decode(errors="replace")}
        seq = msg.metadata.sequence.stream
        if key_expr is not None:
            key = str(key_expr.evaluate({"event": event}))
            run_id = f"{wf.name}-{_digest(key)[:10]}"
            claim = f"dedup.{wf.namespace}.{wf.name}.{_digest(key)}"
        else:
            key, run_id, claim = "", f"{wf.name}-t{seq}", ""
        if claim and await self._get(claim) is not None:
            log.info("duplicate trigger event ignored", workflow=wf.name, key=key)
            return "skip"
        # The run id is derived from the event, and starting is idempotent per run id, so
        # a crash anywhere here ends in exactly one run once the event is redelivered.
        if await self.engine.get_run(run_id) is None:
            admit = await self._admit(wf)
            if admit != "start":
                log.info(
                    "trigger event not started", workflow=wf.name, policy=wf.spec.concurrencyPolicy, why=admit
                )
                return admit
            try:
                await self.engine.start_run(wf, event, run_id=run_id, labels={"cadenza.dev/trigger": "nats"})
            except InputError as exc:
                log.warning("trigger event rejected by the input schema", workflow=wf.name, error=str(exc))
                return "skip"
        if claim:
            with contextlib.suppress(Exception):  # already claimed by a racing engine: same run
                await self.kv.create(claim, dumps({"run": run_id, "at": time.time(), "key": key}))
        await self._track(wf, run_id)
        if self.on_started is not None:
            result = self.on_started(wf, run_id, {"source": "nats", "subject": msg.subject, "key": key})
            if asyncio.iscoroutine(result):
                await result
        return "start"

    # ------------------------------------------------------------- policies
    async def _get(self, key: str) -> dict[str, Any] | None:
        from nats.js.errors import KeyNotFoundError

        try:
            entry = await self.kv.get(key)
        except KeyNotFoundError:
            return None
        return loads(entry.value) if entry.value else None

    async def active_runs(self, wf: CompiledWorkflow) -> list[str]:
        tracked = (await self._get(f"runs.{wf.namespace}.{wf.name}") or {}).get("runs", [])
        active = []
        for run in tracked:
            state = await self.engine.get_run(run)
            if state is None or not state.terminal:
                active.append(run)
        return active

    async def _track(self, wf: CompiledWorkflow, run_id: str) -> None:
        active = await self.active_runs(wf)
        await self.kv.put(f"runs.{wf.namespace}.{wf.name}", dumps({"runs": [*active, run_id]}))

    async def _admit(self, wf: CompiledWorkflow) -> str:
        active = await self.active_runs(wf)
        policy = wf.spec.concurrencyPolicy
        if active and policy == "Forbid":
            return "skip"
        if active and policy == "Replace":
            for run in active:
                await send_cancel(self.js, wf.namespace, run, by="trigger", reason="replaced by a newer run")
            return "start"
        if wf.spec.maxActiveRuns is not None and len(active) >= wf.spec.maxActiveRuns:
            return "wait"
        return "start"

    # ------------------------------------------------------------ schedules
    async def _schedule_loop(self, wf: CompiledWorkflow, index: int) -> None:
        from croniter import croniter
        from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

        trigger = wf.spec.triggers[index].schedule
        assert trigger is not None
        cursor_key = f"sched.{wf.namespace}.{wf.name}.{index}"
        while True:
            try:
                try:
                    entry = await self.kv.get(cursor_key)
                    last, revision = float(loads(entry.value)["last"]), entry.revision
                except KeyNotFoundError:
                    last, revision = time.time(), None
                    await self.kv.create(cursor_key, dumps({"last": last}))
                    continue
                fire = croniter(trigger.cron, datetime.fromtimestamp(last, UTC)).get_next(float)
                await asyncio.sleep(max(0.0, fire - time.time()))
                try:
                    await self.kv.update(cursor_key, dumps({"last": fire}), last=revision)
                except KeyWrongLastSequenceError:
                    continue  # another engine fired this tick
                if await self._admit(wf) != "start":
                    continue
                run_id = f"{wf.name}-s{int(fire)}"
                await self.engine.start_run(
                    wf,
                    trigger.input if trigger.input is not None else {},
                    run_id=run_id,
                    labels={"cadenza.dev/trigger": "schedule"},
                )
                await self._track(wf, run_id)
                if self.on_started is not None:
                    result = self.on_started(wf, run_id, {"source": "schedule", "at": fire})
                    if asyncio.iscoroutine(result):
                        await result
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("schedule trigger failed; retrying", workflow=wf.name)
                await asyncio.sleep(5)
