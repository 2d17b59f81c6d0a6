"""The seeded soak: runs fed in while engines and agents are SIGKILLed, nats-server is
restarted and poison is injected; then what was lost, stuck, wrong, started after being
abandoned, applied twice or dead-lettered is counted.

    python -m tests.durability.soak --runs 2000 --seconds 900 --seed 7

prints one JSON report and exits 1 when `failures(report)` is not empty. Everything is
bounded by `--seconds`; every process it starts is killed before it returns.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import nats
from cadenza._protocol import EVENTS_STREAM, TASKS_STREAM, consumer_name, event_subject, task_subject
from cadenza_operator.engine.client import RunClient
from cadenza_operator.engine.definition import CompiledWorkflow, compile_workflow
from cadenza_operator.engine.infra import ENGINE_CONSUMER, ensure_agent_consumer
from cadenza_operator.engine.runtime import Engine, EngineSettings
from cadenza_operator.engine.state import RunState
from cadenza_operator.models import WorkflowSpec

from ..conftest import ROOT
from . import measure
from .cluster import ENGINE_ACK_WAIT, Cluster
from .workload import BUSY, FRAGILE, WORKER, WORKFLOWS, PlannedRun, plan_runs

T = TypeVar("T")
TERMINAL = ("Succeeded", "Failed", "Cancelled")
RESERVE = 30.0  # seconds of the deadline kept for counting, after the runs were given up on
POISON_EVENTS = [b"garbage", b'{"run":"a*b","type":"cancel"}', b'{"run":5,"type":"start"}']
POISON_TASKS = [b"garbage", b"{}"]


@dataclass
class SoakConfig:
    runs: int = 200
    seconds: float = 200.0
    """Deadline of the whole soak, start-up and counting included."""
    seed: int = 20261121
    engines: int = 3
    feed_rate: float = 5.0
    """Runs started per second: the runs, and so the faults, are spread over runs / rate."""
    workdir: Path | None = None
    """Keep logs and the JetStream store here (default: a temporary folder, removed)."""


@dataclass
class Fault:
    at: float  # seconds after the first run was started
    kind: str  # engine | agent | nats
    target: int = 0


def plan_faults(rng: random.Random, window: float, runs: int, engines: int) -> list[Fault]:
    """Engine and agent SIGKILLs at random moments, nats-server restarts spread out evenly."""
    faults = [
        Fault(rng.uniform(0.05, 1.0) * window, "engine", rng.randrange(engines))
        for _ in range(max(8, runs // 8))
    ]
    faults += [
        Fault(rng.uniform(0.05, 1.0) * window, "agent", rng.randrange(2)) for _ in range(max(4, runs // 25))
    ]
    restarts = max(2, runs // 100)
    slot = window / restarts
    faults += [Fault((k + rng.uniform(0.2, 0.8)) * slot, "nats") for k in range(restarts)]
    return sorted(faults, key=lambda f: f.at)


async def persist(call: Callable[[], Awaitable[T]], until: float, timeout: float = 10.0) -> T:
    """`call()` again until it succeeds: nats-server may be restarting. Every call we retry
    is idempotent (a Nats-Msg-Id or a read)."""
    while True:
        try:
            return await asyncio.wait_for(call(), timeout)
        except Exception:
            if time.monotonic() > until:
                raise
            await asyncio.sleep(0.25)


def cli(*args: str) -> bool:
    """A `cadenza` command, as an operator would type it; True when it exited 0."""
    return cli_output(*args) is not None


def cli_output(*args: str) -> str | None:
    """The standard output of a `cadenza` command, or None when it failed."""
    try:
        done = subprocess.run(
            [sys.executable, "-m", "cadenza_operator.cli", *args],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        return None
    return done.stdout if done.returncode == 0 else None


@dataclass
class Soak:
    config: SoakConfig
    cluster: Cluster
    client: RunClient
    js: Any
    plan: list[PlannedRun]
    faults: list[Fault]
    deadline: float
    workflows: dict[str, CompiledWorkflow] = field(default_factory=dict)
    started: set[str] = field(default_factory=set)
    phases: dict[str, str] = field(default_factory=dict)
    acted: set[str] = field(default_factory=set)  # runs approved or cancelled
    feeding: bool = True
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def namespace(self) -> str:
        return self.cluster.namespace

    @property
    def window(self) -> float:
        return len(self.plan) / self.config.feed_rate

    def count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    def in_flight(self) -> bool:
        return any(self.phases.get(r) not in TERMINAL for r in self.started)

    # ------------------------------------------------------------- the drivers
    async def feed(self) -> None:
        by_cli = 0
        for run in self.plan:
            if time.monotonic() > self.deadline - RESERVE:
                break
            wf = self.workflows[run.workflow]
            await persist(functools.partial(self.client.start, wf, run.input, run_id=run.id), self.deadline)
            self.started.add(run.id)
            payload = run.signal
            if payload is not None:
                by_cli += 1
                args = ("signal", run.id, "go", "--payload", json.dumps(payload), "--nats", self.cluster.url)
                if by_cli % 40 == 20 and await asyncio.to_thread(cli, *args, "--namespace", self.namespace):
                    self.count("signals_by_cli")
                else:
                    signal = functools.partial(self.client.signal, self.namespace, run.id, "go", payload)
                    await persist(signal, self.deadline)
            await asyncio.sleep(1 / self.config.feed_rate)
        self.feeding = False

    async def inject_faults(self, t0: float) -> None:
        for fault in self.faults:
            await asyncio.sleep(max(0.0, t0 + fault.at - time.monotonic()))
            if time.monotonic() > self.deadline - RESERVE:
                return
            if self.in_flight():
                self.count(f"{fault.kind}_faults_with_runs_in_flight")
            self.count(f"{fault.kind}_faults")
            if fault.kind == "engine":
                self.cluster.kill_engine(fault.target % len(self.cluster.engines))
            elif fault.kind == "agent":
                self.cluster.kill_agent(WORKER, fault.target)
            else:
                await asyncio.to_thread(self.cluster.restart_server)

    async def inject_poison(self, t0: float) -> None:
        """Malformed events and tasks, published as a broken client would."""
        await asyncio.sleep(max(0.0, t0 + 0.3 * self.window - time.monotonic()))
        for i, body in enumerate(POISON_EVENTS):
            subject = event_subject(self.namespace, f"poison-{i}")
            await persist(functools.partial(self.js.publish, subject, body), self.deadline)
        for body in POISON_TASKS:
            subject = task_subject(self.namespace, WORKER)
            await persist(functools.partial(self.js.publish, subject, body), self.deadline)

    async def supervise(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            self.cluster.supervise()

    async def watch(self) -> None:
        """Follow the runs: approve (or cancel) those waiting at their gate, until every run
        started has finished or the deadline leaves only the time to count."""
        plan = {r.id: r for r in self.plan}
        while time.monotonic() < self.deadline - RESERVE:
            pending = [r for r in self.started if self.phases.get(r) not in TERMINAL]
            if not pending and not self.feeding:
                return
            try:
                states = await asyncio.wait_for(self.get_runs(pending), 20)
            except Exception:
                await asyncio.sleep(0.5)  # nats-server restarting
                continue
            for state in states:
                if state is None:
                    continue
                self.phases[state.run] = state.phase
                gate = state.steps.get("gate")
                if gate is not None and gate.phase == "WaitingApproval" and state.run not in self.acted:
                    await self.act(plan[state.run])
            await asyncio.sleep(0.5)

    async def get_runs(self, runs: list[str]) -> list[RunState | None]:
        return list(await asyncio.gather(*(self.client.get(r) for r in runs)))

    async def act(self, run: PlannedRun) -> None:
        if run.kind == "cancel":
            await persist(lambda: self.client.cancel(self.namespace, run.id, by="soak"), self.deadline)
        elif run.approve_by == "cli":
            args = ("approve", run.id, "gate", "--by", "cli", "--nats", self.cluster.url)
            if not await asyncio.to_thread(cli, *args, "--namespace", self.namespace):
                return  # nats-server restarting: the next look tries again
            self.count("approvals_by_cli")
        elif run.approve_by == "soak":
            await persist(
                lambda: self.client.approve(self.namespace, run.id, "gate", True, by="soak"), self.deadline
            )
        self.acted.add(run.id)

    async def drive(self) -> None:
        t0 = time.monotonic()
        supervisor = asyncio.create_task(self.supervise())
        background = [
            asyncio.create_task(self.inject_faults(t0)),
            asyncio.create_task(self.inject_poison(t0)),
        ]
        feeder = asyncio.create_task(self.feed())
        try:
            await self.watch()
            feeder.cancel()
            for task in background:
                task.cancel()
        finally:
            for task in (supervisor, feeder, *background):
                task.cancel()
            await asyncio.gather(supervisor, feeder, *background, return_exceptions=True)

    # -------------------------------------------------------------- counting
    async def report(self) -> dict[str, Any]:
        records: dict[str, RunState | None] = {}
        ids = [r.id for r in self.plan if r.id in self.started]
        for chunk in range(0, len(ids), 200):
            part = ids[chunk : chunk + 200]
            got = await persist(functools.partial(self.get_runs, part), self.deadline, 60)
            records.update(zip(part, got, strict=True))
        outcome = measure.outcomes(self.plan, self.started, records)
        trail = await persist(
            functools.partial(measure.read_trail, self.js, self.namespace), self.deadline, 120
        )
        starts = measure.judge_starts(self.cluster.exec_log, trail)
        applied = measure.judge_applied(trail, records)
        letters = await persist(lambda: measure.read_dead_letters(self.js, self.namespace), self.deadline)
        listed = await asyncio.to_thread(
            cli_output, "dead-letters", "--nats", self.cluster.url, "--output", "json", "--limit", "10000"
        )
        expected_letters = len(POISON_EVENTS) + len(POISON_TASKS) + sum(r.kind == "poison" for r in self.plan)
        poison_run = [r.id for r in self.plan if r.kind == "poison"]
        crash_letters = [dl for dl in letters or [] if dl["subject"] == task_subject(self.namespace, FRAGILE)]
        warnings = measure.engine_warnings(self.cluster.workdir)
        return {
            "seed": self.config.seed,
            "runs": len(self.plan),
            "started": len(self.started),
            "not_started": len(self.plan) - len(self.started),
            "engines": self.config.engines,
            "agent_replicas": 2,
            "lost": len(outcome.lost),
            "stuck": len(outcome.stuck),
            "wrong_outputs": len(outcome.wrong),
            "abandoned_attempts_started": len(starts.abandoned),
            "applied_twice": len(applied.twice),
            "audit_missing": len(applied.missing),
            "dead_letters": None if letters is None else len(letters),
            "dead_letters_expected": expected_letters,
            "dead_letters_of_poison_run": len(crash_letters),
            "dead_letters_listed_by_cli": self.listed_by_cli(listed),
            "faults": {k: v for k, v in sorted(self.counts.items()) if "_faults" in k},
            "by_cli": {k: v for k, v in sorted(self.counts.items()) if k.endswith("_by_cli")},
            "unplanned_exits": {"engines": self.cluster.engine_exits, **self.cluster.agent_exits},
            "phases": dict(outcome.phases),
            "engine_warnings": dict(Counter(str(w.get("event")) for w in warnings)),
            "executions": starts.executions,
            "busy_runs": busy_report(self.plan, records),
            "attempts_started_twice": starts.repeated,
            "consumers": await persist(self.consumer_settings, self.deadline),
            "poison_run": {r: measure.summary(records.get(r)) for r in poison_run},
            "details": {
                "lost": outcome.lost[:20],
                "stuck": {r: measure.summary(records.get(r)) for r in outcome.stuck[:5]},
                "stuck_runs": outcome.stuck[:50],
                "wrong": outcome.wrong[:10],
                "wrong_records": {
                    w["run"]: measure.summary(records.get(w["run"])) for w in outcome.wrong[:3]
                },
                "engine_warnings": warnings[:20],
                "abandoned": starts.abandoned[:20],
                "applied_twice": applied.twice[:10],
                "audit_missing": applied.missing[:10],
                "dead_letters": (letters or [])[:20],
            },
            "workdir": str(self.cluster.workdir),
        }

    def listed_by_cli(self, listed: str | None) -> int | None:
        """Dead letters of this soak that `cadenza dead-letters --output json` lists."""
        try:
            records = json.loads(listed) if listed else None
        except ValueError:
            return None
        if not isinstance(records, list):
            return None
        mine = f"cadenza.task.{self.namespace}.", f"cadenza.event.{self.namespace}."
        return sum(1 for r in records if str(r.get("subject", "")).startswith(mine))

    async def consumer_settings(self) -> dict[str, Any]:
        engine = await self.js.consumer_info(EVENTS_STREAM, ENGINE_CONSUMER)
        agent = await self.js.consumer_info(TASKS_STREAM, consumer_name(self.namespace, WORKER))
        return {
            "engine": {"ack_wait": engine.config.ack_wait, "max_deliver": engine.config.max_deliver},
            "agent": {"ack_wait": agent.config.ack_wait, "max_deliver": agent.config.max_deliver},
        }


def busy_report(plan: list[PlannedRun], records: dict[str, RunState | None]) -> dict[str, Any]:
    """What the busy runs went through: attempts that timed out in the agent's queue or
    while running, and the time their attempts waited vs executed (from the records)."""
    errors: Counter[str] = Counter()
    waited = executed = 0.0
    for run in plan:
        state = records.get(run.id) if run.kind == "busy" else None
        for st in state.steps.values() if state is not None else ():
            errors.update(str((a.error or {}).get("type")) for a in st.attempts if a.error)
            if st.timing is not None:
                waited, executed = waited + st.timing.waiting, executed + st.timing.executing
    return {
        "runs": sum(r.kind == "busy" for r in plan),
        "attempt_errors": dict(errors),
        "waiting_seconds": round(waited, 1),
        "executing_seconds": round(executed, 1),
    }


def failures(report: dict[str, Any]) -> list[str]:
    """What the soak promises, broken: empty when every count is as it must be."""
    found = [
        f"{key}={report[key]}"
        for key in (
            "not_started",
            "lost",
            "stuck",
            "wrong_outputs",
            "abandoned_attempts_started",
            "applied_twice",
            "audit_missing",
        )
        if report[key]
    ]
    if report["dead_letters"] is None:
        found.append(
            f"no {measure.DEAD_LETTER_STREAM} stream "
            f"(expected {report['dead_letters_expected']} dead letters)"
        )
    elif report["dead_letters"] != report["dead_letters_expected"]:
        found.append(f"dead_letters={report['dead_letters']}, expected {report['dead_letters_expected']}")
    if report["dead_letters"] is not None and report["dead_letters_listed_by_cli"] != report["dead_letters"]:
        found.append(f"`cadenza dead-letters` listed {report['dead_letters_listed_by_cli']} of them")
    if report["dead_letters"] is not None and report["dead_letters_of_poison_run"] != 1:
        found.append(
            f"the poison run's task was dead-lettered {report['dead_letters_of_poison_run']} times, not once"
        )
    exits = report["unplanned_exits"]
    if exits.get("engines") or exits.get(WORKER):
        found.append(f"processes exited without being killed: {exits}")
    faults = report["faults"]
    for kind in ("engine", "agent", "nats"):
        done, busy = faults.get(f"{kind}_faults", 0), faults.get(f"{kind}_faults_with_runs_in_flight", 0)
        if not done or busy < done * 2 // 3:
            found.append(f"{kind} faults missed the runs ({busy} of {done} with runs in flight)")
    return found


async def run_soak(config: SoakConfig) -> dict[str, Any]:
    rng = random.Random(config.seed)
    plan = plan_runs(rng, config.runs)
    own_workdir = config.workdir is None
    workdir = config.workdir or Path(tempfile.mkdtemp(prefix="cadenza-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    namespace = f"soak{uuid.uuid4().hex[:6]}"
    cluster = Cluster(workdir, namespace, config.engines)
    deadline = time.monotonic() + config.seconds
    began = time.monotonic()
    nc: Any = None
    try:
        await asyncio.to_thread(cluster.start_server)
        nc = await nats.connect(
            cluster.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2, error_cb=_quiet
        )
        js = nc.jetstream()
        # The client's settings must not reset the engines' ack wait when it opens.
        engine_side = Engine(nc, EngineSettings(name="soak", ack_wait=ENGINE_ACK_WAIT))
        await engine_side.open()  # the infrastructure, as an engine makes it
        client = engine_side.client
        for agent in (WORKER, FRAGILE, BUSY):
            await ensure_agent_consumer(js, namespace, agent, 2.0)
        workflows = {
            name: compile_workflow(name, WorkflowSpec.model_validate(spec), namespace)
            for name, spec in WORKFLOWS.items()
        }
        for wf in workflows.values():
            await client.publish_definition(wf)
        cluster.start_agents()
        cluster.start_engines()
        soak = Soak(
            config,
            cluster,
            client,
            js,
            plan,
            plan_faults(rng, len(plan) / config.feed_rate, config.runs, config.engines),
            deadline,
            workflows,
        )
        await soak.drive()
        report = await soak.report()
        report["seconds"] = round(time.monotonic() - began, 1)
        report["failures"] = failures(report)
        (workdir / "report.json").write_text(json.dumps(report, indent=2, default=str))
        return report
    finally:
        await asyncio.to_thread(cluster.stop)
        if nc is not None:
            await nc.close()
        if own_workdir:
            shutil.rmtree(workdir, ignore_errors=True)


async def _quiet(exc: Exception) -> None:
    """nats-py prints every reconnection error with a traceback; the restarts are ours."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.durability.soak", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--seed", type=int, default=SoakConfig.seed)
    parser.add_argument("--engines", type=int, default=3)
    parser.add_argument("--rate", type=float, default=5.0, help="runs started per second")
    parser.add_argument("--workdir", type=Path, help="keep logs and the JetStream store here")
    args = parser.parse_args(argv)
    config = SoakConfig(args.runs, args.seconds, args.seed, args.engines, args.rate, args.workdir)
    report = asyncio.run(run_soak(config))
    print(json.dumps(report, indent=2, default=str))
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
