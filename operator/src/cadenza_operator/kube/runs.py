"""WorkflowRun handlers: start the run in the engine, mirror the run record into a bounded
status with coalesced writes, turn annotations into approvals, cancel on deletion, and
mirror runs started by triggers or retries as WorkflowRuns.

Write budget: the run record changes on every event of the run (thousands for a large
fan-out); the WorkflowRun is written at most once per `status_interval` while the run
goes on, plus once at its end. kopf adds a fixed few (finalizer, its own bookkeeping),
so writes per run are bounded by the run's duration, never by its number of steps.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import Mapping
from typing import Any, NoReturn

import kopf
import structlog

from .. import metrics
from ..engine.decide.events import is_approver
from ..engine.definition import CompiledWorkflow
from ..engine.inputs import InputError
from ..engine.state import TERMINAL_RUN, RunState
from ..models import API_GROUP, API_VERSION, GROUP_VERSION, WorkflowRun
from . import events
from .api import ApiError, path_of, workflowrun_path
from .context import OperatorContext, context_of
from .feed import RunFollower
from .settings import OperatorSettings
from .specs import InvalidSpec, load_resource
from .status import (
    RunRecord,
    agent_waits_message,
    condition,
    merge_patch_apply,
    merge_patch_diff,
    phases_of_status,
    run_status,
)

log = structlog.get_logger("cadenza.operator")

WORKFLOWRUNS = (API_GROUP, API_VERSION, "workflowruns")
RUN_ID_ANNOTATION = "cadenza.dev/run-id"
"""Written by the operator: the run a WorkflowRun follows. Never read as an instruction: a
user could name another namespace's run with it (see `resolve_run`)."""
APPROVE_ANNOTATION = "cadenza.dev/approve"
REJECT_ANNOTATION = "cadenza.dev/reject"
APPROVED_BY_ANNOTATION = "cadenza.dev/approved-by"
"""Who decides; the chart's admission policy admits it only as the requesting user's name."""
APPROVED_BY_GROUP_ANNOTATION = "cadenza.dev/approved-by-group"
"""A group the deciding user belongs to (admission checks it), matching `group:NAME` approvers."""
COMMENT_ANNOTATION = "cadenza.dev/comment"
RESUME_ANNOTATION = "cadenza.dev/resume"
"""`tokens=N,cost=X` (either or both): resume a run paused by its budget with that budget."""
WORKFLOW_LABEL = "cadenza.dev/workflow"
"""On WorkflowRuns subject to the Workflow's runHistoryLimit (the mirrors of runs started by
a trigger or a retry)."""
TRIGGER_LABEL = "cadenza.dev/trigger"
RETRY_OF_LABEL = "cadenza.dev/retry-of"
"""On the mirror of a retry: the retried run's WorkflowRun (`kubectl get wfr -l
cadenza.dev/retry-of=NAME`), or its run id where the name is no label value."""
RETRY_OF_RUN_ANNOTATION = "cadenza.dev/retry-of-run"
"""On the mirror of a retry: the retried run's id."""
RETRY_FROM_ANNOTATION = "cadenza.dev/retry-from"
"""On the mirror of a `retry --from STEP`: the step."""
RETRIED_REASON = "Retried"
"""The Event on a WorkflowRun whose run was retried, naming the retry's WorkflowRun."""
MIRRORED_KEYS = frozenset({"stepsNotListed"})
"""Status keys the mirror writes only sometimes: removed when no longer wanted."""
WORKFLOWRUN_LABEL = "cadenza.dev/workflowrun"
"""Engine run label naming the WorkflowRun a run was started for."""

Json = dict[str, Any]


# ---------------------------------------------------------------------- pure parts


