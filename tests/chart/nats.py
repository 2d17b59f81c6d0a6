"""The chart's nats-server started as its StatefulSet starts it, on this machine: the
rendered nats.conf with only its addresses and paths moved here, the container's own
arguments, the real binary. For the tests that check what the rendered config serves."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from cadenza_operator.local.nats_server import free_port, nats_server_binary

from .render import one


def local_config(config: str, tmp_path: Path) -> tuple[str, int]:
    """`config` (the ConfigMap's nats.conf) listening on 127.0.0.1 and keeping its files
    under `tmp_path`; and the client port it listens on."""
    port = free_port()
    for old, new in [
        ("listen: 0.0.0.0:4222", f"listen: 127.0.0.1:{port}"),
        ("http: 0.0.0.0:8222", f"http: 127.0.0.1:{free_port()}"),
        ("pid_file: /tmp/nats.pid", f"pid_file: {tmp_path / 'nats.pid'}"),
        ("store_dir: /data", f"store_dir: {tmp_path / 'store'}"),
    ]:
        assert old in config
        config = config.replace(old, new)
    return config, port


@asynccontextmanager
async def statefulset_server(objects: list[dict[str, Any]], conf: Path) -> AsyncIterator[list[str]]:
    """The StatefulSet's container arguments on `conf`, until ready; yields what the server
    logged up to then, and stops it at the end."""
    (container,) = one(objects, "StatefulSet")["spec"]["template"]["spec"]["containers"]
    args = [str(conf) if a == "/etc/nats/nats.conf" else a for a in container["args"]]
    server = await asyncio.create_subprocess_exec(
        nats_server_binary(),
        *args,
        env={**os.environ, "SERVER_NAME": "cadenza-nats-0"},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert server.stderr is not None
        log: list[str] = []
        async with asyncio.timeout(30):
            while not any("Server is ready" in line for line in log):
                line = (await server.stderr.readline()).decode()
                assert line, f"nats-server exited: {''.join(log)}"
                log.append(line)
        yield log
    finally:
        server.terminate()
        await server.wait()
