"""Agents as local processes: each Agent's command started `replicas` times with its
environment, cwd = the manifest's folder; stopped (SIGTERM, then SIGKILL) as a group."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..models import Agent, parse_duration


@dataclass
class AgentProcess:
    agent: str
    replica: int
    proc: subprocess.Popen[bytes]
    log_path: Path
    spec: Agent | None = None  # what it was started from, to start it again
    cwd: Path | None = None
    restarts: int = 0


@dataclass
class AgentProcesses:
    nats_url: str
    namespace: str = "default"
    log_dir: Path = field(default_factory=lambda: Path("."))
    procs: list[AgentProcess] = field(default_factory=list)

    def command(self, agent: Agent) -> list[str]:
        cmd = list(agent.spec.command)
        if not cmd:
            raise ValueError(f"Agent/{agent.metadata.name}: spec.command is empty: nothing to run locally")
        if cmd[0] in ("python", "python3"):
            cmd[0] = sys.executable  # the interpreter that has cadenza installed
        return cmd

    def env(self, agent: Agent) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "CADENZA_NATS_URL": self.nats_url,
                "CADENZA_AGENT": agent.metadata.name,
                "CADENZA_NAMESPACE": self.namespace,
                "CADENZA_CONCURRENCY": str(agent.spec.concurrency),
                "CADENZA_ACK_WAIT": str(parse_duration(agent.spec.ackWait)),
                "CADENZA_LOG_FORMAT": env.get("CADENZA_LOG_FORMAT", "json"),
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update({e.name: e.value for e in agent.spec.env})
        return env

    def start(self, agent: Agent, cwd: Path, replicas: int | None = None) -> list[AgentProcess]:
        started = []
        count = agent.spec.replicas if replicas is None else replicas
        for replica in range(max(1, count)):
            log_path = self.log_dir / f"{agent.metadata.name}-{replica}.log"
            proc = self._spawn(agent, cwd, log_path)
            started.append(AgentProcess(agent.metadata.name, replica, proc, log_path, agent, cwd))
        self.procs += started
        return started

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
            p.proc = self._spawn(p.spec, p.cwd, p.log_path)
            p.restarts += 1
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


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
