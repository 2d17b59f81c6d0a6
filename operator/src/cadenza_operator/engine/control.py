"""Commands a person gives a run (approve, reject, signal, cancel), answered by an engine.

Published blindly on the run's event subject, a command cannot tell its sender that the
run does not exist, has finished, or that the step is not waiting: `decide` drops such an
event as a no-op, and the sender is told "approved". So the CLI asks an engine over NATS
request/reply instead (`cadenza.control.<namespace>`): the engine reads the committed
run record, checks the command against it (`refusal`, pure) and only then publishes the
event with the engine's `RunClient` (same subjects, same de-duplication ids), so an
accepted command is still durable, ordered with the run's events and idempotent.

Every engine subscribes in one queue group: with several engines, each request is
answered by one of them. Each engine answers its requests one at a time, in the order
they came (a check is one KV read: commands from people need no parallelism), so a reply
from an engine means it has answered everything sent to it before.

The check and the event are not atomic: the run may move on between them (an approval
timer fires). `decide` still treats the event as it always did, so the worst case is an
accepted command that turns out to be a no-op, never a run advanced wrongly.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any

import structlog
from cadenza.wire import dumps, loads

from .decide.events import GROUP_PREFIX, is_approver
from .state import RUN_ID

if TYPE_CHECKING:
    from .definition import CompiledWorkflow
    from .runtime import Engine
    from .state import RunState

log = structlog.get_logger("cadenza.engine.control")

CONTROL_PREFIX = "cadenza.control"
CONTROL_SUBJECTS = f"{CONTROL_PREFIX}.>"  # <namespace>, or <namespace>.<user> (a credential's)
CONTROL_QUEUE = "cadenza-engines"
"""The queue group every engine's responder joins: one answer per request."""
OPERATIONS = frozenset({"approve", "signal", "cancel", "resume", "retry", "list"})
MAX_LISTED = 500
"""Runs one `list` answer carries at most: their summaries fit one NATS message."""
MAX_ADDED_WAITING = 8
"""Requests for added operations (the diagnose report) an engine holds at once; more are
refused as busy, so that a client asking in a loop cannot pile work on an engine."""
RECORDED_WAIT = 5.0
"""Seconds a retry's answer waits for the new run's record (see `_until_recorded`)."""


def control_subject(namespace: str, user: str | None = None) -> str:
    """With `user`, the one subject a client credential may send requests on (its JWT's
    name, security/nats_auth.client_permissions): nats-server does not tell a responder
    who sent a request, so the engine takes the user from the subject."""
    return f"{CONTROL_PREFIX}.{namespace}" + (f".{user}" if user else "")


def as_user(request: dict[str, Any], user: str) -> dict[str, Any]:
    """A request that came on a user's subject decides as that user: `by` is the verified
    identity (what approvers are checked against and the audit's actor); a different
    `--by` the client gave is kept as a display name in the comment, marked as asserted."""
    shown = request.get("by")
    verified = {**request, "by": user}
    if isinstance(shown, str) and shown not in ("", "cli", user):
        comment = request.get("comment")
        verified["comment"] = f"[--by {shown}, not verified]" + (f" {comment}" if comment else "")
    return verified


def refusal(request: dict[str, Any], state: RunState | None, wf: CompiledWorkflow | None) -> str | None:
    """Why `request` cannot be applied to the run as its committed record has it, or None.

    `state` is None for a run the namespace does not hold; `wf` is the run's definition
    (needed for approve and signal only).
    """
    run, namespace = request.get("run"), request.get("namespace", "default")
    if state is None or state.namespace != namespace:
        return f"no run {run} in namespace {namespace}"
    if request.get("op") == "retry":
        return retry_refusal(state, wf, request.get("from"))
    if state.terminal:
        return f"run {run} already {state.phase}"
    op = request.get("op")
    if op == "cancel":
        if state.failing or state.exitPhase is not None:
            return f"run {run} is already ending ({state.failing or 'its steps are done'})"
        return None
    if op == "resume":
        if state.phase != "Paused":
            return f"run {run} is not Paused (it is {state.phase})"
        return None
    if wf is None:  # pragma: no cover - the caller loads it for approve and signal
        return f"run {run}: its workflow definition could not be read"
    if op == "approve":
        return _approval_refusal(request, state, wf)
    if op == "signal":
        name = str(request.get("name"))
        if name not in wf.signals:
            waited = ", ".join(sorted(wf.signals)) or "none"
            return f"no step of workflow {wf.name} waits for signal {name} (signals: {waited})"
        if name in state.signals:
            return f"run {run} already received signal {name}"
        return None
    return f"unknown command {op!r}"


def retry_refusal(state: RunState, wf: CompiledWorkflow | None, from_step: Any = None) -> str | None:
    """Why the run cannot be retried (from `from_step`), or None: only a finished run can,
    and the step to start again from must be one of its workflow's."""
    if not state.terminal:
        return (
            f"run {state.run} is {state.phase}: only a finished run (Succeeded, Failed, Cancelled) "
            "can be retried; cancel it first"
        )
    if from_step is not None:
        if wf is None:  # pragma: no cover - the caller loads it for retry
            return f"run {state.run}: its workflow definition could not be read"
        if not isinstance(from_step, str) or from_step not in wf.steps:
            return f"--from {from_step}: workflow {wf.name} has no such step (steps: {', '.join(wf.order)})"
    return None


