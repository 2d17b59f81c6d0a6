"""The console under test: a real `cadenza dev` stack (DevServer in this process, the real
nats-server) with the console served on 127.0.0.1, and a real headless Chromium (Debian's,
driven by Playwright with its executable_path: Playwright never downloads a browser)."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cadenza_operator.local.dev import DevServer
from cadenza_operator.manifests import load
from cadenza_operator.observe.web import Console, Identity, serve

from ..integration.harness import unique_namespace, write_project

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture
def artifacts(tmp_path: Path) -> Path:
    """Where screenshots go: $CADENZA_TEST_ARTIFACTS, else the test's tmp_path (printed)."""
    folder = Path(os.environ.get("CADENZA_TEST_ARTIFACTS") or tmp_path / "artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    print(f"console screenshots in {folder}")
    return folder


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    """A headless Chromium; missing, the test is skipped, except under CI where it fails."""
    if not Path(CHROMIUM).exists() and not shutil.which("chromium"):
        if os.environ.get("CI") == "true":
            pytest.fail(f"{CHROMIUM} is missing: .ci/run installs Debian's chromium")
        pytest.skip(f"{CHROMIUM} is missing (apt-get install -y chromium)")
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            await b.close()


@dataclass
class Stack:
    dev: DevServer
    url: str  # the console's base URL
    namespace: str

    @property
    def client(self) -> Any:
        return self.dev.engine.client

    def workflow(self, name: str) -> Any:
        return self.dev.bundle.compiled[name]


@asynccontextmanager
async def console_stack(
    root: Path, agents_py: str, manifests: str, nats_url: str, identity: Identity | None = None
) -> AsyncIterator[Stack]:
    """The project's agents, engine and triggers, and the console over them."""
    namespace = unique_namespace()
    write_project(root, agents_py, manifests)
    bundle = load([root], namespace=namespace)
    async with DevServer(bundle, nats_url, namespace) as dev:
        console = Console(lambda: dev.engine, identity or Identity(fixed_user="tester"))
        runner, port = await serve(console, "127.0.0.1", 0)
        try:
            yield Stack(dev, f"http://127.0.0.1:{port}", namespace)
        finally:
            await runner.cleanup()
