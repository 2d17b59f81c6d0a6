"""`RunClient`: start, read and steer runs, apart from the engine that executes them.

Everything a run's clients do goes through one object: the CLI, the operator, the tests
and the engine itself when a step starts a child run. A client needs no engine in its
process: runs are started and steered by events on the run's subject, read from the runs
bucket and the audit stream.

Approvals, signals and cancellations go two ways:

- `approve`/`signal`/`cancel` publish the event directly. They travel on the run's event
  subject like agent results, so they are durable, ordered with the run's other events
  and idempotent in `decide` (which drops one that does not apply). The operator and the
  engine, which have already checked the run themselves, use these.
- `request` asks a running engine to check the command against the committed run record
  first (engine/control.py) and publish it only then: a person at the CLI is told that a
  run does not exist or that a step is not waiting, instead of a silent no-op.
"""

from __future__ import annotations

import builtins
import hashlib
import time
import uuid
from contextlib import aclosing
from typing import Any

from cadenza.nats import Publisher, offload_payload, resolve_payload
from cadenza.wire import (
    DEFINITIONS_BUCKET,
    OUTPUTS_BUCKET,
    REF_KEY,
    RUNS_BUCKET,
    dumps,
    event_subject,
    is_ref,
    loads,
)

from ..models import WorkflowSpec
from .audit import read_audit
from .control import control_subject, retry_refusal
from .decide.reuse import reused_steps
from .definition import CompiledWorkflow, compile_workflow, definition_document
from .infra import current_entries
from .inputs import validate_input
from .payloads import store_apart
from .state import RunState


class DefinitionNotFound(LookupError):
    """A workflow definition no engine has published (or one since removed)."""


class RetryRefused(ValueError):
    """A run that cannot be retried as asked: the message says why."""


REUSE_INLINE_BYTES = 256 * 1024
"""Reused outputs a retry's start event carries inline; larger ones go to the outputs bucket."""


def new_run_id(workflow: str) -> str:
    return f"{workflow}-{uuid.uuid4().hex[:10]}"


