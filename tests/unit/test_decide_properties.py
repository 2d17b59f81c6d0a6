"""Property-based tests of `decide` over random workflows and random agent behaviour.

A random DAG (dependencies, `when`, forEach, retry limits, timeouts, onFailure with
fallback steps, approvals, signals, sub-workflows, onExit, a deadline) runs against
agents that succeed, fail (retryable or fatal), time out or go silent, with events
delivered in a random order, duplicated, redelivered after they were applied, and
engine restarts (cached outputs forgotten) in between. After every decision:

* no step is dispatched before each of its dependencies is done (satisfied);
* no attempt number exceeds `retry.limit + 1`;
* a step's result is applied at most once (a step reaches a terminal phase once and
  keeps it; an item's output is stored once);
* replaying an already-applied event changes nothing (`changed` is False, same state);

and once every outcome is in, the run is in a terminal phase, with every step terminal
and no timer armed.

CI runs a fixed, derandomized set of examples (profile `cadenza-ci`); set
CADENZA_HYPOTHESIS=explore for many more random ones.
"""

from __future__ import annotations

import os
from typing import Any

from cadenza_operator.engine.decide import Decision, decide
from cadenza_operator.engine.definition import CompiledWorkflow
from cadenza_operator.engine.state import TERMINAL_STEP, RunState
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .helpers import Driver, Task, compile_spec

settings.register_profile(
    "cadenza-ci",
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "cadenza-explore", parent=settings.get_profile("cadenza-ci"), max_examples=3000, derandomize=False
)
PROFILE = settings.get_profile(f"cadenza-{os.environ.get('CADENZA_HYPOTHESIS', 'ci')}")

LARGE = "x" * 40_000  # over INLINE_OUTPUT_BYTES: kept apart from the record


# ------------------------------------------------------------------------ workflows


@st.composite
def workflows(draw: st.DrawFn) -> tuple[dict[str, Any], dict[str, Any]]:
    """A random workflow spec and a run input for it."""
    n = draw(st.integers(2, 8))
    names = [f"s{i}" for i in range(n)]
    fallbacks = [f"f{i}" for i in range(draw(st.integers(0, 2)))]
    items = draw(st.lists(st.integers(0, 9), max_size=5))
    flags = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    steps: list[dict[str, Any]] = []
    for i, name in enumerate(names):
        deps = draw(st.lists(st.sampled_from(names[:i]), unique=True, max_size=3)) if i else []
        kind = draw(st.sampled_from(["agent"] * 6 + ["workflow", "approval", "signal"]))
        step: dict[str, Any] = {"name": name, "dependsOn": deps}
        if kind == "approval":
            step["approval"] = {
                "timeout": draw(st.sampled_from([None, "30s"])),
                "onTimeout": draw(st.sampled_from(["approve", "reject"])),
                "approvers": draw(st.sampled_from([[], ["alice"]])),
            }
        elif kind == "signal":
            step["waitFor"] = {"signal": f"sig{i}", "timeout": draw(st.sampled_from([None, "20s"]))}
        else:
            if kind == "agent":
                step["agent"] = "worker"
                step["timeout"] = draw(st.sampled_from([None, None, "10s"]))
                step["heartbeatTimeout"] = draw(st.sampled_from([None, None, "5s"]))
            else:
                step["workflow"] = "child"
                step["timeout"] = draw(st.sampled_from([None, None, "10s"]))
            step["retry"] = {
                "limit": draw(st.integers(0, 3)),
                "backoff": {
                    "initial": "1s",
                    "factor": 2,
                    "max": "4s",
                    "jitter": draw(st.sampled_from([0, 0.5])),
                },
            }
            if draw(st.integers(0, 3)) == 0:
                step["forEach"] = "input.items"
                step["maxParallel"] = draw(st.integers(1, 3))
                step["input"] = {"item": "${{ item }}", "i": "${{ index }}"}
            elif deps:
                step["input"] = {"prev": f"${{{{ steps.{deps[0]}.output }}}}", "n": "${{ input.n }}"}
        when = draw(st.sampled_from(["none", "none", "none", "flag", "true", "false", "dep"]))
        if when == "flag":
            step["when"] = f"input.flags[{i}]"
        elif when in ("true", "false"):
            step["when"] = when
        elif when == "dep" and deps:
            step["when"] = f"steps.{deps[-1]}.phase != 'Failed'"
        step["ifDependenciesSkipped"] = draw(st.sampled_from(["skip", "skip", "run"]))
        step["onFailure"] = draw(st.sampled_from(["fail", "continue", *fallbacks, *fallbacks]))
        steps.append(step)
    for name in fallbacks:
        fallback: dict[str, Any] = {
            "name": name,
            "agent": "worker",
            "onFailure": draw(st.sampled_from(["fail", "continue"])),
            "retry": {"limit": draw(st.integers(0, 1)), "backoff": {"initial": "1s"}},
        }
        if draw(st.booleans()):
            fallback["when"] = draw(st.sampled_from(["false", "input.n > 4"]))
        steps.append(fallback)
    spec: dict[str, Any] = {"steps": steps, "output": {"s0": "${{ steps.s0.phase }}"}}
    if draw(st.booleans()):
        spec["onExit"] = {
            "agent": "notifier",
            "input": {"phase": "${{ run.phase }}"},
            "retry": {"limit": draw(st.integers(0, 2)), "backoff": {"initial": "1s"}},
        }
    spec["deadline"] = draw(st.sampled_from([None, None, None, "45s", "2m"]))
    return spec, {"items": items, "flags": flags, "n": n}


