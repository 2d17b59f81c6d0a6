"""The local stack as `cadenza run` and `cadenza dev` run it: no port opened unless asked, a
taken port is a clear error, a signal stops every process the stack started, a step waiting
for its agent shows Queued, and an agent that cannot start fails the run with its last log
line instead of leaving it Running forever.

Every wait below bounds something that must happen (a line, an exit, a process gone); none
is a duration being asserted.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import re
import signal
import socket
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from cadenza_operator.engine.state import ForEachState, RunState, Slot, StepState
from cadenza_operator.local.nats_server import NatsServer
from cadenza_operator.local.progress import Progress, step_table
from cadenza_operator.local.runner import RunOptions, execute
from cadenza_operator.manifests import load
from rich.console import Console

from ..conftest import cadenza
from .harness import agent_manifest, unique_namespace, write_project
from .test_unreachable_nats import Process

IDLE_AGENT = """
import asyncio
from pathlib import Path
from cadenza import Agent

agent = Agent("worker")

@agent.handler
async def work(task):
    # Holds the task until the test creates the file it names (or forever).
    while not Path(task.input["release"]).exists():
        await asyncio.sleep(0.05)
    return {"ok": True}

if __name__ == "__main__":
    agent.run()
"""

TWO_STEPS = """
---
apiVersion: cadenza.dev/v1alpha1
kind: Workflow
metadata: {name: pair}
spec:
  steps:
    - name: first
      agent: worker
      input: {release: "${{ input.release }}"}
    - name: second
      agent: worker
      input: {release: "${{ input.release }}"}
"""


def project(root: Path, command: str | None = None) -> Path:
    """Two independent steps for one Agent of concurrency 1: one runs, the other waits."""
    manifests = agent_manifest("worker", concurrency=1) + TWO_STEPS
    if command is not None:
        manifests = manifests.replace('["python", "agents.py", "worker"]', command)
    return write_project(root, IDLE_AGENT, manifests)


# ------------------------------------------------------------------ processes
def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state, ppid, ...), or None."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def alive(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] not in ("Z", "X")  # a zombie has ended


def children(pid: int) -> dict[int, str]:
    """pid -> command line of each living child of `pid`."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat(int(entry.name))
        if fields is None or int(fields[1]) != pid or not alive(int(entry.name)):
            continue
        try:
            found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
    return found


