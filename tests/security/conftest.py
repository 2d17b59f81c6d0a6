"""A real nats-server in operator mode, configured by security.nats_auth.server_config,
with Cadenza's streams and buckets created by the engine's credential."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import pytest
from cadenza.nats import inbox_prefix
from cadenza_operator.local.dev import DevServer
from cadenza_operator.local.nats_server import NatsServer
from cadenza_operator.local.secure import LocalCredentials
from cadenza_operator.manifests import load
from cadenza_operator.security.nats_auth import AuthKeys, Permissions, mint_user, server_config, write_creds

from ..integration.harness import poll


@dataclass
class SecureBus:
    server: NatsServer
    keys: AuthKeys
    dir: Path

    def creds(self, name: str, permissions: Permissions) -> str:
        return str(write_creds(self.dir / f"{name}.creds", mint_user(self.keys, name, permissions)))


@pytest.fixture(scope="module")
def secure_bus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBus]:
    keys = AuthKeys.generate()
    with NatsServer(config=server_config(keys)) as server:
        yield SecureBus(server, keys, tmp_path_factory.mktemp("creds"))


class Connection:
    """A connection that records what the server refused (its -ERR permissions violations,
    which nats-py reports to error_cb, not to the call that caused them)."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.nc: Any = None

    async def open(self, url: str, creds: str | None) -> Connection:
        async def on_error(exc: Exception) -> None:
            self.errors.append(str(exc))

        options: dict[str, Any] = {"user_credentials": creds} if creds else {}
        if creds and (prefix := inbox_prefix(creds)):
            options["inbox_prefix"] = prefix  # as every client of ours connects
        self.nc = await nats.connect(
            url, error_cb=on_error, allow_reconnect=False, max_reconnect_attempts=0, **options
        )
        return self

    async def refused(self, subject: str) -> str:
        """The server's permissions violation naming `subject`, waited for (it arrives
        before the reply to the flush's PING, so a bounded wait always suffices)."""
        await self.nc.flush()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while True:
            for error in self.errors:
                # nats-py lowercases the server's message
                if "permissions violation" in error.lower() and f'"{subject.lower()}"' in error.lower():
                    return error
            assert loop.time() < deadline, f"no permissions violation for {subject}: {self.errors}"
            await asyncio.sleep(0.02)


@pytest.fixture
async def connect(secure_bus: SecureBus) -> AsyncIterator[Callable[[str | None], Any]]:
    opened: list[Connection] = []

    async def open_(creds: str | None) -> Connection:
        conn = await Connection().open(secure_bus.server.url, creds)
        opened.append(conn)
        return conn

    yield open_
    for conn in opened:
        if conn.nc is not None and not conn.nc.is_closed:
            await conn.nc.close()


@contextlib.asynccontextmanager
async def held_at_gate(
    tmp_path: Path, workflow: str, run: str
) -> AsyncIterator[tuple[DevServer, LocalCredentials]]:
    """A `dev --secure` stack (operator mode, one credential per identity) with `run` of
    `workflow` (the Workflow `gated`, whose step `gate` is an approval) waiting at the gate."""
    (tmp_path / "workflow.yaml").write_text(workflow)
    bundle = load([tmp_path], namespace="default")
    async with DevServer(bundle, secure=True) as server:
        assert server.stack.credentials is not None
        client = server.engine.client
        await client.start(bundle.compiled["gated"], {}, run_id=run)

        async def waiting() -> bool:
            state = await client.get(run)
            return state is not None and state.steps["gate"].phase == "WaitingApproval"

        await poll(waiting, 60)
        yield server, server.stack.credentials
