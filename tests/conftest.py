"""Shared fixtures: a real nats-server with JetStream (never a mock), and the e2e switch."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cadenza_operator.local.nats_server import NatsServer

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--with-e2e",
        action="store_true",
        default=False,
        help="run the end-to-end tests on a kind cluster (needs Docker, kind, kubectl, helm)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--with-e2e"):
        return
    skip = pytest.mark.skip(
        reason="end-to-end on kind: opt in with --with-e2e (needs a container engine, "
        "which this machine does not have)"
    )
    for item in items:
        if "e2e" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _logging_as_it_was() -> Iterator[None]:
    """structlog's configuration as before each test: a command run in-process configures
    logging for the whole process (`cadenza validate` at WARNING), which would otherwise
    filter the INFO lines of whatever test the same worker runs next."""
    import structlog
    from cadenza import _logging

    saved, configured = structlog.get_config(), _logging._configured
    yield
    structlog.configure(**saved)
    _logging._configured = configured


@pytest.fixture(scope="session")
def nats_server() -> Iterator[NatsServer]:
    """One real nats-server for the session, on 127.0.0.1 and a free port."""
    with NatsServer() as server:
        yield server


@pytest.fixture
def fresh_nats() -> Iterator[NatsServer]:
    """A nats-server of the test's own, for tests that kill or restart things."""
    with NatsServer() as server:
        yield server


def cadenza(
    *args: str, timeout: float = 120, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the CLI as a user would, in a subprocess: in `env`, the whole environment when
    given, else this process's with JSON logs."""
    return subprocess.run(
        [sys.executable, "-m", "cadenza_operator.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd or ROOT,
        env=env if env is not None else {**os.environ, "CADENZA_LOG_FORMAT": "json"},
        stdin=subprocess.DEVNULL,
    )


async def cadenza_process(
    *args: str, stdout: Any = asyncio.subprocess.PIPE, env: dict[str, str] | None = None
) -> asyncio.subprocess.Process:
    """`cadenza` started as a user would (as `cadenza()` does) for a test that reads its
    output while it runs: stdout (piped unless given) and stderr piped, stdin closed."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cadenza_operator.cli",
        *args,
        stdout=stdout,
        stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
        cwd=ROOT,
        env=env if env is not None else {**os.environ, "CADENZA_LOG_FORMAT": "json"},
    )
