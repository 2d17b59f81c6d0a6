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

import structlog

from .runtime import Engine, EngineSettings

log = structlog.get_logger("cadenza.engine")


async def serve(nats_url: str, name: str | None = None, creds: str | None = None) -> None:
    import nats

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    options = {"user_credentials": creds} if creds else {}
    name = name or f"engine-{socket.gethostname()}-{os.getpid()}"
    nc = await nats.connect(nats_url, name=name, max_reconnect_attempts=-1, **options)
    engine = Engine(nc, EngineSettings(name=name))
    await engine.start()
    log.info("engine serving", nats=nats_url, engine=name)
    try:
        await stop.wait()
    finally:
        await engine.stop()
        await nc.drain()