def _approval_refusal(request: dict[str, Any], state: RunState, wf: CompiledWorkflow) -> str | None:
    run, step, by = request.get("run"), str(request.get("step")), str(request.get("by") or "")
    cs = wf.steps.get(step)
    if cs is None:
        return f"run {run} has no step {step} (steps: {', '.join(wf.order)})"
    approval = getattr(cs.spec, "approval", None)
    if cs.kind != "approval" or approval is None:
        return f"step {step} of run {run} is not an approval step"
    st = state.steps.get(step)
    phase = st.phase if st is not None else "Pending"
    if phase != "WaitingApproval":
        return f"step {step} of run {run} is not waiting for approval (it is {phase})"
    if f"[{GROUP_PREFIX}" in by:
        return f"refused: {by!r}: only the operator vouches for a group (Kubernetes admission checked it)"
    if not is_approver(approval.approvers, by):
        return f"refused: {by} is not an approver of {step} (approvers: {', '.join(approval.approvers)})"
    return None


def waiting_for(state: RunState, wf: CompiledWorkflow, signal: str) -> list[str]:
    """The steps of the run waiting for `signal` now (none: the run remembers it for later)."""
    return [
        name
        for name, st in state.steps.items()
        if st.phase == "Running"
        and (cs := wf.steps.get(name)) is not None
        and cs.kind == "signal"
        and getattr(getattr(cs.spec, "waitFor", None), "signal", None) == signal
    ]


