"""The processes the soak runs and breaks: one nats-server, `cadenza engine` processes and
agent replicas, each restarted after a fault as a Deployment would restart it."""

from __future__ import annotations

import os
import signal
import subprocess
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

from cadenza_operator.local.nats_server import NatsServer
from cadenza_operator.local.processes import AgentProcess, AgentProcesses
from cadenza_operator.models import Agent

from ..integration.harness import start_engine
from .workload import AGENTS_PY, BUSY, FRAGILE, WORKER

ENGINE_ACK_WAIT = 2.0  # seconds: a killed engine's events go to another engine this fast
AGENT_ACK_WAIT = "2s"


@dataclass
class Cluster:
    workdir: Path
    namespace: str
    engine_count: int = 3
    server: NatsServer = field(init=False)
    agents: AgentProcesses = field(init=False)
    engines: list[subprocess.Popen[bytes]] = field(default_factory=list)
    engine_serial: int = 0
    engine_exits: int = 0  # engines that ended without being killed by the soak
    agent_exits: dict[str, int] = field(default_factory=dict)  # unplanned, per Agent
    _planned: dict[tuple[str, int], int] = field(default_factory=dict)  # kills not yet restarted

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def exec_log(self) -> Path:
        return self.workdir / "exec"

    def start_server(self) -> None:
        self.server = NatsServer(store_dir=str(self.workdir / "jetstream")).start()
        self.agents = AgentProcesses(self.server.url, self.namespace, self.workdir)

    def agent_specs(self) -> list[Agent]:
        return [
            Agent.model_validate(
                {
                    "metadata": {"name": name},
                    "spec": {
                        "command": ["python", "agents.py"],
                        "replicas": 2,
                        "concurrency": concurrency,
                        "ackWait": AGENT_ACK_WAIT,
                        "env": [{"name": "SOAK_LOG", "value": str(self.exec_log)}],
                    },
                }
            )
            for name, concurrency in ((WORKER, 32), (FRAGILE, 2), (BUSY, 1))
        ]

    def start_agents(self) -> None:
        (self.workdir / "agents.py").write_text(textwrap.dedent(AGENTS_PY))
        for agent in self.agent_specs():
            self.agents.start(agent, self.workdir)

    def start_engines(self) -> None:
        for _ in range(self.engine_count):
            self.engines.append(self._spawn_engine())

    def _spawn_engine(self) -> subprocess.Popen[bytes]:
        name = f"engine-{self.engine_serial}"
        self.engine_serial += 1
        return start_engine(self.url, name, self.workdir, CADENZA_ENGINE_ACK_WAIT=str(ENGINE_ACK_WAIT))

    # ------------------------------------------------------------------ faults
    def kill_engine(self, index: int) -> None:
        """SIGKILL one engine and start a replacement (a new name, a new log)."""
        victim = self.engines[index]
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        self.engines[index] = self._spawn_engine()

    def kill_agent(self, agent: str, replica: int) -> None:
        """SIGKILL one replica's process group; `supervise` starts it again."""
        for p in self.agents.procs:
            if p.agent == agent and p.replica == replica and p.proc.poll() is None:
                _kill_group(p)
                p.proc.wait()
                key = (p.agent, p.replica)
                self._planned[key] = self._planned.get(key, 0) + 1

    def restart_server(self) -> None:
        """Stop nats-server and start it again, same port, same store (blocking)."""
        self.server.restart()

    def supervise(self) -> None:
        """Start again whatever exited: engines (counted) and agent replicas."""
        for i, proc in enumerate(self.engines):
            if proc.poll() is not None:
                self.engine_exits += 1
                self.engines[i] = self._spawn_engine()
        for p in self.agents.restart_dead():
            key = (p.agent, p.replica)
            if self._planned.get(key):
                self._planned[key] -= 1
            else:
                self.agent_exits[p.agent] = self.agent_exits.get(p.agent, 0) + 1

    def stop(self) -> None:
        for proc in self.engines:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        if hasattr(self, "agents"):
            for p in self.agents.procs:
                _kill_group(p)
            self.agents.stop(grace=0)
        if hasattr(self, "server"):
            self.server.stop()


def _kill_group(p: AgentProcess) -> None:
    try:
        os.killpg(p.proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
