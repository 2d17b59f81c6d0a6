"""What the handlers share: settings, the NATS connection, the engine, the API client.

One `OperatorContext` per operator instance, handed to kopf as the operator's memo:
handlers reach it with `context_of(memo)`. Nothing is module-global, so tests can run an
operator, stop it and start a fresh one in the same process.

The engine side (NATS, engine, run feed, triggers) is started by kopf's startup handler
and stopped by its cleanup handler: kopf runs those before it starts watching and after
it stops, and cancels every task still running after that, so the engine must be done
by then, not be cut off in the middle of a run's event.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import kopf
import structlog

from ..engine.runtime import Engine, EngineSettings
from .api import KubeApi
from .feed import RunFeed
from .settings import OperatorSettings

log = structlog.get_logger("cadenza.operator")

MEMO_KEY = "cadenza"


@dataclass
class OperatorContext:
    settings: OperatorSettings
    api: KubeApi
    nc: Any = None
    _engine: Engine | None = None
    _feed: RunFeed | None = None
    triggers: Any = None  # engine.triggers.Triggers, once started
    scaling_history: dict[tuple[str, str], list[tuple[float, int]]] = field(default_factory=dict)
    """Recent replica wishes per Agent (namespace, name), for scale-down stabilization."""
    crash_loops: dict[tuple[str, str], str] = field(default_factory=dict)
    """Agents (namespace, name) whose container crash-loops, with its last log line: set by
    the Agent observer, read by the WorkflowRun mirrors to say why a step waits."""

    @property
    def started(self) -> bool:
        """The engine side runs (false before kopf's startup handler and after its cleanup)."""
        return self._engine is not None

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise RuntimeError("the engine is not started")
        return self._engine

    @property
    def feed(self) -> RunFeed:
        if self._feed is None:
            raise RuntimeError("the run feed is not started")
        return self._feed

    @property
    def js(self) -> Any:
        return self.engine.js

    async def start(self) -> None:
        """Connect to NATS; start the engine, the run feed and the triggers."""
        import nats

        from ..engine.triggers import Triggers
        from .runs import mirror_triggered_run
        from .workflows import workflow_trigger_warning

        settings = self.settings
        options: dict[str, Any] = {"user_credentials": settings.nats_creds} if settings.nats_creds else {}
        self.nc = await nats.connect(
            settings.nats_url,
            name=f"cadenza-operator-{settings.peer_id}",
            max_reconnect_attempts=-1,
            **options,
        )
        self._engine = Engine(self.nc, EngineSettings(name=settings.peer_id))
        await self._engine.start()
        self._feed = RunFeed(self.nc.jetstream())
        await self._feed.start()

        async def on_started(wf: Any, run_id: str, info: dict[str, Any]) -> None:
            await mirror_triggered_run(self, wf, run_id, info)

        async def on_warning(wf: Any, problem: Any) -> None:
            await workflow_trigger_warning(self, wf, problem)

        self.triggers = Triggers(self._engine, on_started=on_started, on_warning=on_warning)
        await self.triggers.start()
        log.info("operator context started", nats=settings.nats_url, engine=settings.peer_id)

    async def stop(self) -> None:
        """Stop everything started; safe to call twice, or after a failed start. The API
        client stays open: kopf may still be stopping daemons that write with it."""
        steps = [
            self.triggers.stop if self.triggers else None,
            self._feed.stop if self._feed else None,
            self._engine.stop if self._engine else None,
            self.nc.drain if self.nc else None,
        ]
        for step in steps:
            if step is not None:
                with contextlib.suppress(Exception):
                    await step()
        self.triggers, self._feed, self._engine, self.nc = None, None, None, None


def make_memo(ctx: OperatorContext) -> kopf.Memo:
    memo = kopf.Memo()
    memo[MEMO_KEY] = ctx
    return memo


def context_of(memo: Any) -> OperatorContext:
    """The context from a handler's `memo` (kopf gives each object a shallow copy of it)."""
    ctx = memo[MEMO_KEY]
    if not isinstance(ctx, OperatorContext):
        raise TypeError("the operator memo holds no OperatorContext")
    return ctx