class ControlResponder:
    """An engine's answers to control requests; `start` after the engine's buckets are open."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._sub: Any = None
        self._added = asyncio.Semaphore(1)
        """The process's added operations (`Engine.operations`: the diagnose report) one at a
        time: each may read thousands of records, and decisions share this event loop."""
        self._background: set[asyncio.Task[None]] = set()  # their requests, waiting or answered

    async def start(self) -> None:
        self._sub = await self.engine.nc.subscribe(CONTROL_SUBJECTS, queue=CONTROL_QUEUE, cb=self._on_request)

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)

    async def _on_request(self, msg: Any) -> None:
        if not msg.reply:
            return  # a publish, not a request: nobody to answer
        namespace, _, user = msg.subject[len(CONTROL_PREFIX) + 1 :].partition(".")
        try:
            request = loads(msg.data)
            if not isinstance(request, dict):
                raise ValueError(f"a JSON {type(request).__name__}, not an object")
            if "." in user:
                raise ValueError(f"subject {msg.subject}: expected {CONTROL_PREFIX}.<namespace>[.<user>]")
            if user:
                request = as_user(request, user)
            request = {**request, "namespace": namespace}
        except ValueError as exc:
            await self._respond(msg, {"ok": False, "error": f"malformed request: {exc}"})
            return
        if request.get("op") in self.engine.operations:
            # Read-only and maybe long (a report over thousands of runs): answered beside
            # the requests that change runs, which keep their order and their answer time.
            if len(self._background) >= MAX_ADDED_WAITING:
                busy = f"engine {self.engine.settings.name} is busy with {MAX_ADDED_WAITING} such requests"
                await self._respond(msg, {"ok": False, "error": busy})
                return
            task = asyncio.create_task(self._answer_and_respond(msg, request))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            return
        await self._answer_and_respond(msg, request)

    async def _answer_and_respond(self, msg: Any, request: dict[str, Any]) -> None:
        try:
            reply = await self.answer(request)
        except asyncio.CancelledError:
            raise
        except ValueError as exc:
            reply = {"ok": False, "error": f"malformed request: {exc}"}
        except Exception as exc:
            log.warning("control request failed", subject=msg.subject, error=repr(exc))
            reply = {"ok": False, "error": f"engine {self.engine.settings.name} failed: {exc}"}
        await self._respond(msg, reply)

    async def _respond(self, msg: Any, reply: dict[str, Any]) -> None:
        reply["engine"] = self.engine.settings.name
        data = dumps(reply)
        limit = self.engine.nc.max_payload
        if len(data) > limit:  # refused by the server: the asker would hear nothing at all
            error = f"the answer ({len(data):,} bytes) exceeds the NATS server's max_payload ({limit:,})"
            data = dumps({"ok": False, "error": error, "engine": self.engine.settings.name})
        with contextlib.suppress(Exception):
            await msg.respond(data)

    async def _retry_started(self, wf: CompiledWorkflow, new: str, info: dict[str, Any]) -> None:
        """Tell the process's hook (the operator's: a WorkflowRun for the retry) of the new
        run. Each time the retry is answered: the hook is idempotent, as the run's start is.
        The run has started whatever the hook does: a failing hook is logged, not replied."""
        hook = self.engine.on_run_started
        if hook is None:
            return
        try:
            result = hook(wf, new, info)
            if asyncio.iscoroutine(result):
                await result
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning(
                "retry started, but its hook failed", run=new, retry_of=info.get("retryOf"), error=repr(exc)
            )

    async def listing(self, request: dict[str, Any]) -> dict[str, Any]:
        """The newest runs of the request's namespace, summarized (`cadenza list` under a
        client credential, which may read runs by id only): the namespace is the one the
        request came on, so a credential lists its own namespace's runs and no other's."""
        import time

        from .view import RunFilter, run_view, summary

        limit, since = request.get("limit"), request.get("since")
        limit = limit if isinstance(limit, int) and 0 < limit <= MAX_LISTED else MAX_LISTED
        wanted = RunFilter(
            workflow=request.get("workflow") if isinstance(request.get("workflow"), str) else None,
            phase=request.get("phase") if isinstance(request.get("phase"), str) else None,
            since=float(since) if isinstance(since, int | float) and since > 0 else None,
        )
        now = time.time()
        states = await self.engine.client.recent(request["namespace"], limit, lambda s: wanted.keeps(s, now))
        return {"ok": True, "runs": [summary(run_view(s), now) for s in states]}

    async def _until_recorded(self, run: str, within: float = RECORDED_WAIT) -> bool:
        """Wait until `run` has a record (an engine has decided its start event), at most
        `within` seconds: the answer to a retry then names a run that `cadenza get` and the
        console's page find, instead of "no run" for the moment it takes an engine to
        take the event. An engine behind on its events starts the run all the same later."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        delay = 0.005
        while await self.engine.client.get(run) is None:
            if loop.time() >= deadline:
                log.warning("retry started, its record not yet written", run=run, waited=within)
                return False
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.1)
        return True

    async def answer(self, request: dict[str, Any]) -> dict[str, Any]:
        """Check the request against the committed run record; publish its event if accepted."""
        op, run, namespace = request.get("op"), request.get("run"), request["namespace"]
        added = self.engine.operations.get(op) if isinstance(op, str) else None
        if added is not None:
            async with self._added:
                return await added(self.engine.client, request)
        if op not in OPERATIONS:
            return {"ok": False, "error": f"unknown command {op!r}"}
        if op == "list":
            return await self.listing(request)
        if not isinstance(run, str) or not RUN_ID.match(run):
            return {"ok": False, "error": f"{run!r} is not a run id"}
        client = self.engine.client
        state = await client.get(run)
        wf = None
        if state is not None and op in ("approve", "signal", "retry"):
            wf = await client.definition(state.definition)
        error = refusal(request, state, wf)
        by = str(request.get("by") or "cli")
        if error is not None:
            log.info("control request refused", op=op, run=run, namespace=namespace, by=by, reason=error)
            # Another namespace's run is not there for this client: not even its phase.
            mine = state is not None and state.namespace == namespace
            return {"ok": False, "error": error, "phase": state.phase if mine and state else None}
        reply: dict[str, Any] = {"ok": True, "run": run}
        if op == "retry" and state is not None:
            from_step = request.get("from")
            key = request.get("key")
            new = await client.retry_run(
                state, from_step=from_step, by=by, key=key if isinstance(key, str) else None
            )
            reply["newRun"] = new
            await self._until_recorded(new)
            if wf is not None:
                await self._retry_started(
                    wf, new, {"source": "retry", "retryOf": run, "from": from_step, "by": by}
                )
            # the new run's id last: a script takes the last word
            again = f" from step {from_step}" if from_step else ""
            reply["message"] = f"retry of {run}{again} started: run {new}"
        elif op == "approve":
            approved = bool(request.get("approved", True))
            await client.approve(
                namespace, run, str(request["step"]), approved, by=by, comment=request.get("comment")
            )
            reply["message"] = f"{'approved' if approved else 'rejected'} {run}/{request['step']} as {by}"
        elif op == "signal":
            name = str(request.get("name"))
            await client.signal(namespace, run, name, request.get("payload"), by=by)
            steps = waiting_for(state, wf, name) if state is not None and wf is not None else []
            reply["message"] = f"signal {name} sent to {run}" + (
                f" (for {', '.join(steps)})" if steps else " (no step waits for it yet: the run keeps it)"
            )
        elif op == "resume":
            tokens, cost = request.get("tokens"), request.get("cost")
            await client.resume(
                namespace,
                run,
                by=by,
                tokens=tokens if isinstance(tokens, int) else None,
                cost=float(cost) if isinstance(cost, int | float) else None,
                key=str(state.auditSeq if state is not None else 0),
            )
            raised = [f"{k} {v:g}" for k, v in (("tokens", tokens), ("cost", cost)) if v is not None]
            reply["message"] = f"resume of {run} requested" + (
                f" with a budget of {', '.join(raised)}" if raised else ""
            )
        else:
            await client.cancel(namespace, run, by=by, reason=str(request.get("reason") or ""))
            reply["message"] = f"cancellation of {run} requested"
        log.info("control request accepted", op=op, run=run, namespace=namespace, by=by)
        return reply
