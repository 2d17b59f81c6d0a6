"""`cadenza dev`: NATS, the engine, every agent and every trigger kept running, so that
triggers, approvals and signals can be exercised locally before going to a cluster."""

from __future__ import annotations

import asyncio
import getpass
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from rich.console import Console

from ..engine.definition import CompiledWorkflow
from ..engine.infra import nats_options
from ..engine.runtime import Engine
from ..engine.state import RunState
from ..engine.triggers import Triggers
from ..engine.view import run_view, transitions
from ..manifests import Bundle
from .runner import LocalStack, cannot_listen, serve_metrics
from .supervision import run_to_end

if TYPE_CHECKING:
    from aiohttp import web


class DevServer:
    """The whole local stack with triggers: `await DevServer(bundle).start()`."""

    def __init__(
        self, bundle: Bundle, nats_url: str | None = None, namespace: str = "default", secure: bool = False
    ) -> None:
        self.bundle = bundle
        self.stack = LocalStack(bundle, nats_url, namespace, secure=secure)
        self.triggers: Triggers | None = None

    @property
    def url(self) -> str:
        return self.stack.url

    @property
    def engine(self) -> Engine:
        assert self.stack.engine is not None, "DevServer not started"
        return self.stack.engine

    async def start(self) -> DevServer:
        await self.stack.start(set(self.bundle.agents))
        assert self.stack.host is not None  # started above
        self.triggers = await self.stack.host.start_triggers()
        for wf in self.bundle.compiled.values():
            await self.triggers.set_workflow(wf)
        return self

    async def stop(self) -> None:
        if self.triggers is not None:
            await self.triggers.stop()
        await self.stack.stop()

    async def __aenter__(self) -> DevServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def _describe(wf: CompiledWorkflow) -> str:
    parts = []
    for t in wf.spec.triggers:
        if t.nats:
            parts.append(
                f"nats {t.nats.subject}" + (f" (dedup {t.nats.dedupKey})" if t.nats.dedupKey else "")
            )
        if t.schedule:
            parts.append(f"cron {t.schedule.cron!r}")
    return ", ".join(parts) or "no triggers"


async def dev(
    bundle: Bundle,
    *,
    nats_url: str | None,
    metrics_port: int | None,
    console: Console,
    secure: bool = False,
    http_port: int | None = None,
) -> int:
    # Only when asked, and before anything starts: a taken port is an error (exit 2), not a
    # stack left half started; 0 takes any free port, printed below.
    bound = serve_metrics(metrics_port) if metrics_port is not None else None
    # The engine is asked per request (None until it starts); `server` is bound below,
    # before this function next awaits, so before any request is handled.
    web = await serve_console(lambda: server.stack.engine, http_port) if http_port is not None else None
    seen: dict[str, dict[str, str]] = {}  # run -> the phases last shown (RunView.phases)

    def on_state(state: RunState) -> None:
        view = run_view(state)
        changes = transitions(seen.get(view.run, {}), view)
        seen[view.run] = view.phases()
        for change in changes:
            if not change.step:
                continue
            line = f"{view.run} {change.step}: {change.after}"
            if change.after == "WaitingApproval":
                line += f"  -> cadenza approve {view.run} {change.step} --nats {server.url} [--reject]"
            console.print(line, highlight=False)
        if view.terminal and any(not change.step for change in changes):
            console.print(f"{view.run}: [bold]{view.phase}[/bold] {view.message}", highlight=False)

    server = DevServer(bundle, nats_url, secure=secure)
    try:  # stopped even when a signal comes while it starts: nothing it started is left behind
        await server.start()
        server.engine.on_state(on_state)
        console.print(f"NATS  {server.url}")
        credentials = server.stack.credentials
        if credentials is not None:
            client = credentials.client()
            console.print(f"secure: operator mode, one credential per identity ({credentials.folder})")
            console.print(f"CLI credential:  export CADENZA_NATS_CREDS={client}  (or --creds {client})")
        if bound is not None:
            console.print(f"metrics  http://127.0.0.1:{bound}/metrics")
        if web is not None:
            console.print(f"console  http://127.0.0.1:{web[1]}/  (metrics at /metrics)")
        for wf in bundle.compiled.values():
            console.print(f"workflow {wf.name}: {_describe(wf)}")
        console.print(f"publish an event:  cadenza publish SUBJECT '{{...}}' --nats {server.url}")
        console.print("Ctrl-C (or SIGTERM) stops everything.")
        await asyncio.Event().wait()
    finally:
        if web is not None:
            await web[0].cleanup()
        await run_to_end(server.stop())
    return 0


class HttpPortError(ValueError):
    """--http-port names a port this process cannot listen on."""


async def serve_console(engine: Callable[[], Engine | None], port: int) -> tuple[web.AppRunner, int]:
    """The web console (and /metrics) on 127.0.0.1:`port` (0: any free port), acting as
    the local user; the runner and the port bound. HttpPortError when it cannot listen."""
    from ..observe.web import Console as WebConsole
    from ..observe.web import Identity, serve

    try:
        return await serve(WebConsole(engine, Identity(fixed_user=getpass.getuser())), "127.0.0.1", port)
    except (OSError, OverflowError) as exc:
        raise HttpPortError(cannot_listen("--http-port", "the console", port, exc)) from None


async def publish(url: str, subject: str, payload: Any) -> None:
    from cadenza.nats import connect_once
    from cadenza.wire import dumps

    nc = await connect_once(url, **nats_options())
    try:
        await nc.jetstream().publish(subject, dumps(payload))
    finally:
        await nc.close()