def run_id_for(namespace: str, name: str, uid: str) -> str:
    """The engine run id of a WorkflowRun, derived from its uid: a retried handler or a
    restarted operator starts the same run (idempotent in the engine), never a second
    one, and a WorkflowRun deleted and re-created under the same name gets a new run.

    Only what the API server fixes (the uid, and the immutable name as a readable prefix)
    goes in, never an annotation: a user who could name the run could name another
    namespace's. The namespace is checked against the run record instead (`resolve_run`)."""
    # Run ids are NATS subject tokens: no dots; names may have them.
    safe = re.sub(r"[^a-z0-9-]", "-", name.lower())[:40].strip("-") or "run"
    return f"{safe}-{uid.replace('-', '')[:10]}"


def run_id_of(body: kopf.Body) -> str:
    meta = body.metadata
    return run_id_for(meta.namespace or "default", meta.name or "", meta.uid or "")


def mirrored_run_name(run_id: str) -> str:
    """The name of the WorkflowRun mirroring a run a trigger or a retry started."""
    return re.sub(r"[^a-z0-9-]", "-", run_id.lower())[:63].strip("-")


def looks_like_mirror(name: str, labels: Mapping[str, str], run_id: str) -> bool:
    """Whether a WorkflowRun is shaped like the mirror the operator makes for a run a trigger
    or a retry started (`mirrored_run_manifest`): the run's record, once there, must still
    agree (`is_mirror_of`)."""
    started = TRIGGER_LABEL in labels or RETRY_OF_LABEL in labels
    return WORKFLOW_LABEL in labels and started and mirrored_run_name(run_id) == name


def is_mirror_of(namespace: str, state: RunState) -> bool:
    """Whether a mirror may follow `state`: a run a trigger or a retry started in the same
    namespace, never one a WorkflowRun started nor another namespace's."""
    return state.namespace == namespace and WORKFLOWRUN_LABEL not in state.labels


def approver_identity(annotations: Mapping[str, str]) -> str:
    """The identity a decision made through Kubernetes is sent and audited with: the user the
    admission policy bound `approved-by` to, and the group named beside it (`group:NAME`
    approvers match it; see engine.decide.events.is_approver)."""
    user = str(annotations.get(APPROVED_BY_ANNOTATION) or "kubectl")
    group = str(annotations.get(APPROVED_BY_GROUP_ANNOTATION) or "")
    return f"{user} [group:{group}]" if group else user


def decisions_from_annotations(annotations: Mapping[str, str]) -> dict[str, bool]:
    """{step: approved} from `cadenza.dev/approve=a,b` and `cadenza.dev/reject=c`; reject wins."""
    decisions: dict[str, bool] = {}
    for key, approved in ((APPROVE_ANNOTATION, True), (REJECT_ANNOTATION, False)):
        for step in str(annotations.get(key) or "").split(","):
            if step.strip():
                decisions[step.strip()] = approved
    return decisions


def resume_from_annotation(value: str) -> tuple[int | None, float | None]:
    """(tokens, cost) from `cadenza.dev/resume=tokens=N,cost=X`; ValueError naming what is wrong."""
    tokens: int | None = None
    cost: float | None = None
    for part in (p.strip() for p in value.split(",")):
        key, _, number = part.partition("=")
        try:
            if key.strip() == "tokens" and int(number) > 0:
                tokens = int(number)
                continue
            if key.strip() == "cost" and float(number) > 0:
                cost = float(number)
                continue
        except ValueError:
            pass
        raise ValueError(f"{RESUME_ANNOTATION}: {part!r} is not tokens=N or cost=X (numbers above 0)")
    return tokens, cost


def status_patch(written: Mapping[str, Any], wanted: Mapping[str, Any]) -> Json:
    """The merge patch taking the status as written to the wanted one (empty: no write).

    Only keys the mirror owns are compared: others (none today) are left alone."""
    return merge_patch_diff({k: v for k, v in written.items() if k in wanted or k in MIRRORED_KEYS}, wanted)


def run_record(
    name: str, labels: Mapping[str, str], spec: Mapping[str, Any], status: Mapping[str, Any], created: str
) -> RunRecord:
    return RunRecord(
        name=name,
        phase=str(status.get("phase") or ""),
        created=created,
        finished=str(status.get("finishedAt") or ""),
        mirrored=WORKFLOW_LABEL in labels,
    )


LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def mirrored_run_manifest(
    wf: CompiledWorkflow,
    run_id: str,
    source: str,
    *,
    retry_of: str | None = None,
    retried_name: str = "",
    from_step: str | None = None,
) -> Json:
    """A WorkflowRun for a run a trigger (`source`) or a retry (`retry_of`: the retried run,
    `retried_name`: its WorkflowRun's name) started, named after the run."""
    labels = {WORKFLOW_LABEL: wf.name}
    annotations = {RUN_ID_ANNOTATION: run_id}
    if retry_of is None:
        labels[TRIGGER_LABEL] = source
    else:
        fits = len(retried_name) <= 63 and LABEL_VALUE.match(retried_name)
        labels[RETRY_OF_LABEL] = retried_name if retried_name and fits else mirrored_run_name(retry_of)
        annotations[RETRY_OF_RUN_ANNOTATION] = retry_of
        if from_step:
            annotations[RETRY_FROM_ANNOTATION] = from_step
    return {
        "apiVersion": GROUP_VERSION,
        "kind": "WorkflowRun",
        "metadata": {
            "name": mirrored_run_name(run_id),
            "namespace": wf.namespace,
            "labels": labels,
            "annotations": annotations,
        },
        "spec": {"workflowRef": wf.name},
    }


# ---------------------------------------------------------------------- handlers


async def workflowrun_start(
    body: kopf.Body, memo: kopf.Memo, patch: kopf.Patch, retry: int = 0, **_: Any
) -> None:
    """create/resume: start the engine run (once: the run id is deterministic)."""
    ctx = context_of(memo)
    status = dict(body.status or {})
    if status.get("phase") in TERMINAL_RUN:
        return
    run_id, state = await resolve_run(ctx, body)
    if (body.metadata.annotations or {}).get(RUN_ID_ANNOTATION) != run_id:
        patch.metadata.setdefault("annotations", {})[RUN_ID_ANNOTATION] = run_id  # an output only
    if run_id != run_id_of(body):
        return  # the mirror of a run that a trigger or a retry started
    try:
        run = load_resource(WorkflowRun, body)
    except InvalidSpec as exc:
        _fail(body, patch, "InvalidSpec", str(exc))
    if state is not None:
        return  # started before an operator restart; the mirror daemon follows it
    namespace = run.metadata.namespace or "default"
    wf = await _definition(ctx, body, patch, namespace, run.spec.workflowRef, retry)
    labels = {WORKFLOWRUN_LABEL: run.metadata.name}
    try:
        await ctx.client.start(wf, run.spec.input, run_id=run_id, labels=labels)
    except InputError as exc:
        _fail(body, patch, "InvalidInput", f"spec.{exc}")
    log.info("run started", run=run_id, workflow=wf.name, namespace=namespace, workflowrun=run.metadata.name)


