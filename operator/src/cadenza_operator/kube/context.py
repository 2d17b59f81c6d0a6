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

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any

import kopf
import structlog

from ..engine.client import RunClient
from ..engine.host import EngineHost
from ..engine.runtime import Engine, RunStarted
from ..engine.settings import EngineSettings
from ..engine.state import RunState
from ..engine.triggers import Triggers, TriggerWarning
from ..observe.diagnose import ENGINE_OPERATIONS
from .api import KubeApi
from .feed import RetrySeen, RunFeed
from .settings import OperatorSettings

log = structlog.get_logger("cadenza.operator")

MEMO_KEY = "cadenza"


@dataclass
class OperatorContext:
    settings: OperatorSettings
    api: KubeApi
    _host: EngineHost | None = None
    _feed: RunFeed | None = None
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)
    scaling_history: dict[tuple[str, str], list[tuple[float, int]]] = field(default_factory=dict)
    """Recent replica wishes per Agent (namespace, name), for scale-down stabilization."""
    crash_loops: dict[tuple[str, str], str] = field(default_factory=dict)
    """Agents (namespace, name) whose container crash-loops, with its last log line: set by
    the Agent observer, read by the WorkflowRun mirrors to say why a step waits."""

    @property
    def started(self) -> bool:
        """The engine side runs (false before kopf's startup handler and after its cleanup)."""
        return self._feed is not None

    @property
    def engine(self) -> Engine:
        if self._host is None or self._host.engine is None:
            raise RuntimeError("the engine is not started")
        return self._host.engine

    @property
    def triggers(self) -> Triggers | None:
        """The Workflows' triggers, once started."""
        return self._host.triggers if self._host is not None else None

    @property
    def nc(self) -> Any:
        return self._host.nc if self._host is not None else None

    @property
    def feed(self) -> RunFeed:
        if self._feed is None:
            raise RuntimeError("the run feed is not started")
        return self._feed

    @property
    def client(self) -> RunClient:
        """Starts, reads and steers runs (the engine's own client: one cache of definitions)."""
        return self.engine.client

    @property
    def js(self) -> Any:
        return self.engine.js

    async def start(
        self, on_started: RunStarted | None = None, on_warning: TriggerWarning | None = None
    ) -> None:
        """Connect to NATS (waiting while it is unreachable, until `stop`); start the
        engine, the run feed and the triggers (`on_started`/`on_warning` are theirs;
        `on_started` is also told of the retries the engine starts, and of those the run
        feed sees that no hook may have been told of)."""
        settings = self.settings
        self._stopping.clear()
        engine_settings = EngineSettings(
            name=settings.peer_id,
            nats_url=settings.nats_url,
            nats_creds=settings.nats_creds,
            nats_ca=settings.nats_ca or None,
        )
        self._host = EngineHost(engine_settings, connection_name=f"cadenza-operator-{settings.peer_id}")
        started = self._host.start(self._stopping, on_started=on_started, operations=ENGINE_OPERATIONS)
        if not await started:  # waits for NATS, retrying
            return
        feed = RunFeed(self._host.js, self._retry_seen(on_started))
        await feed.start()
        self._feed = feed
        await self._host.start_triggers(on_started=on_started, on_warning=on_warning)
        log.info("operator context started", nats=settings.nats_url, engine=settings.peer_id)

    def _retry_seen(self, on_started: RunStarted | None) -> RetrySeen | None:
        """What the feed tells of a retry seen in the runs bucket: `on_started`, as an engine
        would (without the step or who asked: the record keeps neither), for a run of a
        namespace this operator serves."""
        if on_started is None:
            return None
        hook = on_started
        served = self.settings.watch_namespaces

        async def seen(state: RunState) -> None:
            if served and state.namespace not in served:
                return
            wf = await self.client.definition(state.definition)
            result = hook(wf, state.run, {"source": "retry", "retryOf": state.retryOf, "seen": "runs bucket"})
            if asyncio.iscoroutine(result):
                await result

        return seen

    async def stop(self) -> None:
        """Stop everything started; safe to call twice, or after a failed start. The API
        client stays open: kopf may still be stopping daemons that write with it."""
        self._stopping.set()  # a start still waiting for NATS gives up
        if self._host is not None and self._host.triggers is not None:
            with contextlib.suppress(Exception):
                await self._host.triggers.stop()
        if self._feed is not None:
            with contextlib.suppress(Exception):
                await self._feed.stop()
        if self._host is not None:
            await self._host.stop()
        self._feed, self._host = None, None


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