# ------------------------------------------------------------------------ the checks


def satisfied(state: RunState, wf: CompiledWorkflow, name: str) -> bool:
    """The oracle: done in a way that lets dependents run (independent of decide's code)."""
    st_ = state.steps[name]
    if st_.phase in ("Succeeded", "Skipped"):
        return True
    if st_.phase != "Failed":
        return False
    on_failure = wf.steps[name].on_failure
    if on_failure == "continue":
        return True
    if on_failure == "fail":
        return False
    return state.steps[on_failure].phase != "Skipped" and satisfied(state, wf, on_failure)


class CheckedDriver(Driver):
    """A Driver that checks the properties after every decision."""

    final_phase: dict[str, str]
    stored: set[str]

    def __post_init__(self) -> None:
        super().__post_init__()
        self.final_phase = {}
        self.stored = set()

    def send(self, event: dict[str, Any], at: float | None = None) -> Decision:
        was_terminal = self.state.terminal
        decision = super().send(event, at)
        self.check(decision, was_terminal)
        return decision

    def check(self, decision: Decision, was_terminal: bool) -> None:
        state, wf = decision.state, self.wf
        exit_name = wf.on_exit.name if wf.on_exit else None
        if was_terminal:
            assert not decision.changed, "a finished run changed"
        for cmd in (c.wire() for c in decision.commands):
            if cmd["op"] not in ("dispatch", "startChild"):
                continue
            p = cmd["body"] if cmd["op"] == "dispatch" else cmd["parent"]
            name, attempt = p["step"], p["attempt"]
            cs = wf.on_exit if name == exit_name else wf.steps[name]
            assert cs is not None
            assert 1 <= attempt <= cs.retry_limit + 1, (
                f"{name} attempt {attempt} > limit {cs.retry_limit} + 1"
            )
            if name == exit_name:
                assert all(state.steps[n].phase in TERMINAL_STEP for n in wf.order), "onExit before the end"
                continue
            for dep in cs.deps:
                assert satisfied(state, wf, dep), (
                    f"{name} dispatched before {dep} was done: {state.steps[dep]}"
                )
            if cs.deps and all(state.steps[d].phase == "Skipped" for d in cs.deps):
                assert cs.spec.ifDependenciesSkipped == "run", f"{name} ran though all its deps were skipped"  # type: ignore[union-attr]
            if name in wf.fallbacks:
                assert any(
                    state.steps[s].phase == "Failed" and c.on_failure == name for s, c in wf.steps.items()
                ), f"fallback {name} ran with no failure to stand in for"
        for name, st_ in state.steps.items():
            if st_.forEach is not None:
                assert len(st_.forEach.running) <= wf.steps[name].window, (
                    f"{name}: more items than maxParallel"
                )
            if name in self.final_phase:
                assert st_.phase == self.final_phase[name], (
                    f"{name} left {self.final_phase[name]} for {st_.phase}"
                )
            elif st_.phase in TERMINAL_STEP:
                self.final_phase[name] = st_.phase
        for rec in decision.audit:
            if rec["step"] and rec["from"] != rec["to"] and rec["to"] in TERMINAL_STEP:
                assert rec["from"] not in TERMINAL_STEP, f"{rec['step']} finished twice: {rec}"
        for key in decision.stores:
            assert key not in self.stored, f"output {key} stored twice"
            self.stored.add(key)
        if state.terminal:
            assert not state.timers, "a finished run has timers armed"
            assert all(st_.phase in TERMINAL_STEP for st_ in state.steps.values()), self.phases()
            assert set(state.steps) >= set(wf.order)


