"""Build small projects (agents + manifests) in a temp folder and run them on a real nats-server."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from cadenza import Agent, AgentSettings
from cadenza_operator.engine.runtime import Engine
from cadenza_operator.local.runner import RunOptions, execute
from cadenza_operator.manifests import load

from ..kube.fixtures import wait_for

T = TypeVar("T")


def start_engine(url: str, name: str, log_dir: Path, **env: str) -> subprocess.Popen[bytes]:
    """A `cadenza engine` process, as users run several of them; its output in log_dir/NAME.log."""
    from ..conftest import ROOT

    with open(log_dir / f"{name}.log", "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "cadenza_operator.cli", "engine", "--nats", url, "--name", name],
            env={**os.environ, "CADENZA_LOG_FORMAT": "json", **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=ROOT,
        )


async def poll(probe: Callable[[], Awaitable[T | None]], timeout: float = 60.0) -> T:
    """An async probe's first truthy value, waited for a bounded time (a wait for something
    that must happen, not a performance assertion)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = await probe()
        if value:
            return value
        assert loop.time() < deadline, f"not true within {timeout} s"
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def running_engine(url: str, namespace: str, agent: str = "worker") -> AsyncIterator[Engine]:
    """An engine started on a connection of its own, with `agent`'s task consumer created
    (as the operator or `cadenza run` creates it before the agent's pods pull); stopped and
    disconnected when the block ends. `engine.nc`, `engine.js` and `engine.client` serve the test."""
    import nats
    from cadenza_operator.engine.infra import ensure_agent_consumer

    nc = await nats.connect(url)
    engine = Engine(nc)
    try:
        await engine.start()
        await ensure_agent_consumer(nc.jetstream(), namespace, agent)
        yield engine
    finally:
        await engine.stop()
        await nc.close()


@contextlib.asynccontextmanager
async def serving(agent: Agent, url: str, namespace: str) -> AsyncIterator[None]:
    """An agent working in this process until the block ends."""
    stop = asyncio.Event()
    task = asyncio.create_task(agent.serve(AgentSettings(nats_url=url, namespace=namespace), stop=stop))
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


def unique_namespace() -> str:
    """Each test gets its own namespace: subjects and consumers never mix across tests."""
    return f"t{uuid.uuid4().hex[:8]}"


async def pid_in(marker: Path, timeout: float = 30) -> int:
    """The pid an agent wrote to `marker` when it took its task (the test's cue to act)."""
    return int(await wait_for(lambda: marker.exists() and marker.read_text(), timeout=timeout))


def write_project(root: Path, agents_py: str, manifests: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "agents.py").write_text(textwrap.dedent(agents_py))
    (root / "manifests.yaml").write_text(textwrap.dedent(manifests))
    return root


async def run_project(
    root: Path,
    nats_url: str,
    *,
    input: Any = None,
    namespace: str | None = None,
    workflow: str | None = None,
    timeout: float = 60,
    approve: list[str] | None = None,
    reject: list[str] | None = None,
) -> tuple[dict[str, Any], int]:
    bundle = load([root], namespace=namespace or unique_namespace())
    wf = bundle.compiled[workflow] if workflow else next(iter(bundle.compiled.values()))
    opts = RunOptions(
        workflow=wf,
        bundle=bundle,
        input=input if input is not None else {},
        nats_url=nats_url,
        timeout=timeout,
        approve=approve or [],
        reject=reject or [],
    )
    return await execute(opts)


AGENT = """
apiVersion: cadenza.dev/v1alpha1
kind: Agent
metadata: {{name: {name}}}
spec:
  command: ["python", "agents.py", "{name}"]
  replicas: {replicas}
  concurrency: {concurrency}
  ackWait: {ack_wait}
"""


def agent_manifest(name: str, replicas: int = 1, concurrency: int = 4, ack_wait: str = "30s") -> str:
    return AGENT.format(name=name, replicas=replicas, concurrency=concurrency, ack_wait=ack_wait)
