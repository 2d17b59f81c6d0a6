"""`cadenza operator`: kopf and the engine in one process.

The engine (and the run feed, and the triggers) start in kopf's startup handler, in the
same event loop, before kopf watches anything; kopf then serves the Cadenza resources
with handlers registered on a fresh registry, and everything stops together. With
peering, replicas elect one active instance for the handlers; every replica's engine
keeps executing runs (compare-and-swap on the run record keeps engines apart, so more
replicas means more throughput).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Callable
from typing import Any

import kopf
import structlog
from aiohttp import web

from .. import metrics
from . import agents, models, runs, workflows
from .api import KubeApi
from .context import OperatorContext, make_memo
from .settings import OperatorSettings

log = structlog.get_logger("cadenza.operator")

PERSISTENCE_PREFIX = "operator.cadenza.dev"
"""kopf's bookkeeping annotations. Not `cadenza.dev/`: kopf strips annotations with its
own prefix from what it diffs, and the approval annotations live under `cadenza.dev/`."""
FINALIZER = "cadenza.dev/finalizer"


def build_registry(settings: OperatorSettings, ctx: OperatorContext) -> kopf.OperatorRegistry:
    """A fresh registry with every handler: one per operator instance, never global."""
    registry = kopf.OperatorRegistry()

    def operator_login(**_: Any) -> kopf.ConnectionInfo:
        # kopf and the operator's own client talk to one API server as one user.
        return ctx.api.connection_info()

    async def operator_startup(**_: Any) -> None:
        # The hooks are handed in here, so that context.py needs neither runs.py nor workflows.py.
        async def on_started(wf: Any, run_id: str, info: dict[str, Any]) -> None:
            await runs.mirror_started_run(ctx, wf, run_id, info)  # triggers and retries

        async def on_warning(wf: Any, problem: Any) -> None:
            await workflows.workflow_trigger_warning(ctx, wf, problem)

        await ctx.start(on_started=on_started, on_warning=on_warning)

    async def operator_cleanup(**_: Any) -> None:
        await ctx.stop()

    kopf.on.login(registry=registry)(operator_login)
    kopf.on.startup(registry=registry)(operator_startup)
    kopf.on.cleanup(registry=registry)(operator_cleanup)
    agents.register(registry, settings)
    models.register(registry, settings)
    workflows.register(registry, settings)
    runs.register(registry, settings)
    return registry


INPUT_DIGEST = "sha256"
"""The key of the input's digest in kopf's stored copy of a WorkflowRun spec."""


class CompactDiffBase(kopf.AnnotationsDiffBaseStorage):
    """kopf's last-handled configuration, with a digest for a WorkflowRun's `spec.input`.

    kopf keeps a copy of each object's spec in an annotation to compute diffs; a run's
    input can be large (annotations are limited to 256 KiB in all). A digest stands in
    for it: kopf still sees an edited input (the operator says it is ignored) and the
    annotation stays small.
    """

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> Any:
        essence = super().build(body=body, extra_fields=extra_fields)
        spec = essence.get("spec")
        if body.get("kind") == "WorkflowRun" and isinstance(spec, dict):
            raw = json.dumps(spec.get("input"), sort_keys=True, separators=(",", ":")).encode()
            spec["input"] = {INPUT_DIGEST: hashlib.sha256(raw).hexdigest()[:16]}
        return essence


def kopf_settings(settings: OperatorSettings) -> kopf.OperatorSettings:
    ks = kopf.OperatorSettings()
    ks.persistence.finalizer = FINALIZER
    ks.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=PERSISTENCE_PREFIX)
    ks.persistence.diffbase_storage = CompactDiffBase(
        prefix=PERSISTENCE_PREFIX, key="last-handled-configuration"
    )
    # kopf would post its own INFO log lines ("Handler ... succeeded") as Events on every
    # object; ours are posted explicitly with fixed reasons. Warnings and errors still go.
    ks.posting.level = logging.WARNING
    ks.peering.clusterwide = settings.clusterwide
    if settings.peering:
        ks.peering.name = settings.peering
        ks.peering.standalone = False
    else:
        ks.peering.standalone = True
    # Reconnect watches regularly even if the server keeps them open: a silently broken
    # stream would otherwise stall the operator.
    ks.watching.server_timeout = 300
    ks.watching.client_timeout = 330
    return ks


async def serve(
    settings: OperatorSettings,
    *,
    stop_flag: asyncio.Event | None = None,
    ready_flag: asyncio.Event | None = None,
    api: KubeApi | None = None,
    on_context: Callable[[OperatorContext], None] | None = None,
) -> None:
    """Run the operator until `stop_flag` is set (or SIGINT/SIGTERM)."""
    ctx = OperatorContext(settings=settings, api=api or KubeApi.from_environment())
    if on_context is not None:
        on_context(ctx)
    liveness = f"http://0.0.0.0:{settings.health_port}/healthz" if settings.health_port else None
    console = await serve_console(settings, ctx) if settings.console_port else None
    log.info(
        "operator starting",
        nats=settings.nats_url,
        namespaces=list(settings.watch_namespaces) or "cluster-wide",
        peering=settings.peering or "standalone",
    )
    try:
        await kopf.operator(
            registry=build_registry(settings, ctx),
            settings=kopf_settings(settings),
            memo=make_memo(ctx),
            clusterwide=settings.clusterwide,
            namespaces=list(settings.watch_namespaces),
            standalone=not settings.peering,
            peering_name=settings.peering or None,
            priority=settings.peering_priority,
            # kopf's Identity is a NewType of str (not exported): the str is what it takes.
            identity=settings.peer_id if settings.peering else None,  # type: ignore[arg-type]
            liveness_endpoint=liveness,
            stop_flag=stop_flag,
            ready_flag=ready_flag,
        )
    finally:
        if console is not None:
            await console.cleanup()
        await ctx.stop()  # if kopf failed before its cleanup handlers ran
        await ctx.api.close()


async def serve_console(settings: OperatorSettings, ctx: OperatorContext) -> web.AppRunner:
    """The web console on `console_address:console_port` (a Service in front), over the
    engine this process hosts once kopf's startup handler has started it (until then the
    pages say it is starting). With a user header, each namespace's runs are shown and
    steered only as Kubernetes RBAC allows that user (kube/access.py: SubjectAccessReviews)."""
    from ..observe.web import Console, Identity
    from ..observe.web import serve as serve_web
    from .access import AccessReviews

    def engine() -> Any:
        return ctx.engine if ctx.started else None

    identity = Identity(
        user_header=settings.console_user_header or None,
        groups_header=settings.console_groups_header or None,
    )
    # Who the proxy vouches for may see and steer what RBAC grants them (kube/access.py);
    # without a user header there is nobody to ask about.
    authorize = AccessReviews(ctx.api) if identity.user_header else None
    address = settings.console_address
    runner, port = await serve_web(Console(engine, identity, authorize), address, settings.console_port)
    log.info("console serving", address=address, port=port, user_header=settings.console_user_header or None)
    return runner


def run_operator() -> int:
    """Entry point of `cadenza operator`: settings from the environment, then serve."""
    settings = OperatorSettings.from_env()
    if settings.metrics_port:
        metrics.serve(settings.metrics_port, addr="0.0.0.0")  # scraped from other pods
    asyncio.run(serve(settings))
    return 0