class RunClient:
    """A client of the runs one NATS holds; `await RunClient(nc).open()` before use.

    `max_value_bytes` bounds a run's input (None: CADENZA_MAX_VALUE_BYTES, else the
    default). An engine hands its own `publisher` so that its publishes share one batch.
    """

    def __init__(self, nc: Any, *, max_value_bytes: int | None = None, publisher: Publisher | None = None):
        self.nc = nc
        self.js = nc.jetstream()
        self.max_value_bytes = max_value_bytes
        self._own_publisher = publisher is None
        self.pub = publisher or Publisher(nc)
        self.definitions: dict[str, CompiledWorkflow] = {}
        """Compiled definitions by key, kept once read: a definition never changes under its key."""
        self.kv: Any = None
        self.outputs_kv: Any = None
        self.defs_kv: Any = None

    async def open(self) -> RunClient:
        """Bind the buckets (they must exist: an engine, or `ensure_infrastructure`, made them)."""
        self.kv = await self.js.key_value(RUNS_BUCKET)
        self.outputs_kv = await self.js.key_value(OUTPUTS_BUCKET)
        self.defs_kv = await self.js.key_value(DEFINITIONS_BUCKET)
        return self

    async def close(self) -> None:
        """Flush what this client published (the connection stays the caller's)."""
        if self._own_publisher:
            await self.pub.close()

    # --------------------------------------------------------------- definitions
    async def publish_definition(self, wf: CompiledWorkflow) -> str:
        """Store a compiled workflow so any engine can execute (and resume) its runs."""
        self.definitions[wf.key] = wf
        doc = dumps(definition_document(wf))
        await self.defs_kv.put(f"wf.{wf.key}", doc)
        await self.defs_kv.put(f"latest.{wf.namespace}.{wf.name}", wf.key.encode())
        return wf.key

    async def definition(self, key: str) -> CompiledWorkflow:
        """The definition stored under `key`, or DefinitionNotFound."""
        from nats.js.errors import InvalidKeyError, KeyNotFoundError

        wf = self.definitions.get(key)
        if wf is None:
            try:
                entry = await self.defs_kv.get(f"wf.{key}")
            except (KeyNotFoundError, InvalidKeyError):
                raise DefinitionNotFound(f"workflow definition {key!r} not found") from None
            doc = loads(entry.value)
            wf = compile_workflow(doc["name"], WorkflowSpec.model_validate(doc["spec"]), doc["namespace"])
            self.definitions[key] = wf
        return wf

    async def latest_definition(self, namespace: str, name: str) -> CompiledWorkflow:
        """The definition last published for workflow `name` of `namespace`."""
        entry = await self.defs_kv.get(f"latest.{namespace}.{name}")
        return await self.definition(entry.value.decode())

    # ---------------------------------------------------------------------- runs
    async def start(
        self,
        wf: CompiledWorkflow,
        input: Any = None,
        *,
        run_id: str | None = None,
        labels: dict[str, str] | None = None,
        parent: dict[str, Any] | None = None,
        scope: str | None = None,
        requested_at: float | None = None,
        retry_of: str | None = None,
        reuse: dict[str, dict[str, Any]] | None = None,
        by: str | None = None,
    ) -> str:
        """Validate the input, then start the run; return its id. Idempotent for a given run_id.

        `retry_of` and `reuse`: the run this one retries and the results of its steps taken
        as they are (`retry_run` computes them; engine/decide/reuse.py applies them).

        `requested_at` is when the run was asked for, if it waited before this call (a
        trigger event held back by maxActiveRuns): its first steps count as ready from then.

        An input too large for an event goes through the object store; a child run's may
        arrive as a reference already (its parent's engine sent it that way).
        """
        if not is_ref(input):
            validate_input(wf, input, self.max_value_bytes)
        elif wf.spec.inputSchema is not None:
            validate_input(
                wf, await resolve_payload(self.js, input, namespace=wf.namespace), self.max_value_bytes
            )
        if wf.key not in self.definitions:
            await self.publish_definition(wf)
        run = run_id or new_run_id(wf.name)
        body = {
            "type": "start",
            "run": run,
            "workflow": wf.name,
            "namespace": wf.namespace,
            "definition": wf.key,
            "input": input,
            "labels": labels or {},
            "parent": parent,
            "scope": scope or run,
        }
        if requested_at is not None:
            body["requestedAt"] = requested_at
        if retry_of is not None:
            body.update(retryOf=retry_of, reuse=reuse or {})
        if by is not None:
            body["by"] = by
        body["input"] = await offload_payload(self.js, f"{run}.input", input, namespace=wf.namespace)
        await self.pub.publish(event_subject(wf.namespace, run), dumps(body), {"Nats-Msg-Id": f"start:{run}"})
        return run

    async def retry(
        self, namespace: str, run: str, from_step: str | None = None, *, by: str, key: str | None = None
    ) -> str:
        """Start a new run of `run`'s definition and input that reuses the outputs of the
        steps it finished well and runs the others again (with `from_step`, that step and
        what depends on it too); return the new run's id. RetryRefused (naming the run or
        the step) for a run of another namespace, one not finished, an unknown step.
        The same `key` starts the same run once, however often it is asked for."""
        state = await self.get(run)
        if state is None or state.namespace != namespace:
            raise RetryRefused(f"no run {run} in namespace {namespace}")
        wf = await self.definition(state.definition)
        refused = retry_refusal(state, wf, from_step)
        if refused is not None:
            raise RetryRefused(refused)
        return await self.retry_run(state, from_step=from_step, by=by, key=key)

    async def retry_run(
        self, state: RunState, *, from_step: str | None = None, by: str, key: str | None = None
    ) -> str:
        """`retry` of a run already checked (`control.retry_refusal`): the engine's control
        responder calls it once it has read and checked the record."""
        wf = await self.definition(state.definition)
        seed = f"{state.run}\0{from_step or ''}\0{key if key is not None else uuid.uuid4().hex}"
        new = f"{wf.name}-{hashlib.sha256(seed.encode()).hexdigest()[:10]}"
        reuse: dict[str, dict[str, Any]] = {}
        inline = 0
        for name in reused_steps(state, wf, from_step):
            st = state.steps[name]
            if st.outputRef is not None:
                # Kept where the retried run stored it: a forEach's items, a large output.
                taken: dict[str, Any] = {"outputRef": st.outputRef}
                if st.forEach is not None:
                    taken["items"] = st.forEach.total
            else:
                size = len(dumps(st.output))
                inline += size
                taken = {"output": st.output}
                if inline > REUSE_INLINE_BYTES:  # the start event must stay one message
                    ref = f"{new}.{name}"
                    await store_apart(self.js, self.pub, ref, st.output, state.namespace)
                    taken = {"outputRef": ref}
                    inline -= size
            reuse[name] = taken
        return await self.start(
            wf,
            await self._run_input(state),
            run_id=new,
            retry_of=state.run,
            reuse=reuse,
            by=by,
        )

    async def _run_input(self, state: RunState) -> Any:
        """A run's input as a new run can be given it: the value, or the object-store
        reference a large one is kept under (not copied)."""
        if state.inputRef is None:
            return state.input
        entry = await self.outputs_kv.get(state.inputRef)
        return loads(entry.value)

    async def get(self, run: str) -> RunState | None:
        """The run's committed record, or None for a run the bucket does not hold."""
        from nats.js.errors import InvalidKeyError, KeyNotFoundError

        try:
            entry = await self.kv.get(run)
        except (KeyNotFoundError, InvalidKeyError):
            return None
        return RunState.from_bytes(entry.value) if entry.value else None

    async def list(self, namespace: str | None = None) -> list[RunState]:
        """Every run the bucket holds (of `namespace`, when given), in key order: one pass
        over the bucket's current values (`infra.current_entries`)."""
        runs = []
        async with aclosing(current_entries(self.js, RUNS_BUCKET, self.kv)) as entries:
            async for entry in entries:
                state = RunState.from_bytes(entry.value) if entry.value else None
                if state is not None and (namespace is None or state.namespace == namespace):
                    runs.append(state)
        return sorted(runs, key=lambda state: state.run)

    async def recent(
        self, namespace: str | None = None, limit: int = 500, keep: Any = None
    ) -> builtins.list[RunState]:
        """The newest `limit` runs (of `namespace`, when given; those `keep(state)` accepts),
        newest first: one pass over the bucket's current values (`infra.current_entries`),
        not one read per key. Needs a consumer on the runs bucket, which a client credential
        may not create (nats.errors.TimeoutError then)."""
        import heapq

        newest: builtins.list[tuple[float, str, RunState]] = []
        async with aclosing(current_entries(self.js, RUNS_BUCKET, self.kv)) as entries:
            async for entry in entries:
                if not entry.value:
                    continue
                state = RunState.from_bytes(entry.value)
                if namespace is not None and state.namespace != namespace:
                    continue
                if keep is not None and not keep(state):
                    continue
                item = (state.createdAt, state.run, state)
                if len(newest) < limit:
                    heapq.heappush(newest, item)
                elif item[:2] > newest[0][:2]:
                    heapq.heapreplace(newest, item)
        return [state for _, _, state in sorted(newest, key=lambda i: i[:2], reverse=True)]

    async def outputs(self, state: RunState) -> Any:
        """The run's outputs, loaded from where they are kept when too large for the record."""
        from nats.js.errors import KeyNotFoundError

        from .decide import OBJECT_REF_PREFIX

        key = state.outputsRef
        if key is None:
            return state.outputs
        if key.startswith(OBJECT_REF_PREFIX):
            return await resolve_payload(
                self.js, {REF_KEY: key[len(OBJECT_REF_PREFIX) :]}, namespace=state.namespace
            )
        try:
            entry = await self.outputs_kv.get(key)
        except KeyNotFoundError:
            return None
        return await resolve_payload(self.js, loads(entry.value), namespace=state.namespace)

    async def audit(self, namespace: str, run: str = ">", idle: float = 0.5) -> builtins.list[dict[str, Any]]:
        """Every audit record of one run (or, with run='>', of every run of a namespace), in order."""
        return await read_audit(self.js, namespace, run, idle)

    # ---------------------------------------------------- steering, unchecked
    async def approve(
        self,
        namespace: str,
        run: str,
        step: str,
        approved: bool = True,
        *,
        by: str,
        comment: str | None = None,
    ) -> None:
        """Approve (or reject) the approval step `step` of `run`, as `by`."""
        body = {
            "type": "approval",
            "run": run,
            "step": step,
            "approved": approved,
            "by": by,
            "comment": comment,
            "sentAt": time.time(),
        }
        await self.js.publish(
            event_subject(namespace, run),
            dumps(body),
            headers={"Nats-Msg-Id": f"approval:{run}:{step}:{by}:{approved}"},
        )

    async def signal(
        self, namespace: str, run: str, name: str, payload: Any = None, *, by: str = "cli"
    ) -> None:
        """Send signal `name` (once per run) with `payload` to `run`."""
        body = {"type": "signal", "run": run, "name": name, "payload": payload, "by": by}
        await self.js.publish(
            event_subject(namespace, run), dumps(body), headers={"Nats-Msg-Id": f"signal:{run}:{name}"}
        )

    async def cancel(self, namespace: str, run: str, *, by: str, reason: str = "") -> None:
        """Cancel `run`: its running steps are told to stop, it ends Cancelled."""
        body = {"type": "cancel", "run": run, "by": by, "reason": reason}
        await self.js.publish(
            event_subject(namespace, run), dumps(body), headers={"Nats-Msg-Id": f"cancel:{run}"}
        )

    async def resume(
        self,
        namespace: str,
        run: str,
        *,
        by: str,
        tokens: int | None = None,
        cost: float | None = None,
        key: str = "",
    ) -> None:
        """Resume `run`, paused by its budget, with a new budget (`tokens`, `cost`; unset
        keeps that limit). `key` tells resumes of the run apart for de-duplication (each
        pause needs its own resume): the checked path passes the record's audit sequence."""
        body = {"type": "resume", "run": run, "by": by, "tokens": tokens, "cost": cost}
        await self.js.publish(
            event_subject(namespace, run), dumps(body), headers={"Nats-Msg-Id": f"resume:{run}:{key}"}
        )

    # ------------------------------------------------------ steering, checked
    async def request(
        self, namespace: str, request: dict[str, Any], wait: float, user: str | None = None
    ) -> dict[str, Any] | None:
        """Ask a running engine to check a command (`{"op": "approve"|"signal"|"cancel",
        "run": ..., ...}`) against the run and apply it; its answer (`ok`, `error` or
        `message`), or None when no engine answers within `wait` seconds. `user`: the
        credential's user, on whose subject the request goes (engine/control.py)."""
        from nats.errors import NoRespondersError
        from nats.errors import TimeoutError as NatsTimeout

        try:
            msg = await self.nc.request(control_subject(namespace, user), dumps(request), timeout=wait)
        except (NoRespondersError, NatsTimeout):
            return None
        reply: dict[str, Any] = loads(msg.data)
        return reply
