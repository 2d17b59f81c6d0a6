"""`Agent`: a handler decorator and a worker that takes tasks from JetStream.

The worker keeps `concurrency` tasks in flight from the Agent's durable pull consumer,
publishes each result durably before acknowledging the task, heartbeats long tasks so
JetStream does not redeliver them, and on SIGTERM stops taking work and finishes (or
returns) what it holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog

from . import _payloads, _tracing
from ._ackinfo import deliveries, stored_at
from ._budget import guard_for
from ._claims import Claim, claim
from ._connect import connect_until_stopped, inbox_prefix, tls_context
from ._context import KVContext, record_writes
from ._deadletter import MAX_DELIVERIES, dead_letter
from ._errors import TaskError, failure_of
from ._events import AttemptEvents
from ._kvbind import bind
from ._logging import configure_logging
from ._protocol import (
    CLAIMS_BUCKET,
    MAX_VALUE_BYTES,
    RUN_STATUS_BUCKET,
    RUNS_BUCKET,
    TASKS_STREAM,
    TERMINAL_RUN_PHASES,
    agent_event_subject,
    cancel_subject,
    claim_key,
    consumer_name,
    dumps,
    loads,
    run_status_key,
    task_id,
)
from ._publish import Publisher
from ._pull import PullConsumer, agent_consumer_config
from ._reads import SharedReads
from ._runlog import MAX_LINES, attempt_log
from ._task import Task
from ._usage import record_usage
from .models import ModelRegistry, load_model_specs
from .protocol import TaskFailure

Handler = Callable[[Task], Any]

T = TypeVar("T")

STALE_AFTER = 0.5
"""Seconds a task may have waited in the queue before the agent reads the run record to
see whether its attempt is still current (see Agent._may_be_stale)."""
CANCEL_MEMORY = 60.0
"""Seconds an agent remembers a run's cancel notice, for tasks of that run still queued."""


@dataclass(frozen=True)
class AgentSettings:
    """Where the worker connects and how much it takes on. Read from the environment."""

    nats_url: str = "nats://127.0.0.1:4222"
    """CADENZA_NATS_URL: the NATS server with JetStream."""
    nats_creds: str | None = None
    """CADENZA_NATS_CREDS: path to a NATS credentials file, when the server wants one."""
    nats_ca: str | None = None
    """CADENZA_NATS_CA: a CA certificate (PEM file) the server's TLS certificate must chain
    to, for a server that requires TLS or a tls:// URL (the operator mounts it with `nats.tls`)."""
    namespace: str = "default"
    """CADENZA_NAMESPACE: the Kubernetes namespace (or local namespace) of the Agent."""
    agent: str | None = None
    """CADENZA_AGENT: the Agent resource's name; must match Agent(name) when both are set."""
    concurrency: int | None = None
    """CADENZA_CONCURRENCY: tasks in flight in this process (the Agent spec's concurrency)."""
    ack_wait: float = 30.0
    """CADENZA_ACK_WAIT: seconds JetStream waits before redelivering an unacknowledged task."""
    drain_timeout: float = 25.0
    """CADENZA_DRAIN_TIMEOUT: on SIGTERM, seconds to finish in-flight tasks before returning them."""
    log_format: str | None = None
    """CADENZA_LOG_FORMAT: json or console (default: console on a terminal, json otherwise)."""
    max_value_bytes: int = MAX_VALUE_BYTES
    """CADENZA_MAX_VALUE_BYTES: the largest output (as JSON) a handler may return; a larger
    one fails the attempt (ValueTooLarge) instead of being sent on."""
    run_log_lines: int = MAX_LINES
    """CADENZA_RUN_LOG_LINES: lines of `task.log` one attempt sends to the run's log
    (`cadenza logs`), besides stderr; past it, one record counts the lines dropped. 0: none."""
    parent_pid: int | None = None
    """CADENZA_PARENT_PID: the process that started this one (`cadenza run`/`dev` set it);
    when it is gone (killed with SIGKILL, which it cannot pass on), the agent stops as on
    SIGTERM instead of working on as an orphan."""

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> AgentSettings:
        env = os.environ if environ is None else environ

        def number(name: str, default: float | None) -> float | None:
            raw = env.get(name)
            if raw is None or raw == "":
                return default
            try:
                return float(raw)
            except ValueError:
                raise ValueError(f"environment variable {name}={raw!r} is not a number") from None

        concurrency = number("CADENZA_CONCURRENCY", None)
        return cls(
            nats_url=env.get("CADENZA_NATS_URL", cls.nats_url),
            nats_creds=env.get("CADENZA_NATS_CREDS") or None,
            nats_ca=env.get("CADENZA_NATS_CA") or None,
            namespace=env.get("CADENZA_NAMESPACE", cls.namespace),
            agent=env.get("CADENZA_AGENT") or None,
            concurrency=int(concurrency) if concurrency else None,
            ack_wait=number("CADENZA_ACK_WAIT", cls.ack_wait) or cls.ack_wait,
            drain_timeout=number("CADENZA_DRAIN_TIMEOUT", cls.drain_timeout) or cls.drain_timeout,
            log_format=env.get("CADENZA_LOG_FORMAT") or None,
            max_value_bytes=int(
                number("CADENZA_MAX_VALUE_BYTES", cls.max_value_bytes) or cls.max_value_bytes
            ),
            run_log_lines=int(number("CADENZA_RUN_LOG_LINES", cls.run_log_lines) or 0),
            parent_pid=int(number("CADENZA_PARENT_PID", None) or 0) or None,
        )


