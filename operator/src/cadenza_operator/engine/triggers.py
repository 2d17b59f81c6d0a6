"""Workflow triggers: NATS subjects and cron schedules that start runs.

NATS triggers are durable: trigger subjects are captured by the JetStream stream
CADENZA_TRIGGERS, and each Workflow has its own durable consumer on it, so an alert
published while no engine runs still starts its run later. A `dedupKey` (CEL over
`event`) makes a repeated event start nothing: the key is claimed once in the triggers
bucket with a create (compare-and-swap), and the run id is derived from it.

Schedules keep a cursor (the last fire time) in the triggers bucket, advanced with CAS,
so several engines fire each tick once.

`concurrencyPolicy` decides what an event does while runs of the workflow are active:
Allow (start another, up to `maxActiveRuns`; beyond it the event waits), Forbid (skip
it), Replace (cancel the active runs, then start).

An event held back by maxActiveRuns is not poison: its handler keeps it (telling
JetStream it is in progress) and looks again every RETRY_WHEN_FULL seconds, so waiting
spends none of its bounded deliveries. An event that can never start a run (its dedupKey
or input mapping fails on it, or the input schema rejects it) is dead-lettered at once,
and the Workflow gets a Warning naming the trigger and the expression (a log line here;
the operator's `on_warning` hook makes it a Kubernetes Event). Any other failure (NATS
unavailable) is retried with a growing delay, and dead-lettered once the engine's
delivery limit (CADENZA_ENGINE_MAX_DELIVER) is spent.
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
from cadenza.nats import SERVER_DELIVERY_SLACK, PullConsumer, dead_letter, deliveries, stored_at
from cadenza.wire import dumps, loads

from .. import metrics
from ..expressions import Expr, ExpressionError, Template, compile_expr, compile_template
from .definition import CompiledWorkflow
from .infra import TRIGGERS_BUCKET
from .inputs import InputError
from .runtime import Engine, RunStarted, retry_delay

log = structlog.get_logger("cadenza.triggers")

TRIGGERS_STREAM = "CADENZA_TRIGGERS"
RETRY_WHEN_FULL = 2.0  # seconds before an event held back by maxActiveRuns is offered again
RESERVATION_SECONDS = 600.0
"""How long a run admitted by the concurrency policy but not started yet counts as active:
longer than its event can take to come back to an engine (redeliveries and their delays)."""


class TriggerProblem(Exception):
    """A trigger event that can never start a run, whatever its deliveries: dead-lettered.

    `reason` is the dead-letter reason (expression | input), `field` the trigger field
    (`spec.triggers[0].nats.dedupKey`), `expression` its source, `error` what went wrong.
    """

    def __init__(self, reason: str, field: str, expression: str, error: str) -> None:
        self.reason, self.field, self.expression, self.error = reason, field, expression, error
        what = f"{field} {expression!r}" if expression else field
        super().__init__(f"{what} failed on the event: {error}")


TriggerWarning = Callable[[CompiledWorkflow, TriggerProblem], Awaitable[None] | None]


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: `*` is one token, `>` one or more at the end."""
    want, have = pattern.split("."), subject.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(have) > i
        if i >= len(have) or (token != "*" and token != have[i]):
            return False
    return len(want) == len(have)