# ------------------------------------------------------------------------ the world


class World:
    """Agents, approvers, signal senders and the engine's infrastructure, driven by hypothesis."""

    def __init__(self, d: CheckedDriver, data: st.DataObject) -> None:
        self.d = d
        self.data = data
        self.silent: set[str] = set()  # tasks whose agent died: only a timer answers them
        self.heartbeats: dict[str, int] = {}
        self.started: set[str] = set()
        # How this run's agents behave, mostly: a mix keeps both long runs and failures common.
        self.mood = self.draw(st.sampled_from(["steady", "flaky", "hostile"]), "mood")

    def draw(self, strategy: st.SearchStrategy[Any], label: str) -> Any:
        return self.data.draw(strategy, label=label)

    def actions(self) -> list[tuple[str, Any]]:
        d = self.d
        acts: list[tuple[str, Any]] = [("task", t) for t in d.tasks.values() if t.msg_id not in self.silent]
        if d.state.timers:
            acts.append(("timer", None))
        for name, st_ in d.state.steps.items():
            if st_.phase == "WaitingApproval":
                acts.append(("approval", name))
        for cs in d.wf.steps.values():
            if cs.kind == "signal":
                signal = cs.spec.waitFor.signal  # type: ignore[union-attr]
                if signal not in d.state.signals:
                    acts.append(("signal", signal))
        return acts

    def play(self, max_events: int = 150) -> None:
        d = self.d
        for _ in range(max_events):
            acts = self.actions()
            if not acts or d.state.terminal:
                break
            extra = self.draw(
                st.sampled_from(["go", "go", "go", "replay", "restart", "cancel", "wait"]), "extra"
            )
            if extra == "replay" and d.applied:
                ev = self.draw(st.sampled_from(d.applied), "replayed event")
                snapshot = d.state.to_bytes()
                assert not d.replay(ev).changed, f"replaying {ev} changed the run"
                assert d.state.to_bytes() == snapshot
            elif extra == "restart":
                d.forget()
            elif extra == "cancel" and self.draw(st.integers(0, 19), "cancel?") == 0:
                d.send({"type": "cancel", "by": "ops"})
            elif extra == "wait":
                d.now += self.draw(st.sampled_from([0.5, 2.0, 7.0]), "wait")
            kind, what = self.draw(st.sampled_from(acts), "action")
            self.act(kind, what)
        self.drain()

    def act(self, kind: str, what: Any) -> None:
        d = self.d
        if kind == "timer":
            d.fire_next_timer()
        elif kind == "approval":
            by = self.draw(st.sampled_from(["alice", "mallory"]), "approver")
            approved = self.draw(st.booleans(), "approved")
            d.send({"type": "approval", "step": what, "approved": approved, "by": by, "comment": "c"})
        elif kind == "signal":
            d.send({"type": "signal", "name": what, "payload": {"from": "test"}})
        else:
            self.answer(what)

    def answer(self, task: Task) -> None:
        d = self.d
        cs = d.wf.on_exit if d.wf.on_exit and task.step == d.wf.on_exit.name else d.wf.steps[task.step]
        assert cs is not None
        timed = cs.timeout is not None or cs.heartbeat is not None
        choices = ["ok"] * 7 + ["retryable", "retryable", "fatal", "timeout", "started", "duplicate"]
        if self.mood == "flaky":
            choices += ["retryable", "timeout"] * 3
        elif self.mood == "hostile":
            choices += ["fatal"] * 5
        if cs.heartbeat is not None:
            choices.append("heartbeat")
        outcome = self.draw(st.sampled_from(choices), f"outcome of {task.msg_id}")
        base = {"step": task.step, "item": task.item, "attempt": task.attempt, "worker": "w1"}
        if outcome in ("ok", "duplicate"):
            output = self.draw(st.sampled_from([{"v": task.attempt}, None, LARGE]), "output")
            d.tasks.pop(task.msg_id)
            ev = {**base, "type": "result", "output": output}
            d.send(ev)
            if outcome == "duplicate":
                assert not d.send(ev).changed, "a duplicate result was applied"
        elif outcome in ("retryable", "fatal"):
            d.tasks.pop(task.msg_id)
            d.send(
                {
                    **base,
                    "type": "failed",
                    "error": {"type": outcome, "message": "x", "retryable": outcome == "retryable"},
                }
            )
        elif outcome == "timeout":
            if timed:
                # The agent started it (a timed step asks to be told), then hung or died:
                # the engine's timer decides. (One that dies before the start is no case:
                # JetStream hands the task to another agent.)
                self.start(task, base)
                self.silent.add(task.msg_id)
            else:
                d.tasks.pop(task.msg_id)
                d.send(
                    {
                        **base,
                        "type": "failed",
                        "error": {"type": "Timeout", "message": "t", "retryable": True, "timeout": True},
                    }
                )
        elif outcome == "started":
            self.start(task, base)
        elif outcome == "heartbeat":
            self.start(task, base)
            n = self.heartbeats[task.msg_id] = self.heartbeats.get(task.msg_id, 0) + 1
            if n > 3:  # an agent heartbeats for a while, then gets on with it
                self.silent.add(task.msg_id)
            d.now += 1
            d.send({**base, "type": "heartbeat"})

    def start(self, task: Task, base: dict[str, Any]) -> None:
        if task.msg_id not in self.started:
            self.started.add(task.msg_id)
            self.d.send({**base, "type": "started"})

    def drain(self) -> None:
        """Every outcome comes in: answer what is open with success, fire what is armed."""
        d = self.d
        for _ in range(10_000):
            if d.state.terminal:
                return
            open_tasks = [t for t in d.tasks.values() if t.msg_id not in self.silent]
            waiting = [n for n, s in d.state.steps.items() if s.phase == "WaitingApproval"]
            if open_tasks:
                t = open_tasks[0]
                d.tasks.pop(t.msg_id)
                d.send({"type": "result", "step": t.step, "item": t.item, "attempt": t.attempt, "output": 1})
            elif waiting:
                d.send({"type": "approval", "step": waiting[0], "approved": True, "by": "alice"})
            elif d.state.timers:
                d.fire_next_timer()
            else:
                pending = [a for a in self.actions() if a[0] == "signal"]
                if not pending:
                    return
                d.send({"type": "signal", "name": pending[0][1]})
        raise AssertionError("the run did not settle")