async def workflowrun_mirror(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """daemon: follow the run record and write a coalesced status until the run ends."""
    ctx = context_of(memo)
    run_id, _state = await resolve_run(ctx, body, warn=False)
    follower = ctx.feed.follow(run_id, phases_of_status(body.status or {}))
    try:
        await ctx.feed.refresh(follower)
        await _mirror(ctx, body, follower)
    finally:
        # At shutdown the feed may stop before the daemon is cancelled: raising here would
        # replace the cancellation, and kopf would retry the daemon instead of stopping.
        with contextlib.suppress(RuntimeError):
            ctx.feed.unfollow(follower)


async def workflowrun_approve(body: kopf.Body, new: Any, memo: kopf.Memo, **_: Any) -> None:
    """`kubectl annotate wfr NAME cadenza.dev/approve=STEP[,STEP]`."""
    await _decide_now(context_of(memo), body)


async def workflowrun_reject(body: kopf.Body, new: Any, memo: kopf.Memo, **_: Any) -> None:
    """`kubectl annotate wfr NAME cadenza.dev/reject=STEP[,STEP]`."""
    await _decide_now(context_of(memo), body)


async def workflowrun_resume(body: kopf.Body, new: Any, memo: kopf.Memo, **_: Any) -> None:
    """`kubectl annotate wfr NAME cadenza.dev/resume=tokens=N[,cost=X] --overwrite`: a run
    paused by its budget resumes with that budget (each new value is one resume)."""
    if not new:
        return
    try:
        tokens, cost = resume_from_annotation(str(new))
    except ValueError as exc:
        events.warning(body, "InvalidResume", str(exc))
        return
    ctx = context_of(memo)
    _run_id, state = await resolve_run(ctx, body, warn=False)
    if state is None or state.phase != "Paused":
        phase = state.phase if state is not None else "not started"
        events.warning(body, "ResumeRefused", f"{RESUME_ANNOTATION}: the run is not Paused (it is {phase})")
        return
    by = approver_identity(body.metadata.annotations or {})
    await ctx.client.resume(
        state.namespace, state.run, by=by, tokens=tokens, cost=cost, key=str(state.auditSeq)
    )
    events.normal(body, "ResumeSent", f"run {state.run} resumed by {by} with {new}")
    log.info("resume sent", run=state.run, tokens=tokens, cost=cost, by=by)


async def workflowrun_cancel(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """delete: a running run is cancelled before the WorkflowRun goes (finalizer)."""
    ctx = context_of(memo)
    run_id, state = await resolve_run(ctx, body, warn=False)
    if state is not None and state.terminal:
        return
    if state is None and run_id != run_id_of(body):
        return  # a mirror whose run has no record (yet): nothing of this namespace's to cancel
    if state is None and dict(body.status or {}).get("phase") in TERMINAL_RUN:
        return  # failed before it started: there is no run
    # No record yet may still mean a start event on its way: the cancel follows it on the
    # run's subject (ordered), and the engine drops it if no run ever comes of it.
    namespace = body.metadata.namespace or "default"  # resolve_run checked the record's
    await ctx.client.cancel(namespace, run_id, by="kubectl delete", reason="the WorkflowRun was deleted")
    events.warning(body, "RunCancelling", f"run {run_id} cancelled: the WorkflowRun was deleted")
    log.info("run cancelled on deletion", run=run_id, workflowrun=body.metadata.name)


async def workflowrun_spec_changed(body: kopf.Body, old: Any, new: Any, **_: Any) -> None:
    """update of spec: a run goes on with the spec it was created with. Say so, where
    `kubectl describe` shows it, instead of ignoring the edit in silence."""
    before, after = dict(old or {}), dict(new or {})
    if "input" not in before:
        # Stored by an operator version that kept no digest of the input: not an edit.
        after.pop("input", None)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    if not changed:
        return
    fields = ", ".join(f"spec.{k}" for k in changed)
    message = (
        f"{fields} changed after the WorkflowRun was created: ignored, the run goes on with the "
        "spec it was created with. Create a new WorkflowRun to run the new spec."
    )
    events.warning(body, "SpecChangeIgnored", message)
    log.warning("workflowrun spec change ignored", workflowrun=body.metadata.name, fields=fields)


def workflowrun_index(body: kopf.Body, **_: Any) -> dict[tuple[str, str], RunRecord]:
    """index: WorkflowRuns by (namespace, workflow), for Workflow status and run history."""
    meta, spec = body.metadata, dict(body.spec or {})
    created = str(meta.get("creationTimestamp") or "")
    record = run_record(meta.name or "", meta.labels or {}, spec, dict(body.status or {}), created)
    return {(meta.namespace or "default", str(spec.get("workflowRef") or "")): record}


def _unfinished(status: kopf.Status, **_: Any) -> bool:
    return status.get("phase") not in TERMINAL_RUN


def register(registry: kopf.OperatorRegistry, settings: OperatorSettings) -> None:
    kopf.on.create(*WORKFLOWRUNS, registry=registry)(workflowrun_start)
    kopf.on.resume(*WORKFLOWRUNS, registry=registry)(workflowrun_start)
    # Async daemons are cancelled when stopped (deletion, peering pause, shutdown).
    kopf.daemon(*WORKFLOWRUNS, registry=registry, when=_unfinished, cancellation_timeout=5.0)(
        workflowrun_mirror
    )
    kopf.on.field(*WORKFLOWRUNS, registry=registry, field=("metadata", "annotations", APPROVE_ANNOTATION))(
        workflowrun_approve
    )
    kopf.on.field(*WORKFLOWRUNS, registry=registry, field=("metadata", "annotations", REJECT_ANNOTATION))(
        workflowrun_reject
    )
    kopf.on.field(*WORKFLOWRUNS, registry=registry, field=("metadata", "annotations", RESUME_ANNOTATION))(
        workflowrun_resume
    )
    kopf.on.update(*WORKFLOWRUNS, registry=registry, field="spec")(workflowrun_spec_changed)
    kopf.on.delete(*WORKFLOWRUNS, registry=registry)(workflowrun_cancel)
    kopf.index(*WORKFLOWRUNS, registry=registry)(workflowrun_index)


# ------------------------------------------------------------------------ helpers


async def resolve_run(
    ctx: OperatorContext, body: kopf.Body, *, warn: bool = True
) -> tuple[str, RunState | None]:
    """The run a WorkflowRun follows and its record, if the record is in the WorkflowRun's
    namespace: the run derived from its uid, or, for the mirror of a run a trigger or retry started, that
    run (`is_mirror_of`). A `run-id` annotation naming anything else is ignored (a Warning
    Event when `warn`; the start handler overwrites it)."""
    meta = body.metadata
    namespace, run_id = meta.namespace or "default", run_id_of(body)
    annotated = str((meta.annotations or {}).get(RUN_ID_ANNOTATION) or "")
    if annotated and annotated != run_id and looks_like_mirror(meta.name or "", meta.labels or {}, annotated):
        state = await ctx.client.get(annotated)
        if state is None or is_mirror_of(namespace, state):
            return annotated, state  # None: the trigger's start event is still on its way
    if annotated and annotated != run_id and warn:
        message = (
            f"{RUN_ID_ANNOTATION}={annotated} ignored: the operator sets it, and this WorkflowRun "
            f"follows its own run {run_id}"
        )
        events.warning(body, "RunIdIgnored", message)
        log.warning("run-id annotation ignored", workflowrun=meta.name, namespace=namespace, named=annotated)
    state = await ctx.client.get(run_id)
    if state is not None and state.namespace != namespace:
        return run_id, None  # not this namespace's: never mirrored, decided or cancelled from here
    return run_id, state


def _fail(body: kopf.Body, patch: kopf.Patch, reason: str, message: str) -> NoReturn:
    """The run cannot start: Failed with the reason, a Warning Event, no retries."""
    now = time.time()
    patch.status.update(
        {
            "phase": "Failed",
            "message": message,
            "conditions": [condition("Succeeded", "False", reason, message, now)],
        }
    )
    events.warning(body, reason, message)
    raise kopf.PermanentError(message)


async def _definition(
    ctx: OperatorContext, body: kopf.Body, patch: kopf.Patch, namespace: str, workflow: str, retry: int
) -> CompiledWorkflow:
    """The Workflow's published definition; waits (retries) while it does not exist yet."""
    from nats.js.errors import KeyNotFoundError

    try:
        return await ctx.client.latest_definition(namespace, workflow)
    except KeyNotFoundError:
        pass
    # Back off while waiting: 1, 2, 4 ... 30 s between checks (each is a write by kopf).
    delay = min(30.0, 2.0 ** min(retry, 5))
    live = await ctx.api.get(path_of(GROUP_VERSION, "workflows", namespace, workflow))
    if live is not None:
        conditions: list[Json] = (live.get("status") or {}).get("conditions") or []
        valid = next((c for c in conditions if c.get("type") == "Valid"), {})
        if valid.get("status") == "False":
            _fail(
                body, patch, "InvalidWorkflow", f"Workflow {workflow} is invalid: {valid.get('message', '')}"
            )
        raise kopf.TemporaryError(f"Workflow {workflow} is not published yet", delay=1)
    message = f"waiting for Workflow {workflow} (not found in namespace {namespace})"
    if dict(body.status or {}).get("message") != message:  # write it, and post the Event, once
        patch.status.update({"phase": "Pending", "message": message})
        events.warning(body, "WorkflowNotFound", message)
    raise kopf.TemporaryError(message, delay=delay)


async def _mirror(ctx: OperatorContext, body: kopf.Body, follower: RunFollower) -> None:
    interval = ctx.settings.status_interval
    written: Json = dict(body.status or {})
    last_write = -float("inf")
    decided: set[str] = set()
    while True:
        await follower.changed.wait()
        wait = last_write + interval - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)  # coalesce: the writes meanwhile are taken along
        state, transitions = follower.take()
        if state is None or state.namespace != (body.metadata.namespace or "default"):
            continue
        events.post(body, transitions)
        await _decide_waiting(ctx, body, state, decided)
        blocked = await _agent_waits(ctx, state)
        patch = status_patch(
            written, run_status(state, outputs_limit=ctx.settings.outputs_limit, blocked=blocked)
        )
        if patch:
            await _write_status(ctx, body, patch)
            written = merge_patch_apply(written, patch)
            last_write = time.monotonic()
        if state.terminal:
            return


async def _agent_waits(ctx: OperatorContext, state: RunState) -> str:
    """What the run's steps wait for outside the run: crash-looping agents (see agents.py)."""
    crashing = {agent: line for (ns, agent), line in ctx.crash_loops.items() if ns == state.namespace}
    if not crashing or state.terminal:
        return ""
    wf = await ctx.client.definition(state.definition)  # kept in memory by the engine
    steps = [*wf.steps.values(), *([wf.on_exit] if wf.on_exit is not None else [])]
    return agent_waits_message(state, {step.name: step.agent for step in steps}, crashing)


async def _write_status(ctx: OperatorContext, body: kopf.Body, patch: Json) -> None:
    meta = body.metadata
    path = workflowrun_path(meta.namespace or "default", meta.name or "", "status")
    try:
        await ctx.api.patch(path, {"status": patch})
    except ApiError as exc:
        if exc.status != 404:  # deleted meanwhile: nothing to write to
            raise
    metrics.KUBE_WRITES.inc()


async def _decide_waiting(ctx: OperatorContext, body: kopf.Body, state: RunState, decided: set[str]) -> None:
    """Annotations naming a step that now waits (annotated before it started waiting)."""
    wanted = decisions_from_annotations(body.metadata.annotations or {})
    for step, approved in wanted.items():
        st = state.steps.get(step)
        if step in decided or st is None or st.phase != "WaitingApproval":
            continue
        decided.add(step)
        await _send_decision(ctx, body, state, step, approved)


async def _decide_now(ctx: OperatorContext, body: kopf.Body) -> None:
    _run_id, state = await resolve_run(ctx, body, warn=False)
    if state is None:
        return  # not started yet: the mirror daemon sends it once the step waits
    for step, approved in decisions_from_annotations(body.metadata.annotations or {}).items():
        st = state.steps.get(step)
        if st is None:
            events.warning(
                body, "UnknownStep", f"annotation names step {step!r}, which the run does not have"
            )
        elif st.phase == "WaitingApproval":
            await _send_decision(ctx, body, state, step, approved)


async def _send_decision(
    ctx: OperatorContext, body: kopf.Body, state: RunState, step: str, approved: bool
) -> None:
    if state.namespace != (body.metadata.namespace or "default"):  # pragma: no cover - resolve_run checked
        return
    annotations = body.metadata.annotations or {}
    by = approver_identity(annotations)
    comment = annotations.get(COMMENT_ANNOTATION)
    cs = (await ctx.client.definition(state.definition)).steps.get(step)
    approvers = cs.approval.approvers if cs is not None and cs.approval is not None else []
    if not is_approver(approvers, by):
        # Sent all the same: the engine ignores it and the run's audit records the attempt.
        events.warning(
            body, "NotAnApprover", f"step {step}: {by} is not one of its approvers ({', '.join(approvers)})"
        )
    await ctx.client.approve(state.namespace, state.run, step, approved, by=by, comment=comment)
    verb = "approved" if approved else "rejected"
    events.normal(body, "ApprovalSent", f"step {step} {verb} by {by}")
    log.info("approval sent", run=state.run, step=step, approved=approved, by=by)


async def mirror_started_run(
    ctx: OperatorContext, wf: CompiledWorkflow, run_id: str, info: Mapping[str, Any]
) -> None:
    """The engine's on_started hook: make a WorkflowRun for a run a trigger or a retry
    (`info["source"] == "retry"`) started, and for a retry a `Retried` Event on the retried
    run's WorkflowRun. Once: a second start of the same run (a redelivered trigger event, a
    retry asked again, two engines answering it) finds both there (409)."""
    source = str(info.get("source") or "trigger")
    retry_of, retried_name, from_step = "", "", None
    if source == "retry":
        retry_of = str(info.get("retryOf") or "")
        retried = await ctx.client.get(retry_of)
        name = retried.labels.get(WORKFLOWRUN_LABEL, "") if retried is not None else ""
        retried_name = name or mirrored_run_name(retry_of)
        step = info.get("from")
        from_step = step if isinstance(step, str) and step else None
        manifest = mirrored_run_manifest(
            wf, run_id, source, retry_of=retry_of, retried_name=retried_name, from_step=from_step
        )
    else:
        manifest = mirrored_run_manifest(wf, run_id, source)
    try:
        await ctx.api.create(workflowrun_path(wf.namespace), manifest)
    except ApiError as exc:
        if exc.status != 409:  # already mirrored
            log.warning("could not mirror a started run", run=run_id, source=source, error=str(exc))
            return
    log.info("started run mirrored", run=run_id, workflow=wf.name, info=json.dumps(dict(info), default=str))
    if source == "retry":
        by = info.get("by")
        try:
            await announce_retry(
                ctx,
                wf.namespace,
                retried_name,
                retry_of,
                run_id,
                from_step=from_step,
                by=by if isinstance(by, str) else "",
            )
        except ApiError as exc:
            log.warning("could not post the Retried Event", run=run_id, retry_of=retry_of, error=str(exc))


def retried_message(new_name: str, run_id: str, from_step: str | None, by: str) -> str:
    """The `Retried` Event's message: where the retry is followed, and how it was asked for."""
    start = f" --from {from_step}" if from_step else ""
    who = f" by {by}" if by else ""
    return f"retried{start}{who}: WorkflowRun {new_name} follows the new run {run_id}"


async def announce_retry(
    ctx: OperatorContext,
    namespace: str,
    retried_name: str,
    retry_of: str,
    run_id: str,
    *,
    from_step: str | None,
    by: str,
) -> bool:
    """Post a `Retried` Event on the WorkflowRun of the retried run `retry_of`, if there is
    one (a run started by `cadenza run` has none: nothing is posted). Named after the new
    run (`events.once_name`), so that being told of the same retry again posts nothing
    (False). A WorkflowRun of that name following another run is not the retried one."""
    body = await ctx.api.get(workflowrun_path(namespace, retried_name))
    if body is None:
        return False
    meta = body.get("metadata") or {}
    follows = (meta.get("annotations") or {}).get(RUN_ID_ANNOTATION)
    own = run_id_for(namespace, str(meta.get("name") or ""), str(meta.get("uid") or ""))
    if retry_of not in (follows, own):
        return False
    message = retried_message(mirrored_run_name(run_id), run_id, from_step, by)
    name = events.once_name(retried_name, RETRIED_REASON, run_id)
    posted = await events.post_once(ctx.api, body, "Normal", RETRIED_REASON, message, name=name)
    if posted:
        log.info("retry announced", run=run_id, retry_of=retry_of, workflowrun=retried_name)
    return posted
