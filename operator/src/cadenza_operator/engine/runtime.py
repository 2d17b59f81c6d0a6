"""The engine's I/O edge: the event loop (docs/architecture.md) around the pure `decide`.

For each event: load the run (JetStream KV, with its revision) -> decide -> store large
outputs -> write the run with compare-and-swap -> carry out the commands (tasks with a
deterministic Nats-Msg-Id, audit records, child runs, cancellations, timers) -> ack.

Crash safety: the commands of a decision are written *in* the run record (its outbox)
by the same CAS write. Whoever loads a run it did not write itself carries out that
outbox again before deciding anything new; every command is idempotent (Nats-Msg-Id),
so a crash anywhere between the write and the ack loses nothing and doubles nothing.

Throughput: events of one run are handled by one task at a time and batched: results
that arrive together (a fan-in) cost one load and one write, not one each.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

import structlog
from cadenza import protocol
from cadenza.nats import (
    Publisher,
    PullConsumer,
    claim_attempt,
    dead_letter,
    deliveries,
    give_up_attempt,
    offload_payload,
    resolve_payload,
    send_give_up_attempt,
    stored_at,
)
from cadenza.protocol import (
    AttemptEvent,
    Event,
    FailedEvent,
    RunPhase,
    StartEvent,
    StepPhase,
    TaskFailure,
    TimerEvent,
)
from cadenza.wire import (
    CLAIMS_BUCKET,
    EVENTS_STREAM,
    OFFLOAD_BYTES,
    OUTPUTS_BUCKET,
    REF_KEY,
    RUN_STATUS_BUCKET,
    RUNS_BUCKET,
    TASKS_STREAM,
    audit_subject,
    claim_key,
    dumps,
    event_source,
    event_subject,
    is_ref,
    loads,
    run_status_key,
    task_id,
)
from pydantic import ValidationError

from .. import metrics
from . import commands, provenance
from .client import DefinitionNotFound, RunClient
from .control import ControlResponder
from .decide import OBJECT_REF_PREFIX, Decision, MissingOutputs, decide, outbox
from .definition import CompiledWorkflow
from .infra import (
    ENGINE_CONSUMER,
    TIMERS_BUCKET,
    TRIGGERS_BUCKET,
    current_entries,
    ensure_infrastructure,
)
from .payloads import fit_record, store_apart
from .provenance import step_agent
from .run_status import has_budget, run_status
from .settings import EngineSettings
from .state import RUN_ID, RunState
from .tracing import Tracer, traceparent

log = structlog.get_logger("cadenza.engine")

INLINE_INPUT_BYTES = 16 * 1024
"""Run inputs larger than this are kept apart from the run record."""

StateListener = Callable[[RunState], Awaitable[None] | None]
RunStarted = Callable[[CompiledWorkflow, str, dict[str, Any]], Awaitable[None] | None]
"""Told of a run this process started on someone's behalf: (its workflow, its run id, how it
started: `{"source": "nats"|"schedule", ...}` from a trigger, `{"source": "retry", "retryOf":
RUN, "from": STEP|None, "by": WHO}` from a retry asked of the engine). The operator hands one
in, to mirror such runs as WorkflowRuns; the engine knows nothing of Kubernetes."""
Operation = Callable[[RunClient, dict[str, Any]], Awaitable[dict[str, Any]]]
"""A control operation the hosting process adds (`Engine.operations`): given the engine's
client and the request (its `namespace` the one it came on), the answer. The diagnose
report is one: observe/ computes it, and the engine does not import observe/."""


EVENT_TYPES = frozenset(
    {"start", "cancel", "signal", "approval", "started", "heartbeat", "result", "failed", "timer", "context"}
)
"""A run id is one key of the runs bucket and one token of a subject: no wildcards,
no dots at the start, nothing a KV key refuses."""


class PermanentEventError(Exception):
    """An event that can never be applied, however often it is delivered: dead-lettered."""


def parse_event(data: bytes) -> Event:
    """An event as the engine handles it, validated once (cadenza.protocol), or
    PermanentEventError saying what is wrong."""
    try:
        event = protocol.parse_event(data)
    except ValueError:
        raise PermanentEventError(_what_is_wrong(data)) from None
    if not RUN_ID.match(event.run):
        raise PermanentEventError(_what_is_wrong(data))
    return event


def _what_is_wrong(data: bytes) -> str:
    """Why `data` is not an event, in the words the dead letter keeps."""
    try:
        event = loads(data)
    except ValueError as exc:
        raise PermanentEventError(f"malformed event: not JSON ({exc})") from None
    if not isinstance(event, dict):
        raise PermanentEventError(f"malformed event: a JSON {type(event).__name__}, not an object")
    run, kind = event.get("run"), event.get("type")
    if not isinstance(run, str) or not RUN_ID.match(run):
        raise PermanentEventError(f"malformed event: 'run' is {run!r}, not a run id")
    if kind not in EVENT_TYPES:
        return f"malformed event: unknown type {kind!r}"
    try:
        protocol.parse_event(data)
    except ValidationError as exc:
        where = ".".join(str(part) for part in exc.errors()[0]["loc"][1:])
        return f"malformed event: {where}: {exc.errors()[0]['msg']}"
    return "malformed event"


def ns_of(subject: str) -> str:
    """The namespace token of an event subject (a bounded metric label: namespaces exist)."""
    source = event_source(subject)
    return source[0] if source is not None else ""


def _audit_forged(
    decision: Decision, wf: CompiledWorkflow, rejected: Iterable[tuple[Any, Event, str]], now: float
) -> None:
    """Add an audit record for each rejected event to `decision` (committed with it): the
    run's trail names who claimed the attempt and whose it is; nothing else changes."""
    state = decision.state
    for msg, ev, why in rejected:
        source = event_source(msg.subject)
        step = getattr(ev, "step", None)
        state.auditSeq += 1
        decision.audit.append(
            {
                "seq": state.auditSeq,
                "run": state.run,
                "workflow": state.workflow,
                "namespace": state.namespace,
                "step": step if isinstance(step, str) else None,
                "event": ev.type,
                "from": None,
                "to": None,
                "reason": f"forged {ev.type} rejected: {why}",
                "actor": f"agent:{source[2]}" if source and source[2] else msg.subject,
                "at": now,
                "forged": True,
                "claimedAgent": source[2] if source else None,
                "agent": step_agent(wf, step),
                "attempt": getattr(ev, "attempt", None),
                "worker": getattr(ev, "worker", None),
            }
        )
        decision.changed = True