def listening_ports(pid: int) -> set[int]:
    """TCP ports the process `pid` itself listens on (its sockets matched in /proc/net/tcp*)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                parts = line.split()
                if parts[3] == "0A" and parts[9] in inodes:  # 0A: LISTEN
                    ports.add(int(parts[1].rsplit(":", 1)[1], 16))
    return ports


def wait_for_stack(p: Process, ready_line: str) -> dict[int, str]:
    """Wait until the command printed `ready_line` and runs nats-server and the agent;
    return its children."""
    found: dict[int, str] = {}

    def started() -> bool:
        found.clear()
        found.update(children(p.proc.pid))
        cmds = list(found.values())
        return (
            ready_line in p.output()
            and any("nats-server" in c for c in cmds)
            and any("agents.py" in c for c in cmds)
        )

    p.wait_until(started, "nats-server and the agent running", timeout=60)
    return found


def assert_all_gone(pids: dict[int, str], bound: float = 30) -> None:
    deadline = time.monotonic() + bound
    while any(alive(pid) for pid in pids):
        left = {pid: cmd for pid, cmd in pids.items() if alive(pid)}
        assert time.monotonic() < deadline, f"still running {bound}s after the stop: {left}"
        time.sleep(0.05)


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "cadenza_operator.cli", *args]


@pytest.fixture
def started() -> Iterator[list[tuple[Process, dict[int, str]]]]:
    """Commands the test started, and their children: all killed whatever the outcome."""
    procs: list[tuple[Process, dict[int, str]]] = []
    try:
        yield procs
    finally:
        for p, kids in procs:
            p.kill()
            for pid in kids:
                if alive(pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)


DEV_READY = "stops everything"


# ----------------------------------------------------------------- (a) metrics port
def test_dev_listens_on_no_port_unless_asked(tmp_path: Path, started: list) -> None:
    p = Process(cli("dev", str(project(tmp_path / "p"))), tmp_path / "dev.log")
    kids = wait_for_stack(p, DEV_READY)
    started.append((p, kids))
    assert listening_ports(p.proc.pid) == set(), p.output()
    assert "metrics" not in p.output()
    assert p.terminate() == 0


def test_dev_metrics_port_zero_serves_metrics_on_a_port_it_prints(tmp_path: Path, started: list) -> None:
    p = Process(cli("dev", str(project(tmp_path / "p")), "--metrics-port", "0"), tmp_path / "dev.log")
    kids = wait_for_stack(p, DEV_READY)
    started.append((p, kids))
    found = re.search(r"metrics\s+http://127\.0\.0\.1:(\d+)/metrics", p.output())
    assert found, p.output()
    port = int(found.group(1))
    assert port != 0 and listening_ports(p.proc.pid) == {port}
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200 and b"cadenza_" in r.read()
    assert p.terminate() == 0


@pytest.mark.parametrize("command", ["dev", "run"])
def test_a_taken_metrics_port_is_an_error_naming_the_option(tmp_path: Path, command: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = cadenza(command, str(project(tmp_path / "p")), "--metrics-port", str(port), timeout=60)
    assert result.returncode == 2, result.stderr
    assert f"--metrics-port {port}" in result.stderr and "in use" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr + result.stdout, result.stderr


# --------------------------------------------------------------------- (b) signals
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_to_dev_stops_its_nats_server_and_agents(
    tmp_path: Path, started: list, signum: signal.Signals
) -> None:
    p = Process(cli("dev", str(project(tmp_path / "p"))), tmp_path / "dev.log")
    kids = wait_for_stack(p, DEV_READY)
    started.append((p, kids))
    p.proc.send_signal(signum)
    assert p.proc.wait(60) == 0, p.output()
    assert_all_gone(kids)
    assert "Traceback" not in p.output(), p.output()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_to_run_stops_its_nats_server_and_agents(
    tmp_path: Path, started: list, signum: signal.Signals
) -> None:
    root = project(tmp_path / "p")
    never = tmp_path / "never-created"
    p = Process(cli("run", str(root), "--input", json.dumps({"release": str(never)})), tmp_path / "run.log")
    kids = wait_for_stack(p, "")
    started.append((p, kids))
    p.proc.send_signal(signum)
    assert p.proc.wait(60) == 128 + signum, p.output()
    assert_all_gone(kids)
    assert "interrupted" in p.output() and "Traceback" not in p.output(), p.output()


@pytest.mark.parametrize("command", ["dev", "run"])
def test_agents_stop_when_their_command_is_killed_with_sigkill(
    tmp_path: Path, started: list, command: str
) -> None:
    """SIGKILL cannot be passed on: the agents notice their command is gone and stop
    (before, they worked on as orphans). The embedded nats-server is not ours to change
    and is not checked here."""
    root = project(tmp_path / "p")
    never = tmp_path / "never-created"
    args = [str(root)] if command == "dev" else [str(root), "--input", json.dumps({"release": str(never)})]
    p = Process(cli(command, *args), tmp_path / f"{command}.log")
    kids = wait_for_stack(p, DEV_READY if command == "dev" else "")
    started.append((p, kids))
    agents = {pid: cmd for pid, cmd in kids.items() if "agents.py" in cmd}
    assert agents, kids
    p.proc.kill()
    p.proc.wait(60)
    assert_all_gone(agents)


# ------------------------------------------------------------------- (c) Queued
def rendered(state: RunState, depths: dict[str, int] | None = None) -> dict[str, str]:
    """step -> its row of the table, as text."""
    console = Console(record=True, width=250, file=io.StringIO())
    console.print(step_table(state, "t", {"a": "worker", "b": "worker", "fan": "worker"}, depths))
    rows = console.export_text().splitlines()
    return {name: next(r for r in rows if f" {name} " in r) for name in ("a", "b", "fan")}


def test_a_step_waiting_for_its_agent_shows_queued_until_an_agent_starts_it() -> None:
    waiting = StepState(phase="Running", attempt=1, running=True, queuedAt=10.0)
    started = StepState(phase="Running", attempt=1, running=True, queuedAt=10.0, startedAt=11.0)
    items = ForEachState(
        total=3,
        next=2,
        running={
            "0": Slot(attempt=1, running=True, queuedAt=10.0),
            "1": Slot(attempt=1, running=True, queuedAt=10.0),
        },
    )
    fan = StepState(phase="Running", running=False, forEach=items)
    state = RunState(
        run="r", workflow="w", definition="d", createdAt=1.0, steps={"a": waiting, "b": started, "fan": fan}
    )

    rows = rendered(state, {"worker": 3})
    assert "Queued" in rows["a"] and "3 in worker's queue" in rows["a"], rows
    assert "Running" in rows["b"] and "Queued" not in rows["b"], rows
    assert "Queued" in rows["fan"] and "2 item(s)" in rows["fan"], rows
    # Without a depth read yet it still says what the step waits for.
    assert "waiting for worker" in rendered(state)["a"]

    items.running["0"].startedAt = 12.0  # one item started: the step runs, one item still waits
    rows = rendered(state, {"worker": 0})
    assert "Running" in rows["fan"] and "1 running, 1 queued" in rows["fan"], rows


async def test_cadenza_run_progress_shows_the_waiting_step_queued_with_the_queue_depth(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    release = tmp_path / "release"
    root = project(tmp_path / "p")
    bundle = load([root], namespace=unique_namespace())
    wf = bundle.compiled["pair"]
    from cadenza_operator.local.progress import agent_steps  # here: what eccef6e lacks fails this test alone

    progress = Progress(Console(file=io.StringIO()), wf.name, agent_steps(wf))
    opts = RunOptions(
        workflow=wf, bundle=bundle, input={"release": str(release)}, nats_url=nats_server.url, timeout=120
    )
    run = asyncio.ensure_future(execute(opts, progress))
    try:

        def one_runs_one_queued() -> bool:
            """Concurrency 1: an agent started one step, the other waits in its queue."""
            shown = sorted((row[1], row[4]) for row in _rows(progress))
            return shown == [("Queued", "1 in worker's queue"), ("Running", "")]

        deadline = time.monotonic() + 60
        while not one_runs_one_queued():
            assert not run.done(), run.result()
            assert time.monotonic() < deadline, f"never one step Running, one Queued: {_rows(progress)}"
            await asyncio.sleep(0.05)
    finally:
        release.touch()
    summary, code = await asyncio.wait_for(run, 120)
    assert code == 0, summary
    assert [row[1] for row in _rows(progress)] == ["Succeeded", "Succeeded"]


def _rows(progress: Progress) -> list[list[str]]:
    """The cells of each step's row: step, phase, attempts, duration, detail."""
    console = Console(record=True, width=250, file=io.StringIO())
    console.print(progress.table())
    rows = [[c.strip() for c in r.strip("│").split("│")] for r in console.export_text().splitlines()]
    return [r for r in rows if r[0] in ("first", "second")]


# ------------------------------------------------------- (d) an agent that cannot start
@pytest.mark.parametrize("output", ["json", "text"])
def test_an_agent_that_cannot_start_fails_the_run_with_its_last_log_line(tmp_path: Path, output: str) -> None:
    root = project(tmp_path / "p", command='["python", "missing.py", "worker"]')
    result = cadenza("run", str(root), "--input", '{"release": "x"}', "--output", output, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stdout, result.stdout
    if output == "text":
        assert "AgentUnavailable" in result.stdout and "No such file" in result.stdout, result.stdout
        return
    summary = json.loads(result.stdout)
    assert summary["phase"] == "Failed", summary
    steps = summary["steps"]
    failed = [name for name, step in steps.items() if step["phase"] == "Failed"]
    assert failed and all(steps[n]["phase"] in ("Failed", "Cancelled") for n in steps), steps
    for name in failed:
        error = steps[name]["error"]
        assert error["type"] == "AgentUnavailable" and error["retryable"] is False, error
        assert "No such file" in error["message"], error
        assert any("No such file" in line for line in error["log"]), error
    assert "No such file" in summary["message"], summary
