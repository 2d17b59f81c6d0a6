"""A standalone engine process: `cadenza engine --nats URL`.

Several may run against one NATS at once (CAS on the run record keeps them apart); any
of them may be killed at any moment and the others, or its restart, carry on.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
from typing import Any

import structlog
from cadenza.nats import connect_until_stopped

from .runtime import Engine, EngineSettings

log = structlog.get_logger("cadenza.engine")


async def serve(nats_url: str, name: str | None = None, creds: str | None = None) -> None:
    """Serve until SIGTERM/SIGINT, which end it promptly whether NATS is up, down or was
    never reached."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    options: dict[str, Any] = {"user_credentials": creds} if creds else {}
    name = name or f"engine-{socket.gethostname()}-{os.getpid()}"
    nc = await connect_until_stopped(nats_url, stop, log=log.bind(engine=name), name=name, **options)
    if nc is None:
        log.info("engine stopped before reaching NATS", nats=nats_url, engine=name)
        return
    engine = Engine(nc, EngineSettings(name=name))
    try:
        if await _start(engine, stop, name):
            log.info("engine serving", nats=nats_url, engine=name)
            await stop.wait()
    finally:
        # With NATS gone, stopping consumers and draining wait for a reconnection that
        # may never come: bound them, then close, so SIGTERM always ends the process.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(engine.stop(), 10)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.drain(), 5)
        with contextlib.suppress(Exception):
            await nc.close()
        log.info("engine stopped", engine=name)


async def _start(engine: Engine, stop: asyncio.Event, name: str) -> bool:
    """Start the engine, trying again while JetStream does not answer (a server restarting
    answers the connection before its streams): one log line per attempt, and SIGTERM
    ends the wait. False when stopped first."""
    delay = 0.5
    while not stop.is_set():
        try:
            await engine.start()
            return True
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("engine could not start, retrying", engine=name, error=repr(exc), retry_in=delay)
            with contextlib.suppress(Exception):
                await engine.stop()  # what the failed start had begun (stop leaves it restartable)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            delay = min(delay * 2, 15.0)
    return False