class _Route:
    """One NATS trigger of a workflow, compiled: which subjects, which key, which input."""

    def __init__(self, wf: CompiledWorkflow, index: int) -> None:
        nats = wf.spec.triggers[index].nats
        assert nats is not None
        self.subject = nats.subject
        self.path = f"spec.triggers[{index}].nats"
        self.dedup: Expr | None = (
            compile_expr(nats.dedupKey, f"{self.path}.dedupKey", frozenset({"event"}))
            if nats.dedupKey
            else None
        )
        self.input: Template | None = (
            compile_template(nats.input, f"{self.path}.input", frozenset({"event"}))
            if nats.input is not None
            else None
        )


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class Triggers:
    """Runs the triggers of a set of workflows against one engine."""

    def __init__(
        self,
        engine: Engine,
        on_started: RunStarted | None = None,
        on_warning: TriggerWarning | None = None,
    ) -> None:
        self.engine = engine
        self.js = engine.js
        self.on_started = on_started
        self.on_warning = on_warning
        self.kv: Any = None
        self._workflows: dict[str, CompiledWorkflow] = {}
        self._consumers: dict[str, PullConsumer] = {}
        self._schedules: dict[str, asyncio.Task[None]] = {}

    async def start(self) -> None:
        self.kv = await self.js.key_value(TRIGGERS_BUCKET)

    async def stop(self) -> None:
        for consumer in self._consumers.values():
            await _stop_consumer(consumer)
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
            await _stop_consumer(consumer)
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
                # Bounded like the engine's events; waiting for maxActiveRuns costs none.
                max_deliver=self.engine.settings.max_deliveries + SERVER_DELIVERY_SLACK,
            ),
        )
        routes = [_Route(wf, i) for i, t in enumerate(wf.spec.triggers) if t.nats]

        async def handle(msg: Any) -> None:
            count = deliveries(msg)
            if count > self.engine.settings.max_deliveries:
                await self._dead_letter(
                    wf, msg, f"delivered {count} times and never handled (see the engine logs)", "deliveries"
                )
                return
            try:
                while await self._on_message(wf, msg, routes) == "wait":
                    await msg.in_progress()  # held, not redelivered: no delivery spent
                    await asyncio.sleep(RETRY_WHEN_FULL)
            except asyncio.CancelledError:
                raise
            except TriggerProblem as problem:
                await self._poison(wf, msg, problem)
                return
            except Exception:
                log.exception("trigger failed; will be redelivered", workflow=wf.name, deliveries=count)
                with contextlib.suppress(Exception):
                    await msg.nak(delay=retry_delay(count))
                return
            await msg.ack()

        consumer = PullConsumer(self.engine.nc, TRIGGERS_STREAM, durable, handle, concurrency=1)
        await consumer.start()
        return consumer

    async def _poison(self, wf: CompiledWorkflow, msg: Any, problem: TriggerProblem) -> None:
        """An event that can never start a run: a Warning for the Workflow, then the dead letters."""
        log.warning(
            "trigger event dead-lettered",
            workflow=f"{wf.namespace}/{wf.name}",
            trigger=problem.field,
            expression=problem.expression,
            error=problem.error,
            subject=msg.subject,
        )
        if self.on_warning is not None:
            try:
                result = self.on_warning(wf, problem)
                if asyncio.iscoroutine(result):
                    await result
            except Exception:  # the warning is a courtesy; the dead letter is what counts
                log.warning("trigger warning hook failed", workflow=wf.name, exc_info=True)
        await self._dead_letter(wf, msg, f"{problem.reason}: {problem}", problem.reason)

    async def _dead_letter(self, wf: CompiledWorkflow, msg: Any, reason: str, kind: str) -> None:
        log.error("trigger event dead-lettered", workflow=wf.name, subject=msg.subject, reason=reason)
        metrics.child(metrics.DEAD_LETTERS, TRIGGERS_STREAM, kind).inc()
        try:
            await dead_letter(self.js, msg, TRIGGERS_STREAM, reason)
        except Exception:
            log.warning("dead-lettering failed; the event will come back", subject=msg.subject, exc_info=True)

    async def _on_message(self, wf: CompiledWorkflow, msg: Any, routes: list[_Route]) -> str:
        try:
            event = loads(msg.data) if msg.data else {}
        except ValueError:
            event = {"data": msg.data.decode(errors="replace")}
        seq = msg.metadata.sequence.stream
        route = next((r for r in routes if subject_matches(r.subject, msg.subject)), routes[0])
        # A trigger without a dedupKey of its own uses the workflow's first one (one per
        # workflow in practice).
        key_route = route if route.dedup is not None else next((r for r in routes if r.dedup), None)
        if key_route is not None and key_route.dedup is not None:
            try:
                key = str(key_route.dedup.evaluate({"event": event}))
            except ExpressionError as exc:
                raise TriggerProblem(
                    "expression", f"{key_route.path}.dedupKey", key_route.dedup.source, str(exc)
                ) from None
            run_id = f"{wf.name}-{_digest(key)[:10]}"
            claim = f"dedup.{wf.namespace}.{wf.name}.{_digest(key)}"
        else:
            key, run_id, claim = "", f"{wf.name}-t{seq}", ""
        if claim and await self._get(claim) is not None:
            log.info("duplicate trigger event ignored", workflow=wf.name, key=key)
            return "skip"
        # The run id is derived from the event, and starting is idempotent per run id, so
        # a crash anywhere here ends in exactly one run once the event is redelivered.
        if await self.engine.client.get(run_id) is None:
            run_input = event
            if route.input is not None:  # before admitting: an event that cannot start takes no place
                try:
                    run_input = route.input.render({"event": event})
                except ExpressionError as exc:
                    source = exc.path or f"{route.path}.input"
                    raise TriggerProblem("expression", source, _template_text(route, exc), str(exc)) from None
            admit = await self._admit(wf, run_id)
            if admit != "start":
                log.info(
                    "trigger event not started", workflow=wf.name, policy=wf.spec.concurrencyPolicy, why=admit
                )
                return admit
            try:
                await self.engine.client.start(
                    wf,
                    run_input,
                    run_id=run_id,
                    labels={"cadenza.dev/trigger": "nats"},
                    requested_at=stored_at(msg, time.time()),  # it may have waited for maxActiveRuns
                )
            except InputError as exc:
                await self._release(wf, run_id)
                raise TriggerProblem("input", "spec.inputSchema", "", str(exc)) from None
        if claim:
            with contextlib.suppress(Exception):  # already claimed by a racing engine: same run
                await self.kv.create(claim, dumps({"run": run_id, "at": time.time(), "key": key}))
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
        tracked = await self._get(_tracked_key(wf)) or {}
        return await self._still_active(tracked.get("runs", []), tracked.get("reserved", {}), time.time())

    async def _still_active(self, runs: list[str], reserved: dict[str, float], now: float) -> list[str]:
        """The tracked runs not finished: started and not terminal, or admitted and not
        started yet (for at most RESERVATION_SECONDS: an admission whose start never came)."""
        active = []
        for run in runs:
            state = await self.engine.client.get(run)
            admitted = now - reserved.get(run, 0.0) < RESERVATION_SECONDS  # and not started yet
            if (state is not None and not state.terminal) or (state is None and admitted):
                active.append(run)
        return active

    async def _admit(self, wf: CompiledWorkflow, run_id: str) -> str:
        """Whether run `run_id` may start under the workflow's concurrency policy; when it
        may, it is added to the tracked runs *before* it starts.

        Deciding and tracking are one compare-and-swap on the tracked key, retried on
        conflict: two engines admitting at once (each reading the runs active before the
        other's start) would otherwise both start under Forbid or past maxActiveRuns. A
        run admitted but not started (its engine died) holds its place only while its
        event can still come back (RESERVATION_SECONDS); when it does, the same run id is
        admitted again at once.
        """
        from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

        key = _tracked_key(wf)
        policy = wf.spec.concurrencyPolicy
        while True:
            try:
                entry = await self.kv.get(key)
            except KeyNotFoundError:
                entry = None
            tracked = loads(entry.value) if entry is not None and entry.value else {}
            runs, reserved = tracked.get("runs", []), tracked.get("reserved", {})
            if run_id in runs:
                return "start"  # admitted before: its event came back
            now = time.time()
            active = await self._still_active(runs, reserved, now)
            if active and policy == "Forbid":
                return "skip"
            if active and policy == "Replace":
                for run in active:
                    await self.engine.client.cancel(
                        wf.namespace, run, by="trigger", reason="replaced by a newer run"
                    )
            elif wf.spec.maxActiveRuns is not None and len(active) >= wf.spec.maxActiveRuns:
                return "wait"
            kept = {run: at for run, at in reserved.items() if run in active}
            value = dumps({"runs": [*active, run_id], "reserved": {**kept, run_id: now}})
            try:
                if entry is None:
                    await self.kv.create(key, value)
                else:
                    await self.kv.update(key, value, last=entry.revision)
                return "start"
            except KeyWrongLastSequenceError:
                continue  # another admission wrote first: decide again on what it wrote

    async def _release(self, wf: CompiledWorkflow, run_id: str) -> None:
        """Give back the place `_admit` gave a run that will never start."""
        from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

        key = _tracked_key(wf)
        while True:
            try:
                entry = await self.kv.get(key)
            except KeyNotFoundError:
                return
            tracked = loads(entry.value) if entry.value else {}
            if run_id not in tracked.get("runs", []):
                return
            tracked["runs"] = [run for run in tracked["runs"] if run != run_id]
            tracked.get("reserved", {}).pop(run_id, None)
            try:
                await self.kv.update(key, dumps(tracked), last=entry.revision)
                return
            except KeyWrongLastSequenceError:
                continue

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
                run_id = f"{wf.name}-s{int(fire)}"
                if await self._admit(wf, run_id) != "start":
                    continue
                await self.engine.client.start(
                    wf,
                    trigger.input if trigger.input is not None else {},
                    run_id=run_id,
                    labels={"cadenza.dev/trigger": "schedule"},
                    requested_at=fire,
                )
                if self.on_started is not None:
                    result = self.on_started(wf, run_id, {"source": "schedule", "at": fire})
                    if asyncio.iscoroutine(result):
                        await result
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("schedule trigger failed; retrying", workflow=wf.name)
                await asyncio.sleep(5)


def _tracked_key(wf: CompiledWorkflow) -> str:
    """The triggers-bucket key listing the runs a workflow's triggers started."""
    return f"runs.{wf.namespace}.{wf.name}"


def _template_text(route: _Route, exc: ExpressionError) -> str:
    """The source of the input-mapping expression that failed (its error names it)."""
    assert route.input is not None
    for expr in route.input.exprs:
        if repr(expr.source) in str(exc):
            return expr.source
    return ", ".join(e.source for e in route.input.exprs)


async def _stop_consumer(consumer: PullConsumer) -> None:
    """Stop pulling, and end the handlers still holding events for maxActiveRuns: they were
    not acknowledged, so JetStream offers them again (to this or another engine)."""
    await consumer.stop()
    for job in list(consumer.jobs):
        job.cancel()
