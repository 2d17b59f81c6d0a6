"""`cadenza dev PATH --http-port PORT`, as a user runs it: the console and /metrics on one
port of 127.0.0.1 (0: any free port, printed); a port it cannot have is exit 2, named."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sys
from pathlib import Path

import aiohttp
from cadenza_operator.local.nats_server import NatsServer

from ..conftest import ROOT, cadenza
from ..integration.harness import write_project
from .test_console_browser import GATES

CONSOLE_LINE = re.compile(r"console\s+http://127\.0\.0\.1:(\d+)/")


async def test_dev_serves_the_console_and_metrics_on_one_port(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    root = write_project(tmp_path / "p", "", GATES)
    proc = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "cadenza_operator.cli", "dev", str(root)],
        *["--nats", nats_server.url, "--http-port", "0"],
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
        cwd=ROOT,
        env={**os.environ, "CADENZA_LOG_FORMAT": "json", "COLUMNS": "200"},
    )
    try:
        assert proc.stderr is not None
        port = None
        seen = []
        for _ in range(200):  # bounded: the lines dev prints while it starts
            line = (await asyncio.wait_for(proc.stderr.readline(), 60)).decode()
            if not line:
                break
            seen.append(line)
            if match := CONSOLE_LINE.search(line):
                port = int(match.group(1))
                break
        assert port, "".join(seen)
        async with aiohttp.ClientSession() as http:
            page = await http.get(f"http://127.0.0.1:{port}/")
            assert page.status == 200 and '<table class="runs">' in await page.text()
            metrics = await http.get(f"http://127.0.0.1:{port}/metrics")
            assert metrics.status == 200 and "cadenza_" in await metrics.text()
            css = await http.get(f"http://127.0.0.1:{port}/static/console.css")
            assert css.status == 200
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            await asyncio.wait_for(proc.wait(), 60)
        except TimeoutError:  # pragma: no cover - a hung dev: do not leak it
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0


def test_a_port_dev_cannot_have_is_exit_2_naming_it(tmp_path: Path, nats_server: NatsServer) -> None:
    root = write_project(tmp_path / "p", "", GATES)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = cadenza("dev", str(root), "--nats", nats_server.url, "--http-port", str(port), timeout=60)
    assert result.returncode == 2, result.stderr
    assert f"--http-port {port}: cannot serve the console on 127.0.0.1:{port}" in " ".join(
        result.stderr.split()
    )
    assert "Traceback" not in result.stderr
