"""Model handlers: the Agents naming a Model follow it, and its status says whether it is
valid and which Agents use it.

An Agent's Deployment carries what its Models say (CADENZA_MODELS, the API key reference),
read when the Agent is reconciled; a Model created after its Agent, changed or deleted
would otherwise leave those Deployments stale until the Agent itself changes.
"""

from __future__ import annotations

import time
from typing import Any

import kopf
import structlog

from ..models import API_GROUP, API_VERSION, Model
from .agents import AGENTS, agent_follow_models, agents_naming
from .context import OperatorContext, context_of
from .settings import OperatorSettings
from .specs import parse_resource, update_status
from .status import condition, with_transition_times

log = structlog.get_logger("cadenza.operator")

MODELS = (API_GROUP, API_VERSION, "models")


async def model_reconcile(body: kopf.Body, memo: kopf.Memo, patch: kopf.Patch, **kwargs: Any) -> None:
    """create/update/resume: reconcile the Agents naming the Model, then report on it."""
    ctx = context_of(memo)
    # The Agents first: an invalid Model is theirs to report too (naming spec.models[i]).
    await follow(ctx, body.metadata.namespace or "default", body.metadata.name or "")
    parse_resource(Model, body, patch, condition_type="Ready")
    update_status(body, patch, model_status(body, _users(body, kwargs["agent_model_index"])))


async def model_deleted(body: kopf.Body, memo: kopf.Memo, type: str | None, **_: Any) -> None:
    """event DELETED (no finalizer: deleting a Model waits for no operator): the Agents
    naming it say which Model is missing."""
    if type != "DELETED":
        return
    # Their Deployments are left as they are: the agents keep running with the Model's
    # last spec and finish what they hold, as a user who deleted a Model by mistake
    # would want; recreating the Model makes the Agents Ready again.
    await follow(context_of(memo), body.metadata.namespace or "default", body.metadata.name or "")


async def model_observe(body: kopf.Body, patch: kopf.Patch, **kwargs: Any) -> None:
    """timer: which Agents use the Model (from the index: no API request)."""
    conditions = dict(body.status or {}).get("conditions") or []
    if any(c.get("reason") == "InvalidSpec" for c in conditions):
        return
    update_status(body, patch, model_status(body, _users(body, kwargs["agent_model_index"])))


def agent_model_index(body: kopf.Body, **_: Any) -> dict[tuple[str, str], str]:
    """index: Agent names by (namespace, Model name) for every Model an Agent names."""
    models = dict(body.spec or {}).get("models") or []
    namespace = body.metadata.namespace or "default"
    return {(namespace, str(model)): body.metadata.name or "" for model in models}


def register(registry: kopf.OperatorRegistry, settings: OperatorSettings) -> None:
    kopf.index(*AGENTS, registry=registry)(agent_model_index)
    kopf.on.create(*MODELS, registry=registry)(model_reconcile)
    kopf.on.update(*MODELS, registry=registry, field="spec")(model_reconcile)
    kopf.on.resume(*MODELS, registry=registry)(model_reconcile)
    kopf.on.event(*MODELS, registry=registry)(model_deleted)
    kopf.timer(*MODELS, registry=registry, interval=settings.agent_interval)(model_observe)


async def follow(ctx: OperatorContext, namespace: str, model: str) -> None:
    agents = await agents_naming(ctx.api, namespace, model)
    for raw in agents:
        await agent_follow_models(ctx, raw)
    if agents:
        names = [a["metadata"]["name"] for a in agents]
        log.info("agents follow their model", model=model, namespace=namespace, agents=names)


def _users(body: kopf.Body, index: kopf.Index[tuple[str, str], str]) -> list[str]:
    key = (body.metadata.namespace or "default", body.metadata.name or "")
    return sorted(set(index.get(key, [])))


def model_status(body: kopf.Body, agents: list[str]) -> dict[str, Any]:
    used = f"used by {', '.join(agents)}" if agents else "no Agent names it"
    return {
        "observedGeneration": body.metadata.get("generation"),
        "agents": agents,
        "conditions": with_transition_times(
            [condition("Ready", "True", "Valid", used)],
            dict(body.status or {}).get("conditions") or [],
            time.time(),
        ),
    }


__all__ = ["model_deleted", "model_observe", "model_reconcile", "register"]
