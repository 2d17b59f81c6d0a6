"""`EngineHost`: the one way a process starts an engine.

`cadenza operator`, `cadenza engine` and `cadenza run`/`dev` all host an engine the same
way, from one `EngineSettings`:

1. connect to NATS: once for a command (`NatsUnreachable` at once), or until connected
   or told to stop for a long-running process (one log line per attempt);
2. create or update the infrastructure (streams, buckets, the engine's consumer);
3. start the engine (its event consumer, timers and the control responder that answers
   `cadenza approve|signal|cancel`), trying again while JetStream does not answer yet
   (a server restarting answers the connection before its streams);
4. start the triggers, when asked.

`stop` undoes them in reverse order, each step bounded: with NATS gone, stopping
consumers and draining would wait for a reconnection that may never come.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import Mapping
from typing import Any

import structlog
from cadenza.nats import connect_once, connect_until_stopped

from .client import RunClient
from .runtime import Engine, Operation, RunStarted, StateListener
from .settings import EngineSettings
from .triggers import Triggers, TriggerWarning

log = structlog.get_logger("cadenza.engine")

ENGINE_STOP_TIMEOUT = 10.0
DRAIN_TIMEOUT = 5.0

GC_YOUNG_THRESHOLD = 10_000
"""Container allocations between two collections of the youngest generation (CPython's
default is 700)."""


def tune_gc() -> None:
    """Make the garbage collector fit a process whose main work is an engine: called once
    by each command that hosts one (`cadenza engine`, `operator`, `dev`, `run`), after
    its imports, and by the benchmark driver, which hosts one the same way.

    Every event allocates a few thousand short-lived containers (the parsed event, the
    decision, its commands, the serialised record), few of them in cycles. With CPython's
    default thresholds the collector ran about 520 times in 800 runs of the benchmark's
    conc50x3 (4 rounds) and took 0.41-0.48 s of the driver's CPU, most of it in the
    collections of the older generations, which traverse every long-lived object (the
    run cache, the compiled definitions, every imported module). Here the objects that
    exist now (the imports, the settings) are moved out of the collector's sight
    (`gc.freeze`) and the youngest generation is collected after 10,000 allocations
    instead of 700: then it ran 19 times and took 0.12-0.13 s. Cyclic garbage is still
    collected, a little later (at most the cycles made by 10,000 allocations, a few MB);
    reference counting, which frees nearly everything, is unchanged."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


class EngineHost:
    """NATS, the infrastructure, an engine and (optionally) its triggers, started and
    stopped together. `connection_name` names the NATS client (default: the engine's name)."""

    def __init__(self, settings: EngineSettings, *, connection_name: str | None = None) -> None:
        self.settings = settings
        self.connection_name = connection_name or settings.name
        self.nc: Any = None
        self.engine: Engine | None = None
        self.triggers: Triggers | None = None
        self.log = log.bind(engine=settings.name)

    @property
    def client(self) -> RunClient:
        """The engine's client: start, read and steer runs."""
        if self.engine is None:
            raise RuntimeError("the engine host is not connected")
        return self.engine.client

    @property
    def js(self) -> Any:
        return self.nc.jetstream()

    async def connect(self, stop: asyncio.Event | None = None) -> bool:
        """Connect to NATS. Without `stop`: one attempt (`NatsUnreachable`). With it: try
        until connected (True) or until `stop` is set (False)."""
        if self.nc is None:
            options = {"name": self.connection_name, **self.settings.connect_options()}
            if stop is None:
                self.nc = await connect_once(self.settings.nats_url, log=self.log, **options)
            else:
                self.nc = await connect_until_stopped(self.settings.nats_url, stop, log=self.log, **options)
                if self.nc is None:
                    return False
        if self.engine is None:
            self.engine = Engine(self.nc, self.settings)
        return True

    async def open(self) -> Engine:
        """Connect (once, unless connected) and create or update the infrastructure; the
        engine does not consume yet, so callers may add what it needs first."""
        await self.connect()
        assert self.engine is not None  # connect made it
        if self.engine.kv is None:
            await self.engine.open()
        return self.engine

    async def start(
        self,
        stop: asyncio.Event | None = None,
        *,
        on_state: StateListener | None = None,
        on_started: RunStarted | None = None,
        operations: Mapping[str, Operation] | None = None,
        triggers: bool = False,
    ) -> bool:
        """Connect, open, start the engine (and the triggers, or later: `start_triggers`).
        With `stop`, wait for NATS and JetStream until they answer or `stop` is set
        (False); without, fail at once. `on_started` is told of each retry the engine
        starts when asked (the triggers take theirs in `start_triggers`); `operations`
        are the control operations the process adds (`Engine.operations`)."""
        if not await self.connect(stop):
            self.log.info("engine stopped before reaching NATS", nats=self.settings.nats_url)
            return False
        engine = self.engine
        assert engine is not None  # connect made it
        if on_state is not None:
            engine.on_state(on_state)
        if on_started is not None:
            engine.on_run_started = on_started
        engine.operations.update(operations or {})
        if stop is None:
            await self.open()
            await engine.start()
        elif not await self._start_until_stopped(engine, stop):
            return False
        if triggers:
            await self.start_triggers()
        self.log.info("engine serving", nats=self.settings.nats_url)
        return True

    async def start_triggers(
        self, on_started: RunStarted | None = None, on_warning: TriggerWarning | None = None
    ) -> Triggers:
        """Start the triggers of the started engine (with no workflow yet: `set_workflow`)."""
        if self.engine is None:
            raise RuntimeError("the engine host is not started")
        self.triggers = Triggers(self.engine, on_started=on_started, on_warning=on_warning)
        await self.triggers.start()
        return self.triggers

    async def _start_until_stopped(self, engine: Engine, stop: asyncio.Event) -> bool:
        delay = 0.5
        while not stop.is_set():
            try:
                await engine.start()
                return True
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.log.warning("engine could not start, retrying", error=repr(exc), retry_in=delay)
                with contextlib.suppress(Exception):
                    await engine.stop()  # what the failed start had begun (stop leaves it restartable)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                delay = min(delay * 2, 15.0)
        return False

    async def stop(self) -> None:
        """Stop triggers, engine, connection, in that order; safe to call twice or after a
        failed start."""
        if self.triggers is not None:
            with contextlib.suppress(Exception):
                await self.triggers.stop()
        if self.engine is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.engine.stop(), ENGINE_STOP_TIMEOUT)
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.nc.drain(), DRAIN_TIMEOUT)
            with contextlib.suppress(Exception):
                await self.nc.close()
        self.triggers, self.engine, self.nc = None, None, None
