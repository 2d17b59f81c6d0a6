"""Agent handlers: an Agent becomes a ServiceAccount, a Deployment and (optionally) a
metrics Service; its status and replica count follow the Deployment and the agent's
JetStream consumer.

Handlers are thin: parse the spec at the edge, call the pure builders, adopt and apply.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any, cast

import kopf
import structlog
from cadenza.wire import TASKS_STREAM, consumer_name
from pydantic import ValidationError

from .. import metrics
from ..engine.infra import ensure_agent_consumer
from ..models import API_GROUP, API_VERSION, Agent, AutoscalingSpec, ModelSpec, parse_duration
from ..pod_schema import pod_template_schema_errors
from . import builders, events, nats_credentials
from .agent_policy import violations
from .api import ApiError, KubeApi, path_of
from .autoscaling import desired_replicas, prune, stabilized
from .context import OperatorContext, context_of
from .pods import CRASH_LOOP_REASON, CrashLoop, crash_loop
from .settings import OperatorSettings
from .specs import (
    InvalidSpec,
    invalid_spec,
    invalid_spec_status,
    load_resource,
    parse_resource,
    update_status,
)
from .status import agent_status

log = structlog.get_logger("cadenza.operator")

AGENTS = (API_GROUP, API_VERSION, "agents")
INVALID_SPEC = "InvalidSpec"
Json = dict[str, Any]


# ---------------------------------------------------------------------- handlers


async def agent_reconcile(body: kopf.Body, memo: kopf.Memo, patch: kopf.Patch, **_: Any) -> None:
    """create/update/resume: make the agent's objects match its spec."""
    ctx = context_of(memo)
    agent = parse_agent(body, patch)
    await ensure_agent_consumer(
        ctx.js, namespace_of(agent), agent.metadata.name, parse_duration(agent.spec.ackWait)
    )
    try:
        await apply_agent(ctx, agent, body)
    except builders.SpecError as exc:
        invalid_spec(body, patch, exc.path, exc.message, condition_type="Ready")
    update_status(body, patch, await observe_agent(ctx, agent, body))


async def agent_observe(body: kopf.Body, memo: kopf.Memo, patch: kopf.Patch, **_: Any) -> None:
    """timer: refresh status from the Deployment and the queue; autoscale."""
    ctx = context_of(memo)
    if not ctx.started:
        return  # the operator is stopping: its cleanup already stopped the engine
    status = dict(body.status or {})
    if status.get("observedGeneration") != body.metadata.get("generation"):
        return  # agent_reconcile has this generation in hand and reports it when done
    if any(c.get("reason") == INVALID_SPEC for c in status.get("conditions") or []):
        # The report stands until the spec or a Model it names changes (their handlers
        # reconcile anew); observing would replace it with a less useful condition.
        return
    try:
        agent = Agent.model_validate(
            {
                "metadata": {"name": body.metadata.name, "namespace": body.metadata.namespace or "default"},
                "spec": dict(body.spec),
            }
        )
    except ValidationError:
        return  # reported by agent_reconcile; nothing to observe
    update_status(body, patch, await observe_agent(ctx, agent, body))


