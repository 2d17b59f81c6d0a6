"""Agents as local processes: each Agent's command started `replicas` times with its
environment, cwd = the manifest's folder; stopped (SIGTERM, then SIGKILL) as a group.

Each process's log (stdout and stderr) goes to LOG_DIR/AGENT-REPLICA.log, appended to on
every restart; `became_ready` and `log_tail` read the part written by the current process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..models import Agent, Model, parse_duration
from .model_env import model_environment
from .secrets import referenced_environment, unreferenced

READY_EVENT = "agent ready"
"""What the SDK logs once an agent consumes tasks (cadenza._agent.Agent.serve)."""


@dataclass
class AgentProcess:
    agent: str
    replica: int
    proc: subprocess.Popen[bytes]
    log_path: Path
    spec: Agent | None = None  # what it was started from, to start it again
    cwd: Path | None = None
    restarts: int = 0
    started: float = field(default_factory=time.monotonic)
    log_offset: int = 0  # where this process's output begins in log_path
    # Supervision (LocalStack): consecutive exits before the SDK said "agent ready", and
    # consecutive exits soon after a start (for the restart backoff).
    not_ready_exits: int = 0
    quick_exits: int = 0
    restart_at: float | None = None  # exited; start again at this monotonic time
    exit_code: int | None = None
    last_lines: list[str] = field(default_factory=list)  # of the last process that exited


@dataclass
class AgentProcesses:
    nats_url: str
    namespace: str = "default"
    log_dir: Path = field(default_factory=lambda: Path("."))
    procs: list[AgentProcess] = field(default_factory=list)
    models: dict[str, Model] = field(default_factory=dict)  # the Models agents may name
    creds: dict[str, str] = field(default_factory=dict)
    """Agent name -> its own NATS .creds file (`--secure`); none: the open server's."""

    def command(self, agent: Agent) -> list[str]:
        cmd = list(agent.spec.command)
        if not cmd:
            raise ValueError(f"Agent/{agent.metadata.name}: spec.command is empty: nothing to run locally")
        if cmd[0] in ("python", "python3"):
            cmd[0] = sys.executable  # the interpreter that has cadenza installed
        return cmd

    def env(self, agent: Agent) -> dict[str, str]:
        """The process's environment; raises MissingReference (secrets.py) when the agent
        references a Secret or ConfigMap key no variable resolves."""
        env = unreferenced(os.environ)
        env.update(
            {
                "CADENZA_NATS_URL": self.nats_url,
                "CADENZA_AGENT": agent.metadata.name,
                "CADENZA_NAMESPACE": self.namespace,
                "CADENZA_CONCURRENCY": str(agent.spec.concurrency),
                "CADENZA_ACK_WAIT": str(parse_duration(agent.spec.ackWait)),
                "CADENZA_LOG_FORMAT": env.get("CADENZA_LOG_FORMAT", "json"),
                "CADENZA_PARENT_PID": str(os.getpid()),  # the agent stops if we are killed
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(referenced_environment(agent, os.environ))
        env.update(model_environment(agent, self.models, os.environ))
        if agent.metadata.name in self.creds:
            env["CADENZA_NATS_CREDS"] = self.creds[agent.metadata.name]
        return env

    def start(self, agent: Agent, cwd: Path, replicas: int | None = None) -> list[AgentProcess]:
        started = []
        count = agent.spec.replicas if replicas is None else replicas
        for replica in range(max(1, count)):
            log_path = self.log_dir / f"{agent.metadata.name}-{replica}.log"
            offset = _size(log_path)
            proc = self._spawn(agent, cwd, log_path)
            started.append(
                AgentProcess(agent.metadata.name, replica, proc, log_path, agent, cwd, log_offset=offset)
            )
        self.procs += started
        return started

    def relaunch(self, p: AgentProcess) -> None:
        """Start an exited replica again, in place: same Agent, same log (appended to)."""
        if p.spec is None or p.cwd is None:
            return
        p.log_offset = _size(p.log_path)
        p.proc = self._spawn(p.spec, p.cwd, p.log_path)
        p.started = time.monotonic()
        p.restart_at = None
        p.restarts += 1

    def became_ready(self, p: AgentProcess) -> bool:
        """Whether the current process of `p` got as far as consuming tasks: the SDK logs
        READY_EVENT once its consumer is pulling. (A process that is not written with the
        SDK never says so: each of its exits counts as one before it was ready.)"""
        return READY_EVENT.encode() in _read_from(p.log_path, p.log_offset)

    def log_tail(self, p: AgentProcess, lines: int = 10, width: int = 300) -> list[str]:
        """The last `lines` lines the current process of `p` wrote, each cut to `width`."""
        text = _read_from(p.log_path, p.log_offset, last=lines * (width + 1) * 4).decode(errors="replace")
        tail = [line.rstrip() for line in text.splitlines() if line.strip()][-lines:]
        return [line if len(line) <= width else line[: width - 1] + "…" for line in tail]

    def _spawn(self, agent: Agent, cwd: Path, log_path: Path) -> subprocess.Popen[bytes]:
        with open(log_path, "ab") as log:
            return subprocess.Popen(
                self.command(agent),
                cwd=cwd,
                env=self.env(agent),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own group: killed as a whole
            )

    def dead(self) -> list[AgentProcess]:
        return [p for p in self.procs if p.proc.poll() is not None]

    def restart_dead(self) -> list[AgentProcess]:
        """Start again, in place, every replica that exited, as a Deployment's ReplicaSet
        would: same Agent, same replica number, its log appended to."""
        restarted = []
        for p in self.dead():
            if p.spec is None or p.cwd is None:
                continue
            self.relaunch(p)
            restarted.append(p)
        return restarted

    def stop(self, grace: float = 5.0) -> None:
        for p in self.procs:
            _signal_group(p.proc, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in self.procs:
            try:
                p.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for p in self.procs:
            _signal_group(p.proc, signal.SIGKILL)
            try:
                p.proc.wait(2)
            except subprocess.TimeoutExpired:
                pass
        self.procs.clear()


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _read_from(path: Path, offset: int, last: int | None = None) -> bytes:
    """The bytes of `path` from `offset` on (only the `last` ones, when given)."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            start = offset if last is None else max(offset, size - last)
            f.seek(start)
            return f.read()
    except OSError:
        return b""


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
