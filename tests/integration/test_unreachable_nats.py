"""NATS down or gone: long-running processes retry with one log line per attempt and end on
SIGTERM; commands give up at once with a message naming the URL. Never a traceback.

The waits below bound something that must happen (a log line, an exit); none is a
duration being asserted.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cadenza_operator.local.nats_server import NatsServer, free_port

from ..conftest import EXAMPLES, ROOT

RETRY_EVENT = "cannot reach NATS, retrying"
EXIT_UNREACHABLE = 3


@pytest.fixture
def dead_url() -> str:
    """A URL nothing listens on: a port the kernel just handed out, then closed."""
    return f"nats://127.0.0.1:{free_port()}"


class Process:
    """A subprocess whose output (stdout and stderr, in one file) the test can poll."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path = ROOT):
        self.log = log
        with log.open("w") as out:
            self.proc = subprocess.Popen(
                args,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=cwd,
                env={**os.environ, "CADENZA_LOG_FORMAT": "json", **(env or {})},
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def events(self) -> list[str]:
        """The `event` of every JSON log line (a line that is not JSON counts as itself)."""
        found = []
        for line in self.output().splitlines():
            try:
                found.append(str(json.loads(line).get("event")))
            except (ValueError, AttributeError):
                found.append(line)
        return found

    def wait_until(self, what: Callable[[], bool], describe: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not what():
            assert self.proc.poll() is None, (
                f"exited ({self.proc.returncode}) before {describe}:\n{self.output()}"
            )
            assert time.monotonic() < deadline, f"not within {timeout}s: {describe}\n{self.output()[-3000:]}"
            time.sleep(0.05)

    def terminate(self, bound: float = 20) -> int:
        """SIGTERM, then the exit code; a process still running after `bound` seconds fails."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(bound)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {bound}s after SIGTERM:\n{self.output()[-3000:]}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def processes() -> Iterator[list[Process]]:
    started: list[Process] = []
    try:
        yield started
    finally:
        for p in started:
            p.kill()


def assert_retried_quietly(p: Process, code: int) -> None:
    """Exit 0 on SIGTERM; one line per attempt (plus a few around them), no traceback."""
    out = p.output()
    assert code == 0, out
    assert "Traceback" not in out, out
    events = p.events()
    attempts = events.count(RETRY_EVENT)
    assert attempts >= 2, out
    assert len(events) <= attempts + 3, out
    assert all("connection refused" in line for line in out.splitlines() if RETRY_EVENT in line), out


def test_engine_retries_an_unreachable_nats_until_sigterm(
    dead_url: str, processes: list[Process], tmp_path: Path
) -> None:
    engine = Process(
        [sys.executable, "-m", "cadenza_operator.cli", "engine", "--nats", dead_url], tmp_path / "log"
    )
    processes.append(engine)
    engine.wait_until(lambda: engine.events().count(RETRY_EVENT) >= 2, "two connection attempts logged")
    assert_retried_quietly(engine, engine.terminate())


def test_agent_retries_an_unreachable_nats_until_sigterm(
    dead_url: str, processes: list[Process], tmp_path: Path
) -> None:
    (tmp_path / "agents.py").write_text(
        textwrap.dedent(
            """
            from cadenza import Agent

            agent = Agent("lonely")

            @agent.handler
            async def handle(task):
                return {}

            if __name__ == "__main__":
                agent.run()
            """
        )
    )
    agent = Process(
        [sys.executable, "agents.py"], tmp_path / "log", env={"CADENZA_NATS_URL": dead_url}, cwd=tmp_path
    )
    processes.append(agent)
    agent.wait_until(lambda: agent.events().count(RETRY_EVENT) >= 2, "two connection attempts logged")
    assert_retried_quietly(agent, agent.terminate())


def test_engine_ends_on_sigterm_after_its_server_went_away(
    fresh_nats: NatsServer, processes: list[Process], tmp_path: Path
) -> None:
    engine = Process(
        [sys.executable, "-m", "cadenza_operator.cli", "engine", "--nats", fresh_nats.url], tmp_path / "log"
    )
    processes.append(engine)
    engine.wait_until(lambda: "engine serving" in engine.events(), "the engine serving")
    fresh_nats.kill()
    engine.wait_until(lambda: "disconnected from NATS" in engine.events(), "the disconnection logged")
    code = engine.terminate()
    out = engine.output()
    assert code == 0, out
    assert "Traceback" not in out, out


NEEDS_NATS = {
    "approve": ["approve", "run-1", "review"],
    "signal": ["signal", "run-1", "go"],
    "cancel": ["cancel", "run-1"],
    "audit": ["audit", "run-1"],
    "list": ["list"],
    "get": ["get", "run-1"],
    "retry": ["retry", "run-1", "--from", "a"],
    "publish": ["publish", "orders.created", "{}"],
}


def give_up(args: list[str], dead_url: str, env_url: str | None = None) -> None:
    """The command exits at once with EXIT_UNREACHABLE and one message naming the URL."""
    env = {**os.environ, "CADENZA_LOG_FORMAT": "json"}
    env.pop("CADENZA_NATS_URL", None)
    if env_url:
        env["CADENZA_NATS_URL"] = env_url
    done = subprocess.run(
        [sys.executable, "-m", "cadenza_operator.cli", *args],
        capture_output=True,
        text=True,
        timeout=30,  # a bound: nats-py alone retries for two minutes
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == EXIT_UNREACHABLE, done
    assert f"cannot reach NATS at {dead_url}: connection refused" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr + done.stdout, done


@pytest.mark.parametrize("command", sorted(NEEDS_NATS))
def test_a_command_gives_up_at_once_on_an_unreachable_nats(command: str, dead_url: str) -> None:
    give_up([*NEEDS_NATS[command], "--nats", dead_url], dead_url)


@pytest.mark.parametrize("command", sorted(NEEDS_NATS))
def test_a_command_reads_cadenza_nats_url_without_nats(command: str, dead_url: str) -> None:
    give_up(NEEDS_NATS[command], dead_url, env_url=dead_url)


def test_run_gives_up_at_once_on_an_unreachable_nats(dead_url: str) -> None:
    give_up(["run", str(EXAMPLES / "hello"), "--nats", dead_url], dead_url)