async def agent_forget(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """delete (no finalizer: the owned objects go by garbage collection): drop what the
    operator keeps in memory and in metrics about the Agent."""
    ctx = context_of(memo)
    key = (body.metadata.namespace or "default", body.metadata.name or "")
    ctx.scaling_history.pop(key, None)
    if ctx.crash_loops.pop(key, None) is not None and ctx.started:
        ctx.feed.poke()  # runs that said they wait for it stop saying so
    for gauge in (metrics.AGENT_PENDING, metrics.AGENT_IN_FLIGHT):
        with contextlib.suppress(KeyError):
            gauge.remove(*key)


def register(registry: kopf.OperatorRegistry, settings: OperatorSettings) -> None:
    kopf.on.delete(*AGENTS, registry=registry, optional=True)(agent_forget)
    kopf.on.create(*AGENTS, registry=registry)(agent_reconcile)
    kopf.on.update(*AGENTS, registry=registry, field="spec")(agent_reconcile)
    kopf.on.resume(*AGENTS, registry=registry)(agent_reconcile)
    kopf.timer(*AGENTS, registry=registry, interval=settings.agent_interval)(agent_observe)


# ------------------------------------------------------------------------- logic


def parse_agent(body: kopf.Body, patch: kopf.Patch) -> Agent:
    return parse_resource(Agent, body, patch, condition_type="Ready")


def namespace_of(agent: Agent) -> str:
    return agent.metadata.namespace or "default"


def _owned_by(obj: Json, owner: kopf.Body) -> bool:
    return any(ref.get("uid") == owner.metadata.uid for ref in obj["metadata"].get("ownerReferences") or [])


async def apply_object(api: KubeApi, manifest: Json, plural: str, owner: kopf.Body) -> Json:
    """Create the object, or patch it when what the operator decides about it changed.

    The spec-hash annotation says what was last applied; an object the Agent does not
    own is never touched (it would be taken over silently).
    """
    meta = manifest["metadata"]
    path = path_of(manifest["apiVersion"], plural, meta["namespace"], meta["name"])
    live = await api.get(path)
    if live is None:
        try:
            return await api.create(path_of(manifest["apiVersion"], plural, meta["namespace"]), manifest)
        except ApiError as exc:
            if exc.status != 409:
                raise
            live = await api.get(path)
            if live is None:
                raise kopf.TemporaryError(f"{manifest['kind']} {meta['name']} vanished", delay=1) from None
    if not _owned_by(live, owner):
        raise kopf.TemporaryError(
            f"{manifest['kind']} {meta['name']} exists and is not owned by this Agent; delete or rename it",
            delay=30,
        )
    wanted = meta.get("annotations", {}).get(builders.SPEC_HASH_ANNOTATION)
    if (live["metadata"].get("annotations") or {}).get(builders.SPEC_HASH_ANNOTATION) == wanted:
        return live
    # A merge patch replaces lists (containers, env, ports) as a whole: removed entries go.
    return await api.patch(path, _merge_patch_body(manifest))


def _merge_patch_body(manifest: Json) -> Json:
    body = {k: v for k, v in manifest.items() if k not in ("apiVersion", "kind")}
    body["metadata"] = {k: manifest["metadata"][k] for k in ("labels", "annotations", "ownerReferences")}
    template = (manifest.get("spec") or {}).get("template")
    if template is not None:
        # Keys the builder sets only sometimes: null deletes them when they are not wanted now.
        pod = template["spec"]
        pod.setdefault("automountServiceAccountToken", None)
    return body


async def apply_agent(ctx: OperatorContext, agent: Agent, owner: kopf.Body) -> None:
    if agent.spec.podTemplate is not None:
        # What `cadenza validate` checks; without it a wrong type fails only when the
        # API server rejects the Deployment, over and over.
        for where, message in pod_template_schema_errors(agent.spec.podTemplate):
            raise builders.SpecError(f"spec.podTemplate.{where}", message)
    namespace = namespace_of(agent)
    name = builders.resource_name(agent)
    deployment_path = path_of("apps/v1", "deployments", namespace, name)
    live = await ctx.api.get(deployment_path)
    replicas = _replicas(agent, live)

    if not agent.spec.serviceAccountName:
        account = _adopted(builders.build_service_account(agent), owner)
        await apply_object(ctx.api, account, "serviceaccounts", owner)
    deployment = builders.build_deployment(
        agent,
        nats_url=ctx.settings.agents_nats_url,
        replicas=replicas,
        log_format=ctx.settings.log_format,
        nats_creds=await _agent_nats_creds(ctx, agent, owner),
        models=await agent_models(ctx.api, agent),
        nats_ca=nats_credentials.AGENT_CA_KEY if _carries_nats_ca(ctx.settings) else None,
        otel_env=ctx.settings.agent_otel_env,
        otel_headers=ctx.settings.agents_otel_headers,
    )
    settings = ctx.settings
    for where, message in violations(
        deployment, namespace, settings.agent_images, settings.agent_service_accounts, name
    ):
        raise builders.SpecError(where, message)  # nothing applied: it would run what is not allowed
    await apply_object(ctx.api, _adopted(deployment, owner), "deployments", owner)

    service = builders.build_metrics_service(agent)
    service_path = path_of("v1", "services", namespace, name)
    if service is not None:
        await apply_object(ctx.api, _adopted(service, owner), "services", owner)
    else:
        live_service = await ctx.api.get(service_path)
        if live_service is not None and _owned_by(live_service, owner):
            await ctx.api.delete(service_path)  # metrics were switched off


async def _agent_nats_creds(ctx: OperatorContext, agent: Agent, owner: kopf.Body) -> tuple[str, str] | None:
    """(Secret, key) of the credential the Agent's pods mount: its own, minted now when
    the operator holds the account seed, else the shared one the chart names (or none)."""
    seed_file = ctx.settings.nats_account_seed_file
    if not seed_file:
        return ctx.settings.agents_nats_creds
    namespace, name = namespace_of(agent), agent.metadata.name
    creds = nats_credentials.mint_agent_creds(nats_credentials.account_keys(Path(seed_file)), namespace, name)
    labels = builders.agent_labels(name)
    secret = nats_credentials.build_agent_creds_secret(namespace, name, creds, labels, _agent_nats_ca(ctx))
    kopf.adopt(secret, owner=owner)
    try:
        await nats_credentials.write_agent_creds(ctx.api, secret, str(owner.metadata.uid))
    except nats_credentials.SecretNotOwned as exc:
        raise kopf.TemporaryError(str(exc), delay=30) from None
    return secret["metadata"]["name"], nats_credentials.AGENT_CREDS_KEY


def _carries_nats_ca(settings: OperatorSettings) -> bool:
    """Whether Agents' Secrets carry the NATS CA: only beside a credential the operator
    mints (the shared one of `agents_nats_creds` is not the operator's to write)."""
    return bool(settings.nats_ca and settings.nats_account_seed_file)


def _agent_nats_ca(ctx: OperatorContext) -> str | None:
    """The NATS CA (PEM) for the Agent's Secret, read from the operator's own mount."""
    return Path(ctx.settings.nats_ca).read_text() if _carries_nats_ca(ctx.settings) else None


async def agent_models(api: KubeApi, agent: Agent) -> dict[str, ModelSpec]:
    """The specs of the Models the agent names (read when the Agent is reconciled); a
    missing or invalid one is a SpecError naming its place in spec.models."""
    namespace = namespace_of(agent)
    found: dict[str, ModelSpec] = {}
    for i, name in enumerate(agent.spec.models):
        model = await api.get(path_of(f"{API_GROUP}/{API_VERSION}", "models", namespace, name))
        if model is None:
            raise builders.SpecError(f"spec.models[{i}]", f"no Model {name!r} in namespace {namespace}")
        try:
            found[name] = ModelSpec.model_validate(model.get("spec") or {})
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            raise builders.SpecError(
                f"spec.models[{i}]", f"Model {name!r} is invalid: spec.{where}: {first['msg']}"
            ) from None
    return found


async def agents_naming(api: KubeApi, namespace: str, model: str) -> list[Json]:
    """The Agents in `namespace` whose spec.models names `model`."""
    items = await api.list(path_of(f"{API_GROUP}/{API_VERSION}", "agents", namespace))
    return [item for item in items if model in ((item.get("spec") or {}).get("models") or [])]


async def agent_follow_models(ctx: OperatorContext, raw: Json) -> None:
    """Reconcile an Agent because a Model it names was created, changed or deleted: what
    the Models say is read only when the Agent is reconciled, and its own handlers do not
    run for a change to another object. Status goes through the API (kopf's patch is the
    Model's here); Events through kopf, which posts them on the Agent."""
    body = kopf.Body(cast(kopf.RawBody, raw))
    try:
        agent = load_resource(Agent, body)
    except InvalidSpec:
        return  # reported by agent_reconcile; a Model changes nothing about it
    try:
        await apply_agent(ctx, agent, body)
    except builders.SpecError as exc:
        text = f"{exc.path}: {exc.message}"
        status, new = invalid_spec_status(body, text, condition_type="Ready", reason=INVALID_SPEC)
        if new:
            events.warning(body, INVALID_SPEC, text)
        log.warning(
            "agent spec invalid", agent=agent.metadata.name, namespace=namespace_of(agent), error=text
        )
    else:
        status = await observe_agent(ctx, agent, body)
    current = dict(body.status or {})
    changed = {k: v for k, v in status.items() if current.get(k) != v}
    if changed:
        group_version, namespace = f"{API_GROUP}/{API_VERSION}", namespace_of(agent)
        path = path_of(group_version, "agents", namespace, agent.metadata.name, "status")
        await ctx.api.patch(path, {"status": changed})


def _adopted(manifest: Json, owner: kopf.Body) -> Json:
    kopf.adopt(manifest, owner=owner)
    builders.stamp(manifest)  # after adopt: the owner's labels are part of what was decided
    return manifest


def _replicas(agent: Agent, live: Json | None) -> int:
    autoscaling = agent.spec.autoscaling
    if autoscaling is None:
        return agent.spec.replicas
    if live is not None:
        return int(live["spec"].get("replicas", 1))  # the autoscaler owns it from here on
    return max(autoscaling.minReplicas, min(autoscaling.maxReplicas, agent.spec.replicas))


async def consumer_load(
    ctx: OperatorContext, namespace: str, agent: str
) -> tuple[int | None, int | None, str]:
    """(pending, in flight, problem) from the agent's durable consumer."""
    try:
        info = await ctx.js.consumer_info(TASKS_STREAM, consumer_name(namespace, agent))
    except Exception as exc:
        return None, None, f"task queue unavailable: {exc or type(exc).__name__}"
    return int(info.num_pending or 0), int(info.num_ack_pending or 0), ""


def deployment_problem(deployment: Json | None) -> str:
    if deployment is None:
        return "the Deployment does not exist"
    for cond in (deployment.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "ReplicaFailure" and cond.get("status") == "True":
            return str(cond.get("message") or cond.get("reason") or "replica failure")
        if cond.get("type") == "Progressing" and cond.get("status") == "False":
            return str(cond.get("message") or cond.get("reason") or "rollout stalled")
    return ""


async def observe_agent(ctx: OperatorContext, agent: Agent, owner: kopf.Body) -> Json:
    """Read the Deployment and the queue, autoscale, and return the Agent's status."""
    namespace, name = namespace_of(agent), agent.metadata.name
    path = path_of("apps/v1", "deployments", namespace, builders.resource_name(agent))
    deployment = await ctx.api.get(path)
    pending, in_flight, queue_problem = await consumer_load(ctx, namespace, name)
    metrics.AGENT_PENDING.labels(namespace, name).set(pending or 0)
    metrics.AGENT_IN_FLIGHT.labels(namespace, name).set(in_flight or 0)
    replicas = int(deployment["spec"].get("replicas", 0)) if deployment else 0
    autoscaling = agent.spec.autoscaling
    if deployment is not None and autoscaling is not None and pending is not None:
        target = _autoscale(ctx, (namespace, name), pending + (in_flight or 0), autoscaling)
        if target != replicas:
            await ctx.api.patch(path, {"spec": {"replicas": target}})
            load = f"{pending} pending, {in_flight} in flight"
            events.normal(owner, "Scaled", f"replicas {replicas} -> {target} ({load})")
            log.info("agent scaled", agent=name, namespace=namespace, replicas=target, pending=pending)
            replicas = target
    ready = int(((deployment or {}).get("status") or {}).get("readyReplicas") or 0)
    crashing = await _crash_loop(ctx, agent, owner) if deployment is not None else None
    return agent_status(
        generation=int(owner.metadata.get("generation") or 0),
        replicas=replicas,
        ready_replicas=min(ready, replicas) if replicas else ready,
        pending=pending,
        in_flight=in_flight,
        deployment_problem=deployment_problem(deployment),
        queue_problem=queue_problem,
        crash_loop=crashing.message() if crashing else "",
        previous=dict(owner.status or {}).get("conditions") or [],
        now=time.time(),
    )


async def _crash_loop(ctx: OperatorContext, agent: Agent, owner: kopf.Body) -> CrashLoop | None:
    """Whether the agent's container crash-loops, from its pods (one list request); kept
    in the context for the WorkflowRun mirrors, which are woken when it changes. A Warning
    Event goes out when the Agent starts crash-looping, not on every observation."""
    namespace, name = namespace_of(agent), agent.metadata.name
    selector = ",".join(f"{k}={v}" for k, v in builders.agent_selector(name).items())
    try:
        pods = await ctx.api.list(path_of("v1", "pods", namespace), label_selector=selector)
    except ApiError as exc:
        # E.g. a chart from before pods were listed (no RBAC for it): the rest of the
        # Agent's status still counts more than this part of it.
        log.warning("cannot list the agent's pods", agent=name, namespace=namespace, error=str(exc))
        return None
    found = crash_loop(pods, time.time())
    key = (namespace, name)
    line = found.last_line if found else None
    if ctx.crash_loops.get(key) != line:
        if line is None:
            ctx.crash_loops.pop(key, None)
            log.info("agent no longer crash-looping", agent=name, namespace=namespace)
        else:
            conditions = dict(owner.status or {}).get("conditions") or []
            reported = any(c.get("reason") == CRASH_LOOP_REASON for c in conditions)
            if key not in ctx.crash_loops and not reported and found is not None:
                events.warning(owner, CRASH_LOOP_REASON, found.message())
                log.warning("agent crash-looping", agent=name, namespace=namespace, last_line=line)
            ctx.crash_loops[key] = line
        ctx.feed.poke()
    return found


def _autoscale(ctx: OperatorContext, key: tuple[str, str], load: int, autoscaling: AutoscalingSpec) -> int:
    now = time.monotonic()
    history = ctx.scaling_history.setdefault(key, [])
    history.append((now, desired_replicas(load, autoscaling)))
    window = ctx.settings.scale_down_window
    prune(history, now, window)
    return stabilized(history, now, window)


__all__ = ["agent_follow_models", "agent_observe", "agent_reconcile", "agents_naming", "register"]