# ------------------------------------------------------------------------ the properties


def handled(state: RunState, wf: CompiledWorkflow, name: str) -> bool:
    st_ = state.steps[name]
    return st_.phase != "Failed" or satisfied(state, wf, name)


@PROFILE
@given(workflows(), st.data())
def test_random_runs_keep_every_invariant_and_end_in_a_terminal_phase(
    case: tuple[dict[str, Any], dict[str, Any]], data: st.DataObject
) -> None:
    spec, run_input = case
    d = CheckedDriver(compile_spec(spec), input=run_input)
    d.start()
    World(d, data).play()
    state, wf = d.state, d.wf
    assert state.terminal, (
        f"run still {state.phase} with every outcome in: {d.phases()} timers={state.timers}"
    )
    graph = list(wf.order)
    if state.phase == "Succeeded":
        assert all(state.steps[n].phase != "Cancelled" for n in graph), d.phases()
        assert all(handled(state, wf, n) for n in graph), d.phases()
    elif state.phase == "Cancelled":
        assert state.cancelledBy == "ops"
    else:
        assert state.message
        assert state.failing == "deadline" or any(not handled(state, wf, n) for n in graph), d.phases()
    if wf.on_exit is not None:
        assert state.steps[wf.on_exit.name].phase in TERMINAL_STEP


@settings(PROFILE, max_examples=max(1, PROFILE.max_examples * 2 // 5))
@given(workflows(), st.data())
def test_replaying_an_applied_event_at_any_later_point_changes_nothing(
    case: tuple[dict[str, Any], dict[str, Any]], data: st.DataObject
) -> None:
    spec, run_input = case
    original = CheckedDriver(compile_spec(spec), input=run_input)
    original.start()
    World(original, data).play()
    # The same events again, in the same order; after each, earlier ones come back.
    again = Driver(original.wf, input=run_input)
    for i, ev in enumerate(original.applied):
        again.replay(ev)
        snapshot = again.state.to_bytes()
        earlier = original.applied[: i + 1]
        for old in [earlier[-1], *earlier[:: max(1, len(earlier) // 4)]]:
            dec = decide(RunState.from_bytes(snapshot), old, again.wf, again.store)
            assert not dec.changed, f"after {ev}, replaying {old} changed the run"
            assert dec.state.to_bytes() == snapshot
    assert again.state.to_bytes() == original.state.to_bytes()
