"""A standalone engine process: `cadenza engine --nats URL`.

Several may run against one NATS at once (CAS on the run record keeps them apart); any
of them may be killed at any moment and the others, or its restart, carry on.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Mapping

import structlog

from .host import EngineHost
from .runtime import Operation
from .settings import EngineSettings

log = structlog.get_logger("cadenza.engine")


async def serve(settings: EngineSettings, operations: Mapping[str, Operation] | None = None) -> None:
    """Serve until SIGTERM/SIGINT, which end it promptly whether NATS is up, down or was
    never reached; `operations`: the control operations the process adds."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    host = EngineHost(settings)
    try:
        if await host.start(stop, operations=operations):
            await stop.wait()
    finally:
        await host.stop()
        log.info("engine stopped", engine=settings.name)
