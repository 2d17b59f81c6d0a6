"""`cadenza run` and `cadenza dev`: the same manifests on one machine, with no cluster.

An embedded nats-server (unless --nats), the engine in this process, each Agent's
command as local processes (restarted if they die, as a Deployment would), live
progress on a terminal and a summary at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from cadenza.wire import TASKS_STREAM, agent_event_subject, consumer_name, dumps

from ..engine.definition import CompiledWorkflow
from ..engine.host import EngineHost
from ..engine.infra import ensure_agent_consumer
from ..engine.runtime import Engine
from ..engine.settings import EngineSettings
from ..engine.state import TERMINAL_RUN, RunState
from ..engine.view import SUMMARY_OUTPUT_BYTES as SUMMARY_OUTPUT_BYTES  # noqa: PLC0414 (cli.py reads it here)
from ..engine.view import document, run_view
from ..manifests import Bundle
from ..models import parse_duration
from ..observe.diagnose import ENGINE_OPERATIONS
from .nats_server import NatsServer
from .processes import AgentProcesses
from .secure import LocalCredentials
from .supervision import SUPERVISE_EVERY, Supervisor, Waiting, WaitingAttempts, failed_event, run_to_end

log = structlog.get_logger("cadenza.local")

EXIT_OK, EXIT_FAILED, EXIT_INVALID = 0, 1, 2


@dataclass
class RunOptions:
    workflow: CompiledWorkflow
    bundle: Bundle
    input: Any = None
    approve: list[str] = field(default_factory=list)
    reject: list[str] = field(default_factory=list)
    signals: dict[str, Any] = field(default_factory=dict)
    approver: str = "cli"
    nats_url: str | None = None
    timeout: float | None = None
    metrics_port: int | None = None
    interactive: bool = False
    progress: bool = False
    run_id: str | None = None
    secure: bool = False  # the embedded server in operator mode, one credential per identity


class MetricsPortError(ValueError):
    """--metrics-port names a port this process cannot listen on."""


def cannot_listen(option: str, what: str, port: int, exc: OSError | OverflowError) -> str:
    """The message for an `option` PORT this process cannot serve `what` on: the system's
    reason (a port taken, out of range) and what to do instead (--metrics-port, --http-port)."""
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return (
        f"{option} {port}: cannot serve {what} on 127.0.0.1:{port}: {reason} "
        "(choose another port, or 0 for any free one)"
    )


def serve_metrics(port: int) -> int:
    """Serve /metrics on 127.0.0.1:`port` (0: any free port); return the port bound."""
    from .. import metrics

    try:
        return metrics.serve(port)
    except (OSError, OverflowError) as exc:
        raise MetricsPortError(cannot_listen("--metrics-port", "metrics", port, exc)) from None


def agents_needed(bundle: Bundle, wf: CompiledWorkflow) -> set[str]:
    """Agents of the workflow and of its sub-workflows, recursively."""
    seen_wf: set[str] = set()
    agents: set[str] = set()
    todo = [wf.name]
    while todo:
        name = todo.pop()
        if name in seen_wf or name not in bundle.compiled:
            continue
        seen_wf.add(name)
        cw = bundle.compiled[name]
        agents |= set(cw.agents)
        todo += [s.workflow for s in cw.steps.values() if s.workflow]
    return agents


class LocalStack:
    """nats-server + engine + agent processes, started and stopped together."""

    def __init__(
        self, bundle: Bundle, nats_url: str | None = None, namespace: str = "default", secure: bool = False
    ) -> None:
        self.bundle = bundle
        self.namespace = namespace
        self._external = nats_url
        self.server: NatsServer | None = None
        self.host: EngineHost | None = None
        self.nc: Any = None
        self.engine: Engine | None = None
        self.log_dir = Path(tempfile.mkdtemp(prefix="cadenza-run-"))
        # --secure: keys and creds in the work folder, removed with it (local/secure.py)
        self.credentials = LocalCredentials(self.log_dir / "secure", namespace) if secure else None
        self.agents = AgentProcesses(
            nats_url or "", namespace, self.log_dir, models={n: m for n, (m, _) in bundle.models.items()}
        )
        self.supervisor = Supervisor(self.agents)
        self.waiting = WaitingAttempts(bundle)
        self._supervisor: asyncio.Task[None] | None = None
        self._server_start: asyncio.Future[Any] | None = None
        self._failed: set[Waiting] = set()  # attempts already failed as AgentUnavailable
        self._depths: dict[str, tuple[float, int | None]] = {}  # agent -> (read at, tasks queued)

    @property
    def restarts(self) -> int:
        return self.supervisor.restarts

    @property
    def url(self) -> str:
        return self._external or (self.server.url if self.server else "")

    async def start(self, agents: set[str]) -> Engine:
        """Start everything; `NatsUnreachable` at once when a --nats server cannot be reached."""
        if self._external is None:
            # Held before it is started: a signal arriving meanwhile must still stop it.
            config = self.credentials.server_config() if self.credentials else None
            self.server = NatsServer(store_dir=str(self.log_dir / "jetstream"), config=config)
            self._server_start = asyncio.ensure_future(asyncio.to_thread(self.server.start))
            await asyncio.shield(self._server_start)
        creds = self.credentials.engine() if self.credentials else None
        settings = EngineSettings(name="local", nats_url=self.url, nats_creds=creds)
        self.host = EngineHost(settings, connection_name="cadenza-engine")
        self.engine = await self.host.open()
        self.nc = self.host.nc
        js = self.host.js
        self.agents.nats_url = self.url
        for name in sorted(agents):
            agent, path = self.bundle.agents[name]
            await ensure_agent_consumer(js, self.namespace, name, parse_duration(agent.spec.ackWait))
            if self.credentials:
                self.agents.creds[name] = self.credentials.agent(name)
            self.agents.start(agent, path.parent)
        await self.host.start(on_state=self.waiting.observe, operations=ENGINE_OPERATIONS)
        for wf in self.bundle.compiled.values():
            await self.engine.client.publish_definition(wf)
        self._supervisor = asyncio.get_running_loop().create_task(self._supervise())
        return self.engine

    async def _supervise(self) -> None:
        """Restart agent processes that exit, like a Deployment's ReplicaSet would; fail the
        attempts waiting for an Agent that cannot start (see local/supervision.py)."""
        while True:
            await asyncio.sleep(SUPERVISE_EVERY)
            self.supervisor.tick()
            try:
                await self._fail_waiting()
            except Exception as exc:  # NATS restarting: the next tick tries again
                log.warning("could not fail attempts of an unavailable agent", error=repr(exc))

    async def _fail_waiting(self) -> None:
        for agent, error in self.supervisor.unavailable().items():
            for w in self.waiting.for_agent(agent):
                if w in self._failed:
                    continue
                event = failed_event(w, error, time.time())
                where = f"{w.run}.{w.step}.{w.item}.{w.attempt}"
                # The id an agent's own failure of this attempt has: one of the two counts.
                headers = {"Nats-Msg-Id": f"failed:{where}"}
                await self.nc.jetstream().publish(
                    agent_event_subject(w.namespace, w.run, agent), dumps(event), headers=headers
                )
                self._failed.add(w)
                log.warning("attempt failed: agent unavailable", agent=agent, run=w.run, step=w.step)

    async def queue_depth(self, agent: str) -> int | None:
        """Tasks waiting in `agent`'s queue, not yet handed to a replica (its consumer's
        num_pending); read from the server at most once a second per agent."""
        read_at, depth = self._depths.get(agent, (0.0, None))
        if time.monotonic() - read_at < 1.0:
            return depth
        try:
            info = await self.nc.jetstream().consumer_info(TASKS_STREAM, consumer_name(self.namespace, agent))
            depth = int(info.num_pending)
        except Exception:
            depth = None
        self._depths[agent] = (time.monotonic(), depth)
        return depth

    def agent_logs(self, tail: int = 20) -> str:
        out = []
        for log in sorted(self.log_dir.glob("*.log")):
            lines = log.read_text(errors="replace").splitlines()[-tail:]
            if lines:
                out.append(f"--- {log.name}\n" + "\n".join(lines))
        return "\n".join(out)

    async def stop(self) -> None:
        if self._supervisor:
            self._supervisor.cancel()
        self.agents.stop()
        if self.host is not None:
            await self.host.stop()
        if self.server:
            if self._server_start is not None:  # still starting (a signal came meanwhile)
                with contextlib.suppress(Exception):
                    await self._server_start
            await asyncio.to_thread(self.server.stop)
        import shutil

        shutil.rmtree(self.log_dir, ignore_errors=True)


def summarize(state: RunState) -> dict[str, Any]:
    """The `--output json` document (see engine/view.py)."""
    return document(run_view(state))


async def execute(opts: RunOptions, progress: Any = None) -> tuple[dict[str, Any], int]:
    """Run one workflow to its end on a local stack; return (summary, exit code)."""
    if opts.metrics_port is not None:  # before anything starts: a taken port stops nothing
        port = serve_metrics(opts.metrics_port)
        print(f"metrics  http://127.0.0.1:{port}/metrics", file=sys.stderr)
    stack = LocalStack(opts.bundle, opts.nats_url, opts.workflow.namespace, secure=opts.secure)
    done: asyncio.Future[RunState] = asyncio.get_running_loop().create_future()
    decided: set[str] = set()
    run_id = ""
    prompts: set[str] = set()

    async def on_state(state: RunState) -> None:
        if state.run != run_id:
            return
        if progress is not None:
            progress.update(state)
        for name, st in state.steps.items():
            if st.phase != "WaitingApproval" or name in decided:
                continue
            if name in opts.approve or name in opts.reject:
                decided.add(name)
                await publish_decision(name, name in opts.approve)
            elif opts.interactive and name not in prompts:
                prompts.add(name)
                # The message as the engine rendered it (`${{ }}` filled in), read now:
                # the engine goes on working on `state`.
                cs = opts.workflow.steps.get(name)
                asked = st.message if cs is not None and cs.spec.approval and cs.spec.approval.message else ""  # type: ignore[union-attr]
                asyncio.get_running_loop().create_task(prompt(name, asked))
        if state.phase in TERMINAL_RUN and not done.done():
            done.set_result(state)

    async def publish_decision(
        step: str, approved: bool, comment: str | None = None, by: str | None = None
    ) -> None:
        await engine.client.approve(
            opts.workflow.namespace,
            run_id,
            step,
            approved,
            by=by or opts.approver,
            comment=comment,
        )

    async def watch_queues() -> None:
        """How many tasks wait in the queue of each agent the run waits for: the depth its
        Queued rows show (read once a second)."""
        while True:
            await asyncio.sleep(1.0)
            depths = {}
            for agent in stack.waiting.agents_of(run_id):
                depth = await stack.queue_depth(agent)
                if depth is not None:
                    depths[agent] = depth
            progress.set_queue_depths(depths)

    queues: asyncio.Task[None] | None = None

    async def prompt(step: str, message: str) -> None:
        if progress is not None:
            progress.pause()
        asked = f" — {message.rstrip('?')}" if message else ""
        question = f"Approve step {step!r}{asked}? [y/n] "
        answer = await asyncio.to_thread(_ask, question)
        if progress is not None:
            progress.resume()
        if step not in decided:
            decided.add(step)
            await publish_decision(step, answer, comment="answered at the terminal", by=_terminal_user(opts))

    try:
        engine = await stack.start(agents_needed(opts.bundle, opts.workflow))
        engine.on_state(on_state)
        run_id = opts.run_id or ""
        from ..engine.client import new_run_id

        run_id = run_id or new_run_id(opts.workflow.name)
        await engine.client.start(opts.workflow, opts.input, run_id=run_id)
        if progress is not None and hasattr(progress, "set_queue_depths"):
            queues = asyncio.get_running_loop().create_task(watch_queues())
        if opts.signals:
            for name, payload in opts.signals.items():
                await engine.client.signal(opts.workflow.namespace, run_id, name, payload, by=opts.approver)
        try:
            state = await asyncio.wait_for(asyncio.shield(done), opts.timeout)
        except TimeoutError:
            await engine.client.cancel(
                opts.workflow.namespace,
                run_id,
                by="cadenza run",
                reason=f"--timeout {opts.timeout:g}s exceeded",
            )
            try:
                state = await asyncio.wait_for(asyncio.shield(done), 10)
            except TimeoutError:
                state = await engine.client.get(run_id) or RunState(
                    run=run_id,
                    workflow=opts.workflow.name,
                    definition=opts.workflow.key,
                    createdAt=time.time(),
                )
        summary = summarize(state)
        summary["outputs"] = await engine.client.outputs(state)  # large ones are kept apart from the record
        if state.phase != "Succeeded" and stack.agent_logs():
            summary["agentLogs"] = stack.agent_logs(tail=15)
        return summary, EXIT_OK if state.phase == "Succeeded" else EXIT_FAILED
    finally:
        if queues is not None:
            queues.cancel()
        await run_to_end(stack.stop())


def _terminal_user(opts: RunOptions) -> str:
    """Who answered the prompt: --by when given, else the user at the terminal."""
    if opts.approver != "cli":
        return opts.approver
    import getpass

    try:
        return getpass.getuser()
    except Exception:
        return opts.approver


def _ask(question: str) -> bool:
    while True:
        sys.stderr.write(question)
        sys.stderr.flush()
        line = sys.stdin.readline()
        if not line:
            return False
        if line.strip().lower() in ("y", "yes"):
            return True
        if line.strip().lower() in ("n", "no"):
            return False


def dump_json(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2, default=str)
