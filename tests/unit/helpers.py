"""A small in-memory driver around the pure `decide`, for the control-layer unit tests.

It plays the part of the runtime and of the agents, with no NATS and no clock:

* the run record starts from a `start` event, as the runtime's `_initial` builds it, and
  goes through `to_bytes`/`from_bytes` after every decision (what the KV round trip does);
* events carry the fake clock's time in `at`; timers fire in time order (`fire_next_timer`),
  moving the clock to their due time;
* `dispatch` commands become outstanding tasks that a test (or a behaviour function)
  answers with `started`, `heartbeat`, `result` or `failed` events;
* `decision.stores` go to a dict store, and `MissingOutputs` is answered from it, the
  way the runtime loads outputs kept apart from the record.

Every decision is checked on the way: audit `seq` numbers continue without gaps, a
decision that reports no change really changed nothing, and the serialized record's size
is tracked (`max_size`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cadenza_operator.engine.decide import Decision, MissingOutputs, decide
from cadenza_operator.engine.definition import CompiledWorkflow, compile_workflow
from cadenza_operator.engine.state import RunState, StepState, Timer
from cadenza_operator.models import WorkflowSpec

T0 = 1_000.0


def compile_spec(spec: dict[str, Any], name: str = "wf", **kwargs: Any) -> CompiledWorkflow:
    """A workflow spec (as a dict, like YAML gives) compiled for the engine."""
    return compile_workflow(name, WorkflowSpec.model_validate(spec), **kwargs)


def agent_step(name: str, **fields: Any) -> dict[str, Any]:
    return {"name": name, "agent": fields.pop("agent", "worker"), **fields}


@dataclass
class Task:
    """A dispatched task an agent has not answered yet."""

    step: str
    item: int | None
    attempt: int
    body: dict[str, Any]
    msg_id: str
    agent: str


@dataclass
class Driver:
    wf: CompiledWorkflow
    input: Any = None
    run: str = "r1"
    parent: dict[str, Any] | None = None
    now: float = T0
    parse_every: int = 1  # decide on a fresh parse of the record every N events (1: always)
    trace: bool = False  # decide as an engine with traces on (Decision.item_attempts)

    state: RunState = field(init=False)
    store: dict[str, Any] = field(default_factory=dict)  # the outputs bucket
    loaded: dict[str, Any] = field(default_factory=dict)  # what the engine has loaded of it
    memo: dict[str, Any] = field(default_factory=dict)
    tasks: dict[str, Task] = field(default_factory=dict)  # outstanding, by Nats-Msg-Id
    dispatched: list[Task] = field(default_factory=list)  # every dispatch command, in order
    sent: set[str] = field(default_factory=set)  # every task id dispatched
    commands: list[dict[str, Any]] = field(default_factory=list)
    audit: list[dict[str, Any]] = field(default_factory=list)
    applied: list[dict[str, Any]] = field(default_factory=list)  # events that changed something
    max_size: int = 0
    events: int = 0

    def __post_init__(self) -> None:
        self.state = RunState(
            run=self.run,
            namespace="default",
            workflow=self.wf.name,
            definition=self.wf.key,
            input=self.input,
            createdAt=self.now,
            parent=self.parent,
            scope=self.run,
        )

    # ---------------------------------------------------------------- events
    def send(self, event: dict[str, Any], at: float | None = None) -> Decision:
        """Apply one event at the current time (or `at`); returns the decision."""
        ev = {"run": self.run, **event, "at": self.now if at is None else at}
        before = self.state.to_bytes()
        self.events += 1
        decision = self._decide(ev, before, fresh=self.events % self.parse_every == 0)
        if not decision.changed:
            assert decision.state.to_bytes() == before, f"unchanged decision changed the state: {ev}"
            assert not decision.commands and not decision.audit and not decision.stores, ev
        seq = self.audit[-1]["seq"] if self.audit else 0
        for rec in decision.audit:
            assert rec["seq"] == seq + 1, f"audit seq {rec['seq']} after {seq}"
            assert rec["run"] == self.run
            seq += 1
        assert decision.state.auditSeq == seq
        self.audit += decision.audit
        commands = [c.wire() for c in decision.commands]  # as the run record's outbox keeps them
        self.commands += commands
        self.store.update(decision.stores)  # stored before the state write, as the runtime does
        self.loaded.update(decision.stores)
        for cmd in commands:
            task = None
            if cmd["op"] == "dispatch":
                body = cmd["body"]
                task = Task(body["step"], body["item"], body["attempt"], body, cmd["msgId"], cmd["agent"])
            elif cmd["op"] == "startChild":  # a child run answers like an agent: result or failed
                p = cmd["parent"]
                body = {**p, "input": cmd["input"]}
                task = Task(
                    p["step"], p["item"], p["attempt"], body, cmd["run"], f"workflow:{cmd['workflow']}"
                )
            if task is not None:
                assert task.msg_id not in self.sent, f"task {task.msg_id} dispatched twice"
                self.sent.add(task.msg_id)
                self.tasks[task.msg_id] = task
                self.dispatched.append(task)
        data = decision.state.to_bytes()
        self.max_size = max(self.max_size, len(data))
        self.state = decision.state
        if decision.changed:
            self.applied.append(ev)
        return decision

    def _decide(self, ev: dict[str, Any], data: bytes, fresh: bool) -> Decision:
        # Like the runtime, decide on a record parsed from its bytes (copy=False): what the
        # KV round trip loses is then lost here too. (decide's own deep copy is far slower.)
        state = RunState.from_bytes(data) if fresh else self.state
        for _ in range(5):
            try:
                return decide(state, ev, self.wf, self.loaded, memo=self.memo, copy=False, trace=self.trace)
            except MissingOutputs as missing:
                state = RunState.from_bytes(data)  # the failed call may have changed it
                for key in missing.keys:
                    if key.endswith(".*"):
                        prefix = key[:-1]
                        found = {k: v for k, v in self.store.items() if k.startswith(prefix)}
                        assert found or self.state.steps, f"outputs {key} were never stored"
                        self.loaded.update(found)
                    else:
                        assert key in self.store, f"output {key} was never stored"
                        self.loaded[key] = self.store[key]
        raise AssertionError(f"outputs still missing after loading them: {ev}")

    def forget(self) -> None:
        """An engine restart: no cached outputs, no memo."""
        self.loaded = {}
        self.memo = {}

    def start(self) -> Decision:
        return self.send({"type": "start"})

    def replay(self, ev: dict[str, Any]) -> Decision:
        """Deliver an already-applied event again, as JetStream redelivers it."""
        return self.send({k: v for k, v in ev.items() if k != "at"}, at=ev["at"])

    # ----------------------------------------------------------------- agents
    def open_tasks(self, step: str | None = None) -> list[Task]:
        return [t for t in self.tasks.values() if step is None or t.step == step]

    def task(self, step: str, item: int | None = None) -> Task:
        found = [t for t in self.tasks.values() if t.step == step and t.item == item]
        assert found, f"no open task for {step}[{item}]; open: {sorted(self.tasks)}"
        return found[-1]

    def _answer(self, task: Task, event: dict[str, Any]) -> Decision:
        self.tasks.pop(task.msg_id, None)
        ev = {"step": task.step, "item": task.item, "attempt": task.attempt, "worker": "w1", **event}
        return self.send(ev)

    def started(self, step: str, item: int | None = None) -> Decision:
        t = self.task(step, item)
        return self.send(
            {"type": "started", "step": step, "item": item, "attempt": t.attempt, "worker": "w1"}
        )

    def heartbeat(self, step: str, item: int | None = None) -> Decision:
        t = self.task(step, item)
        return self.send({"type": "heartbeat", "step": step, "item": item, "attempt": t.attempt})

    def succeed(self, step: str, output: Any = None, item: int | None = None) -> Decision:
        return self._answer(self.task(step, item), {"type": "result", "output": output})

    def fail(
        self,
        step: str,
        *,
        retryable: bool = False,
        item: int | None = None,
        kind: str | None = None,
        message: str = "boom",
        timeout: bool = False,
    ) -> Decision:
        error: dict[str, Any] = {
            "type": kind or ("RetryableError" if retryable else "FatalError"),
            "message": message,
            "retryable": retryable,
        }
        if timeout:
            error["timeout"] = True
        return self._answer(self.task(step, item), {"type": "failed", "error": error})

    def lose(self, step: str, item: int | None = None) -> None:
        """The agent died with the task: nobody will answer it."""
        self.tasks.pop(self.task(step, item).msg_id)

    # ----------------------------------------------------------------- timers
    def next_timer(self) -> tuple[str, Timer] | None:
        if not self.state.timers:
            return None
        return min(self.state.timers.items(), key=lambda kv: (kv[1].at, kv[0]))

    def fire(self, timer_id: str, **fields: Any) -> Decision:
        """Fire an armed timer; `fields` are what the runtime adds (a queue timer's claim)."""
        timer = self.state.timers[timer_id]
        self.now = max(self.now, timer.at)
        return self.send({"type": "timer", "timer": timer_id, "due": timer.at, **fields})

    def fire_next_timer(self) -> Decision | None:
        nxt = self.next_timer()
        return None if nxt is None else self.fire(nxt[0])

    def advance(self, seconds: float) -> None:
        """Let time pass, firing every timer due by then."""
        until = self.now + seconds
        while (nxt := self.next_timer()) is not None and nxt[1].at <= until:
            self.fire(nxt[0])
        self.now = until

    # ---------------------------------------------------------------- helpers
    def run_agents(self, behave: Callable[[Task], Any] | None = None, max_events: int = 100_000) -> None:
        """Answer every task (with `behave(task)`: an output, or a dict {'fail': ...}) and fire
        timers until nothing is outstanding."""
        behave = behave or (lambda t: None)
        for _ in range(max_events):
            if self.state.terminal:
                return
            if self.tasks:
                task = next(iter(self.tasks.values()))
                out = behave(task)
                if isinstance(out, Failure):
                    self._answer(task, {"type": "failed", "error": out.error()})
                else:
                    self._answer(task, {"type": "result", "output": out})
            elif self.fire_next_timer() is None:
                return
        raise AssertionError("the run did not settle")

    @property
    def phase(self) -> str:
        return self.state.phase

    def step(self, name: str) -> StepState:
        return self.state.steps[name]

    def phases(self) -> dict[str, str]:
        return {n: s.phase for n, s in self.state.steps.items()}

    def ops(self, op: str) -> list[dict[str, Any]]:
        return [c for c in self.commands if c["op"] == op]

    def size(self) -> int:
        return len(self.state.to_bytes())


@dataclass
class Failure:
    retryable: bool = False
    kind: str | None = None
    timeout: bool = False

    def error(self) -> dict[str, Any]:
        err: dict[str, Any] = {
            "type": self.kind or ("RetryableError" if self.retryable else "FatalError"),
            "message": "boom",
            "retryable": self.retryable,
        }
        if self.timeout:
            err["timeout"] = True
        return err


def dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)