@dataclass
class _InFlight:
    task: Task
    msg: Any
    subject: str
    base: dict[str, Any]
    interval: float  # seconds between two heartbeats of this task
    report: bool  # the step has a heartbeatTimeout: tell the engine too, not only JetStream
    last_beat: float = 0.0


class Agent:
    """An agent process. `@agent.handler` marks the function that executes its tasks."""

    def __init__(self, name: str, *, concurrency: int = 4) -> None:
        self.name = name
        self.concurrency = concurrency
        self._handler: Handler | None = None
        self._inflight: dict[str, _InFlight] = {}
        self._cancels: dict[tuple[str, Any], float] = {}  # (run, step or None) -> when heard
        # Lazy: bound at first use, after agent.run() has configured logging (a .bind() here
        # would keep structlog's unconfigured console output, even where JSON is wanted).
        self.log = structlog.get_logger("cadenza.agent", agent=name)

    # ----------------------------------------------------------------- declaring
    def handler(self, fn: Handler) -> Handler:
        """Register the task handler (async or sync). It returns a JSON-serialisable output."""
        if self._handler is not None:
            raise ValueError(f"agent {self.name!r} already has a handler ({self._handler.__name__})")
        self._handler = fn
        return fn

    async def call(self, task: Task) -> Any:
        """Invoke the handler for one task: sync handlers run in a thread, off the event loop."""
        if self._handler is None:
            raise RuntimeError(f"agent {self.name!r} has no handler: decorate one with @agent.handler")
        if inspect.iscoroutinefunction(self._handler):
            return await self._handler(task)
        result = await asyncio.to_thread(self._handler, task)
        if inspect.isawaitable(result):
            return await result
        return result

    # ------------------------------------------------------------------- running
    def run(self, settings: AgentSettings | None = None) -> None:
        """Connect with settings from the environment and work until SIGTERM/SIGINT."""
        settings = settings or AgentSettings.from_env()
        configure_logging(settings.log_format)
        asyncio.run(self.serve(settings))

    async def serve(self, settings: AgentSettings, stop: asyncio.Event | None = None) -> None:
        """Work until `stop` is set (or SIGTERM/SIGINT arrive when no `stop` is given)."""
        if settings.agent and settings.agent != self.name:
            raise ValueError(
                f"CADENZA_AGENT={settings.agent!r} but this process defines Agent({self.name!r})"
            )
        concurrency = settings.concurrency or self.concurrency
        stop = stop or self._stop_on_signals()
        loop = asyncio.get_running_loop()
        watch = (
            loop.create_task(self._stop_when_gone(settings.parent_pid, stop)) if settings.parent_pid else None
        )
        traced = _tracing.setup(self.name)  # off (and nothing imported) unless OTEL_* asks
        try:
            await self._serve(settings, stop, concurrency)
        finally:
            if watch is not None:
                watch.cancel()
            if traced:
                await asyncio.to_thread(_tracing.shutdown)  # the spans still queued are sent

    async def _stop_when_gone(self, pid: int, stop: asyncio.Event) -> None:
        """Set `stop` once process `pid` is gone, polled each second: this process was
        handed to another parent (it was ours), or `pid` no longer exists (it started us
        through a wrapper, such as a shell)."""
        direct = os.getppid() == pid
        while not stop.is_set():
            gone = direct and os.getppid() != pid
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                gone = True
            except PermissionError:
                pass  # it exists, under another user
            if gone:
                self.log.warning("the process that started this agent is gone; stopping", parent=pid)
                stop.set()
                return
            await asyncio.sleep(1.0)

    async def _serve(self, settings: AgentSettings, stop: asyncio.Event, concurrency: int) -> None:
        loop = asyncio.get_running_loop()
        options: dict[str, Any] = {"name": f"agent:{self.name}:{socket.gethostname()}:{os.getpid()}"}
        if settings.nats_creds:
            options["user_credentials"] = settings.nats_creds
            if prefix := inbox_prefix(settings.nats_creds):
                options["inbox_prefix"] = prefix  # the only inboxes the credential may read
        if settings.nats_ca:
            options["tls"] = tls_context(settings.nats_ca)
        nc = await connect_until_stopped(settings.nats_url, stop, log=self.log, **options)
        if nc is None:
            self.log.info("agent stopped before reaching NATS", nats=settings.nats_url)
            return
        js = nc.jetstream()
        pub = Publisher(nc)  # results and heartbeats: PubAcks awaited without a request each
        ns = settings.namespace
        durable = consumer_name(ns, self.name)
        runs_kv = await self._until_answered(stop, lambda: self._prepare(js, durable, settings, stop))
        if runs_kv is None:
            self.log.info("agent stopped before JetStream answered", nats=settings.nats_url)
            with contextlib.suppress(Exception):
                await nc.close()
            return
        # task.model(): limits shared in NATS
        models = ModelRegistry(load_model_specs(), js, loop, bound=bool(settings.nats_creds))
        worker = f"{socket.gethostname()}:{os.getpid()}"
        heartbeat_every = max(0.2, settings.ack_wait / 3)
        claims_kv: Any = None  # bound at the first task

        async def claim_start(body: dict[str, Any], at: float) -> Claim | None:
            """Claim the attempt for this worker (cadenza._claims); who holds it, or None
            where the engine keeps no claims (one from before them claims nothing either)."""
            from nats.js.errors import NotFoundError

            nonlocal claims_kv
            if claims_kv is None and settings.nats_creds:
                claims_kv = bind(js, CLAIMS_BUCKET)  # its keys are no business of ours (_kvbind)
            if claims_kv is None:
                try:
                    claims_kv = await js.key_value(CLAIMS_BUCKET)
                except NotFoundError:
                    return None
            attempt = task_id(body["run"], body["step"], body.get("item"), body["attempt"])
            return await claim(claims_kv, claim_key(ns, self.name, attempt), worker, at, pub)

        async def on_cancel(msg: Any) -> None:
            data = loads(msg.data)
            self._note_cancel(data.get("run"), data.get("step"))
            for held in list(self._inflight.values()):
                if held.task.run_id == data.get("run") and data.get("step") in (None, held.task.step):
                    held.task.cancel()

        cancel_sub = await nc.subscribe(cancel_subject(ns, "*"), cb=on_cancel)

        async def execute(msg: Any) -> None:
            if stop.is_set():
                await msg.nak()  # hand it straight back: another replica takes it now
                return
            try:
                body = parse_task(msg.data)
            except ValueError as exc:
                self.log.error("task dead-lettered", subject=msg.subject, reason=str(exc))
                with contextlib.suppress(Exception):
                    await dead_letter(js, msg, TASKS_STREAM, str(exc))
                return
            task = Task(
                input=None,
                run_id=body["run"],
                step=body["step"],
                attempt=body["attempt"],
                item=body.get("item"),
                workflow=body.get("workflow", ""),
                namespace=ns,
                agent=self.name,
                timeout=body.get("timeout"),
            )
            key = f"{task.run_id}.{task.step}.{task.item}.{task.attempt}"
            # The outcome's Nats-Msg-Id carries the dispatch's nonce (an engine's task has
            # one): only the engine and this Agent see the task, so nobody else can publish
            # first under that id and have JetStream drop the real outcome as a duplicate.
            outcome_id = f"{key}.{body['nonce']}" if isinstance(body.get("nonce"), str) else key
            base = {
                "run": task.run_id,
                "step": task.step,
                "item": task.item,
                "attempt": task.attempt,
                "queuedAt": body.get("queuedAt"),
            }
            subject = agent_event_subject(ns, task.run_id, self.name)  # the engine checks the agent
            log = self.log.bind(run=task.run_id, step=task.step, item=task.item, attempt=task.attempt)
            scope = body.get("scope") or body["run"]
            events = AttemptEvents(  # context writes and model usage, settled before the outcome
                lambda data, headers: pub.publish(subject, data, headers),
                {
                    "run": task.run_id,
                    "step": task.step,
                    "item": task.item,
                    "attempt": task.attempt,
                    "worker": worker,
                },
                loop,
                log,
            )
            task.context = KVContext(nc, ns, scope, loop, on_write=record_writes(events, scope))
            task._models = models
            task._usage = functools.partial(record_usage, events)
            task._budget = guard_for(body, runs_kv.get)  # None (no reads) for a run without a budget
            task._runlog = attempt_log(pub.publish, ns, self.name, worker, task, loop, settings.run_log_lines)
            try:
                why = await self._currency(runs_kv, body, msg) if self._may_be_stale(body, msg) else None
            except Exception as exc:
                # Cannot tell (JetStream not answering: a server restarting). Running it
                # could repeat an abandoned attempt; it comes back in a moment instead.
                log.warning("run record unreadable; task returned for later", error=repr(exc))
                with contextlib.suppress(Exception):
                    await msg.nak(delay=2.0)
                return
            if why is not None:
                # The engine gave up on this attempt (timed out, cancelled, the run ended) or
                # already has its outcome: running it now could only repeat side effects.
                log.info("attempt not started: no longer current", why=why)
                await msg.ack()
                return
            count = deliveries(msg)
            if count > MAX_DELIVERIES:
                reason = (
                    f"task delivered {count} times without an outcome "
                    "(the agent process may crash or hang on this input); dead-lettered"
                )
                log.error("task dead-lettered", reason=reason)
                failed = {
                    "type": "failed",
                    **base,
                    "error": TaskFailure(type="PoisonTask", message=reason, retryable=False).wire(),
                    "worker": worker,
                }
                msg_id = f"failed:{outcome_id}"
                try:
                    await self._publish_outcome(pub, subject, dumps(failed), msg_id, stop, log)
                    await dead_letter(js, msg, TASKS_STREAM, reason)
                except Exception:  # it comes back and is dead-lettered then (same ids)
                    log.warning("dead-lettering failed", exc_info=True)
                return
            started = time.time()
            # The engine may give the attempt up (its queueTimeout, a cancel, the run's end)
            # right after the look above, or before a fresh task that was not looked at:
            # one claim decides, atomically, whether it starts (cadenza._claims).
            try:
                holder = await claim_start(body, started)
            except Exception as exc:
                log.warning("attempt claim unanswered; task returned for later", error=repr(exc))
                with contextlib.suppress(Exception):
                    await msg.nak(delay=2.0)
                return
            if holder is not None and holder.abandoned:
                log.info("attempt not started: abandoned", why="the engine gave it up first")
                await msg.ack()
                return
            report = body.get("heartbeat")
            interval = min(heartbeat_every, report / 3) if report else heartbeat_every
            self._inflight[key] = _InFlight(task, msg, subject, base, interval, bool(report), loop.time())
            start_report: asyncio.TimerHandle | None = None
            try:
                started_event = {"type": "started", **base, "at": started, "startedAt": started}
                if body.get("notifyStart"):  # the step has timers that count from the start
                    await pub.publish(subject, dumps(started_event))
                elif body.get("reportStartAfter") is not None:
                    # Otherwise the start is reported only by an attempt still running after
                    # a moment: a quick one's result carries its start, and costs no message.
                    start_report = loop.call_later(
                        float(body["reportStartAfter"]), _report, pub, subject, started_event
                    )
                task.input = await _payloads.resolve(js, body.get("input"), namespace=ns)
                # asyncio.timeout, not wait_for: a TimeoutError the handler itself raises (an
                # HTTP client's) is a plain exception, not this attempt's timeout.
                deadline = asyncio.timeout(task.timeout)
                try:
                    async with deadline:
                        with _tracing.handler_span(self.name, task, body.get("traceparent")):
                            output = await self.call(task)
                    output = await _payloads.offload(
                        js,
                        f"{key}.output",
                        output,
                        namespace=ns,
                        max_bytes=settings.max_value_bytes,
                        what="the output",
                    )
                    event: dict[str, Any] = {"type": "result", **base, "output": output}
                except Exception as exc:
                    if isinstance(exc, TimeoutError) and deadline.expired():
                        task.cancel()
                        error = TaskFailure(
                            type="Timeout",
                            message=f"attempt exceeded its timeout of {task.timeout}s",
                            retryable=True,
                            timeout=True,
                        ).wire()
                    else:
                        # Retryable under the step's policy unless FatalError; the engine
                        # applies the step's retry.nonRetryable to the type names sent.
                        if not isinstance(exc, TaskError):
                            task.log.exception("handler raised")
                        error = failure_of(exc)
                    event = {"type": "failed", **base, "error": error}
                event.update(startedAt=started, finishedAt=time.time(), worker=worker)
                msg_id = f"{event['type']}:{outcome_id}"
                # Durable first, then the ack: a crash in between redelivers the task and
                # the duplicate result is dropped by Nats-Msg-Id and by the engine.
                if task._runlog is not None and task._runlog.used:
                    await task._runlog.close()  # the run's log is complete once the outcome is in
                await events.settle()  # the context writes and usage come before the outcome
                await self._publish_outcome(pub, subject, dumps(event), msg_id, stop, log)
                await msg.ack()
            except asyncio.CancelledError:
                with contextlib.suppress(Exception):
                    await msg.nak()
                raise
            except Exception:
                # The outcome could not be made durable (NATS gone while stopping): the task
                # is not acknowledged, so JetStream hands it out again.
                log.warning("task returned unfinished", exc_info=True)
            finally:
                if start_report is not None:
                    start_report.cancel()
                self._inflight.pop(key, None)

        consumer = PullConsumer(nc, TASKS_STREAM, durable, execute, concurrency=concurrency)
        await consumer.start()
        beats = loop.create_task(self._heartbeats(js, heartbeat_every))
        self.log.info("agent ready", namespace=ns, concurrency=concurrency, nats=settings.nats_url)
        try:
            await stop.wait()
        finally:
            self.log.info("agent stopping", in_flight=len(self._inflight))
            await consumer.pause()
            await self._drain(consumer.jobs, settings.drain_timeout)
            beats.cancel()
            # With NATS unreachable, unsubscribing and draining wait for a reconnection
            # that may never come: bound them, then close, so SIGTERM always ends the process.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(consumer.stop(), 2)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(cancel_sub.unsubscribe(), 2)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.drain(), 5)
            with contextlib.suppress(Exception):
                await nc.close()

    def _note_cancel(self, run: Any, step: Any) -> None:
        now = time.monotonic()
        key = (str(run), step)
        self._cancels.pop(key, None)  # re-inserted last: the dict stays in the order heard
        self._cancels[key] = now
        if len(self._cancels) > 10_000:  # bounded: forget the oldest half
            for key in list(self._cancels)[:5_000]:
                del self._cancels[key]
        while self._cancels and now - next(iter(self._cancels.values())) > CANCEL_MEMORY:
            del self._cancels[next(iter(self._cancels))]

    def _may_be_stale(self, body: dict[str, Any], msg: Any) -> bool:
        """Whether the engine may have given up on this attempt before it got here.

        It can only have if something happened after the dispatch: the task comes again
        (a crash, a lost ack), it waited in the queue (a busy agent: a cancel, a failure
        elsewhere, a queue timeout may have come meanwhile), or a cancel for its run was
        heard. A task taken at once needs no read of the run record: that read on every
        task cost a fan-out of 100 tasks twice its time. The wait is measured from the time
        JetStream stored the task (its server's clock) to this process's clock: clocks
        apart by more than STALE_AFTER would let an old task pass unread.
        """
        if deliveries(msg) > 1:
            return True
        now = time.time()
        limit = STALE_AFTER
        if body.get("queueTimeout"):
            limit = min(limit, float(body["queueTimeout"]) / 2)
        if now - stored_at(msg, now) > limit:
            return True
        return (body["run"], None) in self._cancels or (body["run"], body["step"]) in self._cancels

    async def _currency(self, runs_kv: Any, body: dict[str, Any], msg: Any) -> str | None:
        """`abandoned()`, asked again for a few seconds while the record cannot be read,
        keeping the task ours meanwhile; raises when it still cannot be read."""
        delay = 0.1
        for _ in range(6):  # about 6 s in all
            try:
                return await abandoned(runs_kv, body)
            except Exception:
                await asyncio.sleep(delay)
                delay *= 2
                with contextlib.suppress(Exception):
                    await msg.in_progress()
        return await abandoned(runs_kv, body)

    async def _publish_outcome(
        self, pub: Publisher, subject: str, data: bytes, msg_id: str, stop: asyncio.Event, log: Any
    ) -> None:
        """Publish an attempt's outcome, trying again while JetStream does not answer (a
        server restarting): the work is done, and losing its outcome would mean doing it
        again. The task stays in flight meanwhile, so its heartbeats keep it ours. Gives up
        (raising) only once the agent is told to stop."""
        delay = 0.1
        while True:
            try:
                await pub.publish(subject, data, {"Nats-Msg-Id": msg_id})
                return
            except Exception as exc:
                if stop.is_set():
                    raise
                log.warning("outcome not stored yet, retrying", error=repr(exc), retry_in=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _prepare(self, js: Any, durable: str, settings: AgentSettings, stop: asyncio.Event) -> Any:
        """The task consumer, then the reads of run statuses (`_run_reads`: one read per
        burst of a run's tasks); None when stopped first."""
        ns = settings.namespace
        await self._ensure_consumer(js, durable, ns, settings.ack_wait, stop, create=not settings.nats_creds)
        if stop.is_set():
            return None
        return await _run_reads(js, ns, bool(settings.nats_creds))

    async def _until_answered(self, stop: asyncio.Event, call: Callable[[], Awaitable[T]]) -> T | None:
        """`call()`, again while JetStream does not answer, until `stop` is set (None).

        A server restarting accepts connections before its streams answer: a JetStream
        request then times out, or finds no responder. At startup that is no reason for
        an agent to exit (its supervisor would count a crash, and a Deployment a restart);
        the engine's host waits the same way (engine/host.py)."""
        import nats.errors
        import nats.js.errors

        not_answering = (TimeoutError, nats.errors.NoRespondersError, nats.js.errors.ServiceUnavailableError)
        delay = 0.25
        while True:
            try:
                return await call()
            except not_answering as exc:
                if stop.is_set():
                    return None
                self.log.warning("JetStream not answering yet; trying again", error=repr(exc), retry_in=delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                if stop.is_set():
                    return None
                delay = min(delay * 2, 5.0)

    async def _ensure_consumer(
        self, js: Any, durable: str, ns: str, ack_wait: float, stop: asyncio.Event, create: bool = True
    ) -> None:
        """Wait for the task stream (the engine or operator creates it), then for our consumer.

        The engine or operator usually creates the consumer; creating it here too makes an
        agent that starts first still work. An existing one is left alone: updating a
        consumer drops the pull requests of the replicas already waiting on it. With
        credentials (`create=False`) the agent only looks its consumer up, waiting until
        the engine or operator has created it (`ensure_agent_consumer`): an agent's
        credential may read its own consumer, never create or change one.
        """
        from nats.js.errors import NotFoundError

        config = agent_consumer_config(ns, self.name, ack_wait)
        while not stop.is_set():
            try:
                await js.consumer_info(TASKS_STREAM, durable)
                return
            except NotFoundError as exc:
                if not create:  # the stream or the consumer is not there yet
                    self.log.info("waiting for the engine to create this agent's consumer", error=str(exc))
                    await asyncio.sleep(1)
                    continue
            try:
                await js.add_consumer(TASKS_STREAM, config)
                return
            except Exception as exc:  # the stream does not exist yet
                self.log.info("waiting for the task stream", error=str(exc))
                await asyncio.sleep(1)

    async def _heartbeats(self, js: Any, every: float) -> None:
        """One loop for every in-flight task (not a timer per task): keep long tasks from
        being redelivered, and tell the engine they are alive where the step asks for it."""
        loop = asyncio.get_running_loop()
        tick = min(every, 0.25)  # fine enough for the shortest heartbeat a task may need
        while True:
            await asyncio.sleep(tick)
            now = loop.time()
            for held in list(self._inflight.values()):
                if now - held.last_beat < held.interval:
                    continue
                held.last_beat = now
                with contextlib.suppress(Exception):
                    await held.msg.in_progress()
                    if held.report:
                        await js.publish(
                            held.subject, dumps({"type": "heartbeat", **held.base, "at": time.time()})
                        )

    async def _drain(self, jobs: set[asyncio.Task[None]], timeout: float) -> None:
        """Let this agent's in-flight tasks finish for `timeout` seconds, then return the rest.

        Only its own (its consumer's jobs): the process may hold other work, another
        agent or an engine, that this stop must neither wait for nor cancel.
        """
        pending = list(jobs)
        if not pending:
            return
        _, still = await asyncio.wait(pending, timeout=timeout)
        for job in still:
            job.cancel()  # execute() naks on cancellation: JetStream redelivers at once
        if still:
            await asyncio.wait(still, timeout=5)

    def _stop_on_signals(self) -> asyncio.Event:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        return stop


def parse_task(data: bytes) -> dict[str, Any]:
    """A task message, or ValueError saying why it is not one."""
    try:
        body = loads(data)
    except ValueError as exc:
        raise ValueError(f"malformed task: not JSON ({exc})") from None
    if not isinstance(body, dict):
        raise ValueError(f"malformed task: a JSON {type(body).__name__}, not an object")
    for name, kind in (("run", str), ("step", str), ("attempt", int)):
        value = body.get(name)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ValueError(f"malformed task: {name!r} is {value!r}")
    if body.get("item") is not None and not isinstance(body["item"], int):
        raise ValueError(f"malformed task: 'item' is {body['item']!r}")
    return body


@dataclass(frozen=True)
class _NoStatus:
    """A status not written (yet): a run whose tasks an engine from before statuses sent,
    upgraded since. It tells nothing; the attempt's claim still decides."""

    value: bytes = b"{}"


class _StatusReads:
    """Reads of run statuses (`cadenza_run_status`, `<ns>.<run>`: what the engine lets
    agents know of a run) by run id, shared as SharedReads shares them."""

    def __init__(self, kv: Any, namespace: str) -> None:
        self._reads = SharedReads(kv)
        self._namespace = namespace

    async def get(self, run: str) -> Any:
        from nats.js.errors import KeyNotFoundError

        try:
            return await self._reads.get(run_status_key(self._namespace, run))
        except KeyNotFoundError:
            return _NoStatus()


async def _run_reads(js: Any, namespace: str, credentials: bool = False) -> Any:
    """What `abandoned()` and the budget check read, by run id: the run's status; from an
    engine that writes none (no status bucket: one from before statuses, on an open bus),
    the run record as before. With credentials, the bucket is bound without its stream
    info (cadenza._kvbind): the engine that gave them created it."""
    from nats.js.errors import NotFoundError

    if credentials:
        return _StatusReads(bind(js, RUN_STATUS_BUCKET), namespace)
    try:
        return _StatusReads(await js.key_value(RUN_STATUS_BUCKET), namespace)
    except NotFoundError:
        return SharedReads(await js.key_value(RUNS_BUCKET))


async def abandoned(runs_kv: Any, body: dict[str, Any]) -> str | None:
    """Why the attempt a task carries is no longer current, or None when it is; raises when
    the run's status cannot be read (NATS errors), as then nobody can tell.

    It reads the run's status (engine/run_status.py, written before the run's tasks are
    sent): whether the run has ended. Whether the attempt itself finished or was given up
    is its claim's to say (`_claims`: the engine marks every attempt that stops running);
    the checks of the step below apply only to a run record (an engine from before
    statuses) and find nothing to say in a status.

    The engine writes a run record before it sends the record's tasks, so the record read
    here is at least as new as the task; an older one (a lagging replica) shows a lower
    attempt, which counts as current.

    Reading then starting is not atomic: a decision committed after this read (or after
    the read a SharedReads shares) is not seen here. The attempt's claim, taken next,
    closes that window (`_claims`): the engine marks what it gives up before committing.
    """
    from nats.js.errors import KeyNotFoundError

    try:
        entry = await runs_kv.get(body["run"])
    except KeyNotFoundError:
        return "the run no longer exists"
    if not entry.value:
        return "the run no longer exists"
    record = loads(entry.value)
    phase = record.get("phase", "Pending")
    if phase in TERMINAL_RUN_PHASES:
        return f"the run is {phase}"
    step = (record.get("steps") or {}).get(body["step"])
    if step is None:
        return None
    item = body.get("item")
    if item is None:
        slot = step
    else:
        each = step.get("forEach") or {}
        slot = (each.get("running") or {}).get(str(item))
        if slot is None:
            return "the item is no longer running" if item < each.get("next", 0) else None
    attempt = slot.get("attempt", 0)
    if attempt > body["attempt"]:
        return f"attempt {attempt} has superseded it"
    if attempt == body["attempt"] and not slot.get("running", False):
        return "the attempt has finished"
    return None


_reports: set[asyncio.Task[Any]] = set()  # start reports in flight (the loop keeps weak references)


def _report(pub: Any, subject: str, event: dict[str, Any]) -> None:
    """Publish a start report; a lost one costs nothing (the outcome carries the start)."""
    task = asyncio.ensure_future(pub.publish(subject, dumps(event)))
    _reports.add(task)
    task.add_done_callback(_reported)


def _reported(task: asyncio.Task[Any]) -> None:
    _reports.discard(task)
    if not task.cancelled():
        task.exception()  # retrieved: a failed progress report is not an error