def retry_delay(deliveries: int) -> float:
    """Seconds before an event that could not be handled comes back: doubling, so that a
    failure that lasts (NATS restarting, a start not yet written) spends few of its
    bounded deliveries, and one that passes (a conflict) costs little time."""
    return min(30.0, 0.5 * 2.0 ** min(deliveries, 16))


@dataclass
class _Cached:
    data: bytes
    revision: int
    executed: bool  # this engine carried out the record's outbox
    state: RunState | None = None  # `data` parsed, while no decision has touched it
    memo: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)


class Engine:
    """Executes workflow runs. Several engines may share one NATS: CAS keeps them apart."""

    def __init__(self, nc: Any, settings: EngineSettings | None = None) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.pub = Publisher(nc)  # the hot path's publishes and KV writes
        self.settings = settings or EngineSettings()
        self.client = RunClient(nc, max_value_bytes=self.settings.max_value_bytes, publisher=self.pub)
        """Starts child runs; reads definitions and run outputs for this engine."""
        self._cache: OrderedDict[str, _Cached] = OrderedDict()
        self._queues: dict[str, list[tuple[Any, Event]]] = {}  # run -> (message, parsed event)
        self._workers: dict[str, asyncio.Task[Any]] = {}  # run -> the task processing it
        self._timers: dict[tuple[str, str], tuple[asyncio.TimerHandle, float]] = {}
        self._timer_revisions: OrderedDict[str, int] = OrderedDict()  # run -> record revision scheduled
        self._statuses: OrderedDict[str, tuple[bytes, int]] = OrderedDict()  # run -> status written, at
        self._listeners: list[StateListener] = []
        self.on_run_started: RunStarted | None = None
        """Called after the control responder starts a retry (see `RunStarted`)."""
        self.operations: dict[str, Operation] = {}
        """Control operations beyond the engine's own, by name (see `Operation`)."""
        self._consumer: PullConsumer | None = None
        self._timer_watch: asyncio.Task[None] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._control: ControlResponder | None = None  # answers `cadenza approve|signal|cancel`
        self._background: set[asyncio.Task[Any]] = set()
        self.tracer = Tracer.from_env()
        """Makes the spans of committed decisions (engine/tracing.py); None: traces are off."""
        self.kv: Any = None
        self.outputs_kv: Any = None
        self.defs_kv: Any = None
        self.timers_kv: Any = None
        self.claims_kv: Any = None

    # ------------------------------------------------------------------ lifecycle
    async def open(self) -> None:
        """Create or update the infrastructure, then open the buckets (no consuming yet)."""
        await ensure_infrastructure(
            self.js,
            engine_ack_wait=self.settings.ack_wait,
            engine_max_deliveries=self.settings.max_deliveries,
            logs_max_age=self.settings.logs_max_age,
            logs_max_bytes=self.settings.logs_max_bytes,
        )
        await self.client.open()
        self.kv = self.client.kv
        self.outputs_kv = self.client.outputs_kv
        self.defs_kv = self.client.defs_kv
        self.timers_kv = await self.js.key_value(TIMERS_BUCKET)
        self.claims_kv = await self.js.key_value(CLAIMS_BUCKET)

    async def start(self) -> None:
        """Open the buckets (unless open already) and start executing: consume events, fire timers."""
        if self.kv is None:
            await self.open()
        self._timer_watch = asyncio.get_running_loop().create_task(self._watch_timers())
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())
        self._consumer = PullConsumer(
            self.nc, EVENTS_STREAM, ENGINE_CONSUMER, self._on_event, concurrency=self.settings.concurrency
        )
        await self._consumer.start()
        self._control = ControlResponder(self)
        await self._control.start()
        log.info("engine started", engine=self.settings.name)

    async def stop(self) -> None:
        if self._control:
            await self._control.stop()
        if self._consumer:
            await self._consumer.stop()
        for task in (self._timer_watch, self._sweeper):
            if task:
                task.cancel()
        for handle, _ in self._timers.values():
            handle.cancel()
        self._timers.clear()
        workers = list(self._workers.values()) + list(self._background)
        for w in workers:
            w.cancel()
        if workers:
            await asyncio.wait(workers, timeout=5)
        await self.pub.close()
        if self.tracer is not None:
            await asyncio.to_thread(self.tracer.flush)  # what is queued is sent (and it may start again)

    def on_state(self, listener: StateListener) -> None:
        """Call `listener` with every run state this engine writes.

        The engine goes on working on that object: copy what you keep past the call.
        """
        self._listeners.append(listener)

    # --------------------------------------------------------------- definitions
    async def _definition(self, key: str) -> CompiledWorkflow:
        """A run's definition; one no engine published can never be executed."""
        try:
            return await self.client.definition(key)
        except DefinitionNotFound as exc:
            raise PermanentEventError(str(exc)) from None

    # -------------------------------------------------------------------- events
    async def _on_event(self, msg: Any) -> None:
        """Hand an event to its run's worker; with none, become it.

        The consumer's task that brings a run's first event processes the run until its
        queue is empty: no task per event, and the consumer's budget (`concurrency`)
        bounds the runs being processed, so an overloaded engine stops pulling.
        """
        try:
            event = parse_event(msg.data)
        except PermanentEventError as exc:
            await self._dead_letter(msg, str(exc), "malformed")
            return
        count = deliveries(msg)
        if count > self.settings.max_deliveries:
            await self._dead_letter(
                msg, f"delivered {count} times and never handled (see the engine logs)", "deliveries"
            )
            return
        run = event.run
        queue = self._queues.get(run)
        if queue is not None:  # the run's worker takes it with its next batch
            queue.append((msg, event))
            return
        self._queues[run] = [(msg, event)]
        worker = asyncio.current_task()
        if worker is not None:
            self._workers[run] = worker
        try:
            await self._run_worker(run)
        finally:
            self._workers.pop(run, None)

    async def _run_worker(self, run: str) -> None:
        try:
            while batch := self._queues[run]:
                self._queues[run] = []
                try:
                    await self._process(run, batch)
                except asyncio.CancelledError:
                    raise
                except PermanentEventError as exc:
                    self._cache.pop(run, None)
                    for msg, _ in batch:
                        await self._dead_letter(msg, f"run {run}: {exc}", "definition")
                except Exception:
                    log.exception("event processing failed; will be redelivered", run=run)
                    self._cache.pop(run, None)
                    for msg, _ in batch:
                        with contextlib.suppress(Exception):
                            await msg.nak(delay=retry_delay(deliveries(msg)))
        finally:
            # Checked empty and removed with no await in between: an event that arrives
            # later finds no queue and starts a worker of its own.
            del self._queues[run]

    async def _await_start(self, run: str, msgs: list[Any]) -> None:
        """Events for a run with no record and no start among them: handed back for later.

        With several engines, a run's start and an event sent right after it (a signal,
        an approval, a cancel) are handled at once by two engines: the event may come
        before the start's record is written. Acknowledging it would lose it for good;
        it comes back with a growing delay, and is dead-lettered only once its
        deliveries are spent (a run that truly does not exist).
        """
        for msg in msgs:
            count = deliveries(msg)
            if count >= self.settings.max_deliveries:
                await self._dead_letter(msg, f"run {run} does not exist ({count} deliveries)", "unknown-run")
            else:
                log.info("event for a run not started yet; will look again", run=run, deliveries=count)
                with contextlib.suppress(Exception):
                    await msg.nak(delay=retry_delay(count))

    async def _dead_letter(self, msg: Any, reason: str, kind: str) -> None:
        log.error("event dead-lettered", subject=msg.subject, reason=reason)
        metrics.child(metrics.DEAD_LETTERS, EVENTS_STREAM, kind).inc()
        try:
            await dead_letter(self.js, msg, EVENTS_STREAM, reason)
        except Exception:
            log.warning("dead-lettering failed; the event will come back", subject=msg.subject, exc_info=True)

    async def _load(self, run: str) -> _Cached | None:
        from nats.js.errors import KeyNotFoundError

        cached = self._cache.get(run)
        if cached is not None:
            self._cache.move_to_end(run)
            return cached
        try:
            entry = await self.kv.get(run)
        except KeyNotFoundError:
            return None
        if not entry.value:
            return None
        cached = _Cached(entry.value, entry.revision or 0, executed=False)
        return cached

    async def _process(self, run: str, batch: list[tuple[Any, Event]]) -> None:
        from nats.js.errors import KeyWrongLastSequenceError

        msgs = [msg for msg, _ in batch]
        events = []
        now = time.time()
        for msg, ev in batch:
            ev.at = at = stored_at(msg, now)
            ev.handledAt = now
            metrics.ENGINE_EVENT_LAG.observe(max(0.0, now - at))
            events.append(ev)
        # A start for a run this engine has not seen: create the record right away, no read
        # first; only if it already exists (a redelivered start) is it loaded.
        fresh_start = run not in self._cache and any(e.type == "start" for e in events)
        rejected: dict[int, tuple[Any, Event, str]] | None = None  # id(event) -> (msg, event, why)
        for _ in range(50):  # CAS conflicts: another engine advanced the run, load and redo
            from_cache = run in self._cache
            cached = await self._initial(events) if fresh_start else await self._load(run)
            fresh_start = False
            if cached is None:
                cached = await self._initial(events)
                if cached is None:
                    await self._await_start(run, msgs)
                    return
            # The parsed record is reused between events; decide works on it in place
            # (copy=False) and it is dropped whenever a decision does not get written.
            state, cached.state = cached.state or RunState.from_bytes(cached.data), None
            wf = await self._definition(state.definition)
            if not cached.executed and state.outbox:
                # A previous writer may have died before carrying out its commands.
                await self._put_status(state, wf, cached.revision, cached.revision)  # before its tasks
                await self._execute(state, [c for c in map(commands.from_wire, state.outbox) if c])
                cached.executed = True
            if rejected is None:  # once: the agent a step names does not change between tries
                rejected = self._forged(state, wf, batch)
                if rejected:
                    events = [ev for ev in events if id(ev) not in rejected]
            await self._claim_queue_timers(state, events, wf)
            was_running = state.running_attempts()  # before decide, which works on `state`
            was_waiting = waits_on_someone(state, wf)
            armed_before = {tid: t.at for tid, t in state.timers.items()}
            decision = await self._decide_all(state, events, wf, cached)
            if rejected:
                _audit_forged(decision, wf, rejected.values(), now)
            if not decision.changed:
                if from_cache:
                    # A no-op on a cached record may mean the record is stale: another engine
                    # advanced the run, and this event belongs to that newer state. Look again
                    # at the stored record before acknowledging anything.
                    self._cache.pop(run, None)
                    continue
                self._remember(run, cached, state.terminal)
                break
            new = decision.state
            new.outbox = outbox(decision)
            if decision.stores:
                await asyncio.gather(
                    *(store_apart(self.js, self.pub, k, v, new.namespace) for k, v in decision.stores.items())
                )
                cached.outputs.update(decision.stores)
            ended = self._ended(was_running, new, decision.commands, wf)
            if ended and any(isinstance(c, commands.CancelTasks) for c in decision.commands):
                await self._give_up(ended)  # given up: marked before the commit
                ended = []
            armed = {tid: t.at for tid, t in new.timers.items()}
            data = await fit_record(self.js, new)
            try:
                if ended:  # only finished: marked along with the commit, see _write_after
                    revision = await self._write_after(ended, run, data, cached.revision)
                else:
                    revision = await self.pub.kv_update(RUNS_BUCKET, run, data, last=cached.revision)
            except KeyWrongLastSequenceError:
                # Another engine wrote first (or, for a new run, the key exists or was deleted:
                # nats-py's create tells those apart and recreates a deleted key).
                if cached.revision != 0:
                    self._cache.pop(run, None)
                    continue
                try:
                    revision = await self.kv.create(run, data)
                except KeyWrongLastSequenceError:
                    self._cache.pop(run, None)
                    continue
            committed = time.time()
            fresh = _Cached(data, revision, executed=False, memo=cached.memo, outputs=cached.outputs)
            await self._put_status(new, wf, cached.revision, revision)  # before the decision's tasks
            await self._execute(new, decision.commands, decision.audit, committed, decision.item_attempts)
            fresh.executed = True
            fresh.state = new
            self._remember(run, fresh, new.terminal)
            if armed != armed_before:
                # Timers are announced only from a committed record, so a timer can never
                # fire before the record that armed it exists (it would find nothing to do
                # and be dropped, and its later firing de-duplicated away). A crash right
                # here leaves a committed timer nobody announced: the sweeper fires it.
                self._schedule(run, new.namespace, armed, revision)
                await self.pub.kv_put(
                    TIMERS_BUCKET, run, dumps({"ns": new.namespace, "timers": armed, "rev": revision})
                )
            self._observe(new, events, decision, was_waiting, wf)
            for listener in self._listeners:
                result = listener(new)
                if asyncio.iscoroutine(result):
                    await result
            break
        else:
            raise RuntimeError(f"run {run}: too many concurrent writers")
        for msg, ev, why in (rejected or {}).values():
            log.warning("forged event rejected", run=run, subject=msg.subject, kind=ev.type, why=why)
            metrics.child(metrics.FORGED_EVENTS, ns_of(msg.subject), ev.type).inc()
        for msg in msgs:
            await msg.ack()

    def _forged(
        self, state: RunState, wf: CompiledWorkflow, batch: list[tuple[Any, Event]]
    ) -> dict[int, tuple[Any, Event, str]]:
        """The events of `batch` whose subject does not prove them (engine/provenance.py)."""
        required = self.settings.provenance_required
        out = {}
        for msg, ev in batch:
            why = provenance.forged(msg.subject, ev, state.namespace, wf, required)
            if why is not None:
                out[id(ev)] = (msg, ev, why)
            elif isinstance(ev, AttemptEvent):  # recorded on the attempt: the verified sender
                source = event_source(msg.subject)
                ev.agent = source[2] if source is not None else None
        return out

    async def _claim_queue_timers(self, state: RunState, events: list[Event], wf: CompiledWorkflow) -> None:
        """Claim, for the engine, each attempt whose queue timer is about to be decided.

        An agent claims an attempt with a queueTimeout before it starts it; the engine
        claims it as `abandoned` here. One create of one key decides (cadenza._claims): if
        an agent was first, decide counts the attempt as started instead of failing it; if
        the engine was, decide abandons it and the agent that takes the task later does not
        start it. A redelivered timer reads the same holder. decide does no I/O, so the
        outcome reaches it on the event. Only a timer decide would act on is claimed (armed,
        for this time): claiming for a stale firing would keep a live attempt from starting.
        """
        if state.terminal:
            return
        for ev in events:
            if not isinstance(ev, TimerEvent) or ev.claimed is not None:
                continue
            timer = state.timers.get(str(ev.timer))
            if timer is None or timer.kind != "queue" or not timer.step or not timer.attempt:
                continue
            if ev.due is not None and abs(float(ev.due) - timer.at) > 1e-3:
                continue
            agent = step_agent(wf, timer.step)
            if agent is None:
                continue  # no agent takes its task: nobody else can claim it
            key = claim_key(state.namespace, agent, task_id(state.run, timer.step, timer.item, timer.attempt))
            holder = await claim_attempt(self.claims_kv, key, None, pub=self.pub)
            ev.claimed = not holder.abandoned
            ev.claimedBy, ev.claimedAt = holder.worker, holder.at

    async def _put_status(self, state: RunState, wf: CompiledWorkflow, since: int, revision: int) -> None:
        """Write the run's status for agents (engine/run_status.py) if it changed: unless
        this engine wrote the same one for the record it has just replaced (`since`; an
        engine that did not write the revision in between cannot know what is stored).

        Only a run with a budget has one: its agents check model calls against it. Whether
        an attempt may still start is its claim's to say (cadenza._claims), so a run
        without a budget costs no status write (two per run, and the status computed on
        every decision, cost conc50x3 a sixth of its throughput)."""
        if state.budget is None and not has_budget(wf):
            return
        data = dumps(run_status(state))
        if self._statuses.get(state.run) == (data, since) and since:
            self._statuses[state.run] = (data, revision)
            return
        await self.pub.kv_put(RUN_STATUS_BUCKET, run_status_key(state.namespace, state.run), data)
        self._statuses[state.run] = (data, revision)
        self._statuses.move_to_end(state.run)
        if len(self._statuses) > self.settings.cache_size:
            self._statuses.popitem(last=False)

    def _ended(
        self,
        was: set[tuple[str, int | None, int]],
        after: RunState,
        todo: list[commands.Command],
        wf: CompiledWorkflow,
    ) -> list[str]:
        """The claim keys of the attempts that stop running in this decision: given up (a
        cancel, a timeout, the run's end) or finished, and dispatched and ended at once."""
        sent = [c.body for c in todo if isinstance(c, commands.Dispatch)]
        if sent:
            was = was | {(body["step"], body.get("item"), body["attempt"]) for body in sent}
        if not was:
            return []
        keys = []
        for step, item, attempt in was - after.running_attempts():
            agent = step_agent(wf, step)
            if agent is not None:  # a sub-workflow's attempt is no agent's to start
                keys.append(claim_key(after.namespace, agent, task_id(after.run, step, item, attempt)))
        return keys

    async def _write_after(self, marks: list[str], run: str, data: bytes, last: int) -> int:
        """Write the run record after marking the claims `marks` abandoned, without waiting
        for the marks to be stored first: they are put on the connection ahead of the
        write (`Publisher.send`, one after another), and all the PubAcks are awaited
        together. An engine killed after the write left has sent them too (the soak kills
        engines: a finished attempt left unmarked was started again from a redelivered
        task)."""
        sent: list[asyncio.Future[Any]] = []
        try:
            for key in marks:
                sent.append(await send_give_up_attempt(self.pub, key))
            write = await self.pub.send_kv_update(RUNS_BUCKET, run, data, last)
        except BaseException:
            self.pub.discard(sent)
            raise
        try:
            revision = await self.pub.acked(write, kv=True)  # the write's first: a lost CAS is decided again
        except BaseException:
            self.pub.discard(sent)
            raise
        await self.pub.settle(sent)
        return revision

    async def _give_up(self, keys: list[str]) -> None:
        """Mark the attempts `keys` (claims) `abandoned` (cadenza._claims): an agent that
        takes one of their tasks later does not start it, however late its cancel notice
        (a task fresh from the queue is not looked at), and a redelivery of a finished
        attempt's task is not started again (an agent need not read the run record to tell).

        A decision that gives attempts up marks them before it is committed, so no agent
        starts one after the commit; one where attempts only finished sends the marks
        ahead of the commit without waiting for them (`_write_after`). A crash
        or a conflict before the commit can leave marks on attempts the record still has
        running: the batch's events come back and are decided again (a cancel gives them
        up again, a result finishes its attempt again; one left running that no agent may
        start ends by its timers, as a lost task would)."""
        if len(keys) == 1:
            await give_up_attempt(self.pub, keys[0])
            return
        sent: list[asyncio.Future[Any]] = []
        try:
            for key in keys:
                sent.append(await send_give_up_attempt(self.pub, key))
        except BaseException:
            self.pub.discard(sent)
            raise
        await self.pub.settle(sent)

    async def _initial(self, events: list[Event]) -> _Cached | None:
        start = next((e for e in events if isinstance(e, StartEvent)), None)
        if start is None:
            return None
        value = start.input
        cached = _Cached(b"", 0, executed=True)
        input_ref = None
        if is_ref(value) or len(dumps(value)) > INLINE_INPUT_BYTES:
            # A large input (a 10,000-item list) would be re-read and re-written with every
            # event: it is stored apart once and the record keeps a reference. One that came
            # through the object store stays there: the bucket entry holds its reference.
            input_ref = f"{start.run}._input"
            await store_apart(self.js, self.pub, input_ref, value, start.namespace or "default")
            if not is_ref(value):
                cached.outputs[input_ref] = value
        state = RunState(
            run=start.run,
            namespace=start.namespace or "default",
            workflow=start.workflow,
            definition=start.definition,
            input=None if input_ref else value,
            inputRef=input_ref,
            createdAt=start.at,
            parent=start.parent,
            scope=start.scope or start.run,
            labels=start.labels or {},
        )
        cached.data = state.to_bytes()  # a decision that must be redone starts again from this
        cached.state = state
        return cached

    async def _decide_all(
        self, state: RunState, events: list[Event], wf: CompiledWorkflow, cached: _Cached
    ) -> Decision:
        """Apply a batch of events; load outputs stored apart from the record when asked to."""
        for _ in range(10):
            current = state if _ == 0 else RunState.from_bytes(cached.data)
            total = Decision(state=current)
            try:
                for ev in events:
                    d = decide(
                        current,
                        ev,
                        wf,
                        cached.outputs,
                        memo=cached.memo,
                        copy=False,
                        max_value_bytes=self.settings.max_value_bytes,
                        trace=self.tracer is not None,
                    )
                    total.absorb(d)
                    cached.outputs.update(d.stores)
                return total
            except MissingOutputs as missing:
                await self._load_outputs(missing.keys, cached.outputs, state.namespace)
        raise RuntimeError("outputs could not be loaded")

    async def _load_outputs(self, keys: set[str], into: dict[str, Any], namespace: str) -> None:
        from nats.js.errors import KeyNotFoundError

        for key in keys:
            if key.startswith(OBJECT_REF_PREFIX):
                ref = {REF_KEY: key[len(OBJECT_REF_PREFIX) :]}
                into[key] = await resolve_payload(self.js, ref, namespace=namespace)
            elif key.endswith(".*"):
                items = current_entries(self.js, OUTPUTS_BUCKET, self.outputs_kv, key)
                async with aclosing(items) as entries:
                    async for entry in entries:
                        if entry.value is not None:
                            into[entry.key] = await resolve_payload(
                                self.js, loads(entry.value), namespace=namespace
                            )
            else:
                try:
                    entry = await self.outputs_kv.get(key)
                    into[key] = await resolve_payload(self.js, loads(entry.value), namespace=namespace)
                except KeyNotFoundError:
                    into[key] = None

    def _remember(self, run: str, cached: _Cached, terminal: bool) -> None:
        self._cache[run] = cached
        self._cache.move_to_end(run)
        if terminal:  # nothing will read these again: keep engine memory bounded
            cached.memo.clear()
            cached.outputs.clear()
        while len(self._cache) > self.settings.cache_size:
            self._cache.popitem(last=False)

    # ------------------------------------------------------------------ commands
    async def _execute(
        self,
        state: RunState,
        todo: list[commands.Command],
        audit: list[dict[str, Any]] | None = None,
        committed: float | None = None,
        item_attempts: list[dict[str, Any]] | None = None,
    ) -> None:
        jobs = []
        # Publishes put on the connection in the outbox's order; their PubAcks are awaited
        # together below (Publisher.send: no task per publish).
        sent: list[asyncio.Future[Any]] = []
        records = list(audit or ())
        ended = list(item_attempts or ())  # forEach item attempts the decision ended (spans)
        try:
            for cmd in todo:
                if isinstance(cmd, commands.Dispatch | commands.Publish):
                    body, data = self._message(cmd, self._traceparent(state, cmd))
                    if isinstance(cmd, commands.Dispatch) and len(data) > OFFLOAD_BYTES:
                        # The object store write first; several of them at once.
                        jobs.append(self._publish_offloaded(cmd, body, state.namespace))
                    else:
                        sent.append(await self.pub.send(cmd.subject, data, {"Nats-Msg-Id": cmd.msg_id}))
                elif isinstance(cmd, commands.CancelTasks):
                    await self.nc.publish(cmd.subject, dumps(cmd.body))
                elif isinstance(cmd, commands.StartChild):
                    jobs.append(self._start_child(cmd))
                elif isinstance(cmd, commands.Audit):  # a stored outbox carried out again
                    records.extend(cmd.records)
                    ended.extend(cmd.item_attempts)
            if records:
                sent.append(await self._send_audit(state, records, committed))
        except BaseException:
            # The outbox is carried out again (the batch is not acknowledged): the PubAcks
            # of what was sent are of no interest now; the jobs (children, large tasks)
            # were not started.
            self.pub.discard(sent)
            for job in jobs:
                job.close()
            raise
        if (records or ended) and self.tracer is not None:  # the spans the committed decision finished
            self.tracer.emit(state, records, ended)
        if jobs:
            await asyncio.gather(*jobs, self.pub.settle(sent))
        else:
            await self.pub.settle(sent)

    def _traceparent(self, state: RunState, cmd: commands.Dispatch | commands.Publish) -> str | None:
        """The trace context of a task (the attempt's span), when traces are on: added
        here, not by decide, so that a task carries none when they are off."""
        if self.tracer is None or not isinstance(cmd, commands.Dispatch):
            return None
        body = cmd.body
        return traceparent(state, body["step"], body.get("item"), body["attempt"])

    def _message(
        self, cmd: commands.Dispatch | commands.Publish, trace: str | None = None
    ) -> tuple[dict[str, Any], bytes]:
        """The body of a task or an event, and its bytes."""
        body = cmd.body
        if isinstance(cmd, commands.Dispatch):
            # A secret of this dispatch: the agent's outcome carries it in its Nats-Msg-Id
            # (cadenza._agent), and only the engine and that Agent read its tasks, so
            # nobody else can take the id first and have the real outcome dropped as a
            # duplicate. A task published again (an outbox carried out again) gets another
            # nonce, but within JetStream's duplicate window only the first is stored.
            body = {**body, "nonce": secrets.token_hex(8)}
            if trace is not None:
                body["traceparent"] = trace
        return body, dumps(body)

    async def _publish_offloaded(self, cmd: commands.Dispatch, body: dict[str, Any], namespace: str) -> None:
        """Publish a task too large for a message: its input goes to the object store
        first, and the task carries the reference."""
        offloaded = await offload_payload(self.js, f"{cmd.msg_id}.input", body["input"], namespace=namespace)
        await self.pub.publish(cmd.subject, dumps({**body, "input": offloaded}), {"Nats-Msg-Id": cmd.msg_id})

    async def _send_audit(
        self, state: RunState, records: list[dict[str, Any]], committed: float | None
    ) -> asyncio.Future[Any]:
        """Append a decision's audit records to the trail: one message, published only after
        the decision was committed, and again whenever its outbox is carried out again. The
        id (run and seq range) lets JetStream drop a repeat within its duplicate window;
        `read_audit` drops any later one by (run, seq).

        Each record says when its decision was committed (`committedAt`, this engine's
        clock once the write was acknowledged), beside `at`, the time of the event it
        decided on: an event can wait in the stream long before it is decided (its engine
        killed). An outbox carried out again was committed before it was loaded, so then
        the time of loading it is said (later than the commit)."""
        msg_id = f"audit:{state.namespace}:{state.run}:{records[0]['seq']}-{records[-1]['seq']}"
        subject = audit_subject(state.namespace, state.run)
        stamped = [{**rec, "committedAt": committed or time.time()} for rec in records]
        return await self.pub.send(subject, dumps(stamped), {"Nats-Msg-Id": msg_id})

    async def _start_child(self, cmd: commands.StartChild) -> None:
        parent = cmd.parent
        try:
            wf = await self.client.latest_definition(cmd.namespace, cmd.workflow or "")
            await self.client.start(wf, cmd.input, run_id=cmd.run, parent=parent, scope=cmd.scope)
        except Exception as exc:
            body = {
                "type": "failed",
                "run": parent["run"],
                "step": parent["step"],
                "item": parent.get("item"),
                "attempt": parent["attempt"],
                "error": TaskFailure(type="ChildStartError", message=str(exc), retryable=False).wire(),
            }
            await self.pub.publish(
                event_subject(parent["namespace"], parent["run"]),
                dumps(body),
                {"Nats-Msg-Id": f"child:{cmd.run}"},
            )

    # -------------------------------------------------------------------- timers
    def _schedule(self, run: str, namespace: str, wanted: dict[str, float], revision: int = 0) -> None:
        """Arm this engine's local timers for `run` as its record at `revision` has them.

        Announcements of two engines may arrive out of order: one from an older record
        revision than this engine has already scheduled is ignored.
        """
        if revision:
            if revision < self._timer_revisions.get(run, 0):
                return
            self._timer_revisions[run] = revision
            self._timer_revisions.move_to_end(run)
            while len(self._timer_revisions) > self.settings.cache_size:
                self._timer_revisions.popitem(last=False)
        loop = asyncio.get_running_loop()
        for key in [k for k in self._timers if k[0] == run]:
            handle, at = self._timers[key]
            if wanted.get(key[1]) != at:  # gone, or re-armed for another time
                handle.cancel()
                del self._timers[key]
        for tid, at in wanted.items():
            if (run, tid) not in self._timers:
                handle = loop.call_later(max(0.0, at - time.time()), self._fire, run, namespace, tid, at)
                self._timers[(run, tid)] = (handle, at)

    def _fire(self, run: str, namespace: str, tid: str, at: float) -> None:
        self._timers.pop((run, tid), None)
        # `due` lets decide tell this firing from a stale one of an earlier arming.
        body = {"type": "timer", "run": run, "timer": tid, "due": at}
        # Every engine fires every timer; the Nats-Msg-Id lets JetStream keep one.
        job = asyncio.get_running_loop().create_task(
            self.pub.publish(
                event_subject(namespace, run), dumps(body), {"Nats-Msg-Id": f"timer:{run}:{tid}:{at:.3f}"}
            )
        )
        self._background.add(job)
        job.add_done_callback(self._background.discard)

    async def _watch_timers(self) -> None:
        while True:
            watcher = None
            try:
                watcher = await self.timers_kv.watch(">")
                async for entry in watcher:
                    if entry is None or entry.value is None:
                        if entry is not None and entry.operation in ("DEL", "PURGE"):
                            self._schedule(entry.key, "default", {})
                        continue
                    doc = loads(entry.value)
                    self._schedule(
                        entry.key, doc.get("ns", "default"), doc.get("timers", {}), int(doc.get("rev", 0))
                    )
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("timer watch interrupted; restarting", exc_info=True)
                await asyncio.sleep(1)
            finally:
                # The watch's ordered consumer has heartbeat tasks of its own that outlive a
                # cancelled iteration (and stall an embedding kopf's shutdown) unless stopped.
                if watcher is not None:
                    with contextlib.suppress(Exception):
                        await watcher.stop()

    async def _sweep_forever(self) -> None:
        """Every interval, one engine (whoever claims the round) sweeps the runs bucket."""
        interval = self.settings.sweep_interval
        while True:
            await asyncio.sleep(interval)
            try:
                if await self._claim_sweep(interval):
                    fired = await self.sweep(grace=interval)
                    if fired:
                        log.warning("sweeper fired overdue timers", timers=fired, engine=self.settings.name)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("timer sweep failed; next round will try again", exc_info=True)

    async def _claim_sweep(self, interval: float) -> bool:
        """Claim this round of sweeping with compare-and-swap on one key: with several
        engines, one reads the runs bucket per interval instead of each of them."""
        from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

        kv = await self.js.key_value(TRIGGERS_BUCKET)
        round_ = int(time.time() // interval)
        try:
            entry = await kv.get("engine.sweep")
            last, revision = int(entry.value or b"-1"), entry.revision or 0
        except KeyNotFoundError:
            last, revision = -1, 0
        if last >= round_:
            return False
        try:
            if revision:
                await kv.update("engine.sweep", str(round_).encode(), last=revision)
            else:
                await kv.create("engine.sweep", str(round_).encode())
        except KeyWrongLastSequenceError:
            return False
        return True

    async def sweep(self, grace: float, now: float | None = None) -> int:
        """Fire every timer that committed run records hold and that is overdue by more
        than `grace` seconds; return how many were fired.

        The timer's own firing may have been lost (its engine died before announcing it,
        or an announcement from an older record replaced it). The firing sent here has an
        id of its own per sweep round; decide applies it only if the timer is still armed
        for that time, so a timer that did fire meanwhile costs nothing.
        """
        now = time.time() if now is None else now
        round_ = int(now // max(grace, 1e-3))
        fired = 0
        async with aclosing(current_entries(self.js, RUNS_BUCKET, self.kv)) as entries:
            async for entry in entries:
                for tid, at, namespace in _overdue_timers(entry.value, now - grace):
                    body = {"type": "timer", "run": entry.key, "timer": tid, "due": at}
                    await self.pub.publish(
                        event_subject(namespace, entry.key),
                        dumps(body),
                        {"Nats-Msg-Id": f"sweep:{entry.key}:{tid}:{at:.3f}:{round_}"},
                    )
                    fired += 1
        return fired

    # ------------------------------------------------------------------- metrics
    def _observe(
        self,
        state: RunState,
        events: list[Event],
        decision: Decision,
        was_waiting: bool,
        compiled: CompiledWorkflow,
    ) -> None:
        # Every series about the run carries its namespace (metrics.NS): behind a
        # ServiceMonitor the operator's own namespace would otherwise stand for all of them.
        ns, wf = state.namespace, state.workflow
        for timed_out in decision.timed_out:  # counted where it is decided, once per attempt
            metrics.child(metrics.STEP_TIMEOUTS, ns, wf, timed_out).inc()
        for rec in decision.audit:
            step, old, new = rec.get("step"), rec.get("from"), rec.get("to")
            if step is None:
                if new == "Running" and old == "Pending":
                    metrics.child(metrics.RUNS_STARTED, ns, wf).inc()
                    metrics.child(metrics.ACTIVE_RUNS, ns, wf).inc()
                    metrics.child(metrics.RUNS_WAITING, ns, wf)  # the series, at 0 until one waits
                elif new in ("Succeeded", "Failed", "Cancelled") and old != new:
                    metrics.child(metrics.RUNS_FINISHED, ns, wf, new).inc()
                    metrics.child(metrics.ACTIVE_RUNS, ns, wf).dec()
                    if state.startedAt and state.finishedAt:
                        duration = state.finishedAt - state.startedAt
                        metrics.child(metrics.RUN_DURATION, ns, wf).observe(duration)
                continue
            if rec.get("retry"):
                metrics.child(metrics.STEP_RETRIES, ns, wf, step).inc()
            # Only a change of phase moves the gauge: an ignored decision (a non-approver, a
            # duplicate) is audited as WaitingApproval -> WaitingApproval and changes nothing.
            if old != new and new == "WaitingApproval":
                metrics.child(metrics.PENDING_APPROVALS, ns, wf).inc()
            elif old != new and old == "WaitingApproval":
                metrics.child(metrics.PENDING_APPROVALS, ns, wf).dec()
        # Like the active runs, moved where the run changes: the record before and after
        # this decision say it, whichever engine decided the previous one.
        waiting = waits_on_someone(state, compiled)
        if waiting != was_waiting:
            metrics.child(metrics.RUNS_WAITING, ns, wf).inc(1 if waiting else -1)
        for ev in events:
            if isinstance(ev, FailedEvent) and ev.error.type == "PoisonTask":
                metrics.child(metrics.DEAD_LETTERS, TASKS_STREAM, "deliveries").inc()
        for model, input_tokens, output_tokens, cost in decision.usage:
            name = model[:63]
            metrics.child(metrics.MODEL_TOKENS, ns, wf, name, "input").inc(input_tokens)
            metrics.child(metrics.MODEL_TOKENS, ns, wf, name, "output").inc(output_tokens)
            metrics.child(metrics.MODEL_COST, ns, wf, name).inc(cost)
        metrics.observe_model_calls(ns, decision.calls)
        for step, scheduling, queued, executing in decision.timings:
            metrics.child(metrics.STEP_SCHEDULING, ns, wf, step).observe(scheduling)
            metrics.child(metrics.STEP_QUEUE, ns, wf, step).observe(queued)
            metrics.child(metrics.STEP_WAITING, ns, wf, step).observe(scheduling + queued)
            if executing is not None:
                metrics.child(metrics.STEP_EXECUTION, ns, wf, step).observe(executing)


def waits_on_someone(state: RunState, wf: CompiledWorkflow) -> bool:
    """The run is active but has nothing to do until someone acts: it is Paused by its
    budget, or every step still going waits for an approval or a signal (no attempt is
    queued, running or backing off). Such a run is not stuck (`cadenza_runs_waiting`)."""
    if state.phase == RunPhase.PAUSED:
        return True
    if state.phase != RunPhase.RUNNING:
        return False
    waiting = False
    for name, st in state.steps.items():
        if st.phase == StepPhase.WAITING_APPROVAL:
            waiting = True
        elif st.phase == StepPhase.RUNNING:
            cs = wf.steps.get(name)
            if cs is None or cs.kind != "signal":
                return False  # an attempt (or a sub-run) that should be progressing
            waiting = True
    return waiting


def _overdue_timers(data: bytes | None, before: float) -> list[tuple[str, float, str]]:
    """(timer id, due time, namespace) of the timers in a stored run record due before
    `before`. Most records hold no timer: those are passed over without parsing."""
    if not data or b'"timers":{' not in data:
        return []
    record = loads(data)
    if record.get("phase") in ("Succeeded", "Failed", "Cancelled"):
        return []
    namespace = record.get("namespace", "default")
    return [
        (tid, float(timer["at"]), namespace)
        for tid, timer in (record.get("timers") or {}).items()
        if float(timer.get("at", 0)) <= before
    ]
