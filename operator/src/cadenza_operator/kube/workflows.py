"""Workflow handlers: validate with the same compiler as `cadenza validate`, publish the
compiled definition for the engines, run the Workflow's triggers, and keep its status
(run counts) and its run history (finished mirrored runs beyond `runHistoryLimit`).
"""

from __future__ import annotations

import time
from typing import Any

import kopf
import structlog

from ..engine.definition import CompiledWorkflow, DefinitionError, compile_workflow
from ..engine.triggers import TriggerProblem
from ..models import API_GROUP, API_VERSION, Workflow
from . import events
from .api import path_of, workflowrun_path
from .context import OperatorContext, context_of
from .settings import OperatorSettings
from .specs import invalid_spec, parse_resource, update_status
from .status import RunRecord, condition, runs_to_collect, with_transition_times, workflow_run_counts

log = structlog.get_logger("cadenza.operator")

WORKFLOWS = (API_GROUP, API_VERSION, "workflows")


async def workflow_reconcile(body: kopf.Body, memo: kopf.Memo, patch: kopf.Patch, **_: Any) -> None:
    """create/update/resume: validate, publish the definition, (re)start the triggers."""
    ctx = context_of(memo)
    workflow = parse_resource(Workflow, body, patch, condition_type="Valid", reason="Invalid")
    name, namespace = workflow.metadata.name, workflow.metadata.namespace or "default"
    try:
        compiled = compile_workflow(name, workflow.spec, namespace)
    except DefinitionError as exc:
        patch.status["steps"] = len(workflow.spec.steps)
        invalid_spec(body, patch, exc.path, exc.message, condition_type="Valid", reason="Invalid")
    key = await ctx.client.publish_definition(compiled)
    if ctx.triggers is not None:
        await ctx.triggers.set_workflow(compiled)
    log.info("workflow published", workflow=name, namespace=namespace, definition=key)
    update_status(
        body,
        patch,
        {
            "steps": len(compiled.steps),
            "observedGeneration": body.metadata.get("generation"),
            "definition": key,
            "conditions": with_transition_times(
                [condition("Valid", "True", "Valid", f"compiled and published as {key}")],
                dict(body.status or {}).get("conditions") or [],
                time.time(),
            ),
        },
    )


async def workflow_delete(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Stop the triggers; the definition stays, for the runs still going."""
    ctx = context_of(memo)
    if ctx.triggers is not None:
        await ctx.triggers.remove_workflow(body.metadata.namespace or "default", body.metadata.name or "")


async def workflow_refresh(body: kopf.Body, memo: kopf.Memo, patch: kopf.Patch, **kwargs: Any) -> None:
    """timer: run counts into status; delete finished mirrored runs beyond runHistoryLimit."""
    ctx = context_of(memo)
    if not ctx.started:
        return
    workflowrun_index: kopf.Index[tuple[str, str], RunRecord] = kwargs["workflowrun_index"]
    name, namespace = body.metadata.name, body.metadata.namespace or "default"
    records = list(workflowrun_index.get((namespace, name), []))
    counts = workflow_run_counts(records)
    current = dict(body.status or {})
    if any(current.get(k) != v for k, v in counts.items()):
        # A merge patch merges maps: phases that no longer occur must be nulled out.
        gone = {phase: None for phase in (current.get("runs") or {}) if phase not in counts["runs"]}
        patch.status.update({**counts, "runs": {**gone, **counts["runs"]}})
    limit = int(dict(body.spec or {}).get("runHistoryLimit", 20))
    for run in runs_to_collect(records, limit):
        if await ctx.api.delete(workflowrun_path(namespace, run)):
            log.info("finished run garbage-collected", workflow=name, run=run, runHistoryLimit=limit)


async def workflow_trigger_warning(
    ctx: OperatorContext, wf: CompiledWorkflow, problem: TriggerProblem
) -> None:
    """Triggers' on_warning hook: a Warning Event on the Workflow whose trigger event was
    dead-lettered, naming the trigger field, the expression and the error."""
    body = await ctx.api.get(path_of(f"{API_GROUP}/{API_VERSION}", "workflows", wf.namespace, wf.name))
    if body is None:  # deleted meanwhile: the log line and the dead letter remain
        return
    message = f"workflow {wf.name}: trigger event dead-lettered: {problem}"
    await events.post_direct(ctx.api, body, "Warning", "TriggerEventFailed", message)


def register(registry: kopf.OperatorRegistry, settings: OperatorSettings) -> None:
    kopf.on.create(*WORKFLOWS, registry=registry)(workflow_reconcile)
    kopf.on.update(*WORKFLOWS, registry=registry, field="spec")(workflow_reconcile)
    kopf.on.resume(*WORKFLOWS, registry=registry)(workflow_reconcile)
    kopf.on.delete(*WORKFLOWS, registry=registry, optional=True)(workflow_delete)
    kopf.timer(*WORKFLOWS, registry=registry, interval=settings.workflow_interval)(workflow_refresh)
