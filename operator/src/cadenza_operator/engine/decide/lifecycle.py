"""The run's end: winding down (a failure, the deadline, a cancel), onExit, the finish.

* A step whose dependency failed for good never runs: the run fails fast, running steps
  are cancelled, pending ones skipped; `onExit` then runs; the run ends Failed.
* onExit runs once the graph is done, whatever its outcome, and sees `run.phase`; its own
  failure is recorded on its step and does not change the run's phase.
* Cancellation stops the graph like a failure and ends the run Cancelled.
* A sub-workflow run tells its parent how it ended (a result or a failure event).
"""

from __future__ import annotations

from cadenza.protocol import RunPhase, StepPhase, TaskFailure
from cadenza.wire import event_subject

from ...expressions import ExpressionError
from ..commands import Publish
from . import attempts, foreach, graph
from .context import Decider, ValueTooLarge


def wind_down(d: Decider, why: str, message: str) -> None:
    """Stop the graph: cancel what runs, skip what waits; onExit and the end follow."""
    if d.s.failing:
        return
    if d.s.phase == RunPhase.PAUSED:  # the deadline or a cancel: what the pause held never runs
        d.s.phase = RunPhase.RUNNING
        d.s.held = []
        d.audit(None, RunPhase.PAUSED, RunPhase.RUNNING, f"pause ended: {message}")
    d.s.failing = why
    d.s.message = message
    d.audit(None, RunPhase.RUNNING, RunPhase.RUNNING, f"winding down: {message}")
    any_running = False
    for name, st in d.s.steps.items():
        if d.wf.on_exit is not None and name == d.wf.on_exit.name:
            continue
        if st.phase in (StepPhase.RUNNING, StepPhase.WAITING_APPROVAL):
            any_running = True
            if st.forEach is not None:
                foreach.cancel_items(d, name, message)
            for tid in [t for t, tm in d.s.timers.items() if tm.step == name]:
                d.disarm(tid)
            if st.child and st.forEach is None:
                d.cancel_child(st.child, message)
            st.message = message  # not the approval prompt or the wait it was in
            # The audit names the attempt cancelled while it ran: none may start after this.
            running = st.attempt if st.forEach is None and st.running else None
            d.set_phase(
                name, StepPhase.CANCELLED, message, attempt=running, outcome="Cancelled" if running else None
            )
    if any_running:
        d.cancel_tasks()
    d.disarm("deadline")
    maybe_finish(d)


def maybe_finish(d: Decider) -> None:
    """Once nothing runs or can start: settle the run's phase and output, skip what never
    ran, start onExit; finish when onExit (if any) is done."""
    if d.s.phase != RunPhase.RUNNING or graph.active(d):
        return
    exit_def = d.wf.on_exit
    if d.s.exitPhase is None:
        phase = {"cancelled": RunPhase.CANCELLED, "failed": RunPhase.FAILED, "deadline": RunPhase.FAILED}.get(
            d.s.failing or ""
        )
        if phase is None:
            phase = RunPhase.SUCCEEDED
            try:
                outputs = d.wf.output.render(d.resolve_lazy(d.env(), d.wf.output.steps))
                d.s.outputs, d.s.outputsRef = d.stored_apart(
                    f"{d.s.run}._output", outputs, d.sized("the output", outputs)
                )
            except ValueTooLarge as exc:
                phase = RunPhase.FAILED
                d.s.message = str(exc)
            except ExpressionError as exc:
                phase = RunPhase.FAILED
                d.s.message = f"output: {exc}"
        d.s.exitPhase = phase
        for name in d.wf.order:
            st = d.st(name)
            if st.phase == StepPhase.PENDING:
                why = (
                    "not needed: no step failed over to it"
                    if name in d.wf.fallbacks
                    else "not run: the run stopped before it"
                )
                d.set_phase(name, StepPhase.SKIPPED, why)
        if exit_def is not None:
            d.st(exit_def.name).phase = StepPhase.RUNNING
            d.st(exit_def.name).startedAt = d.now
            d.audit(exit_def.name, StepPhase.PENDING, StepPhase.RUNNING, f"onExit (run {phase})")
            attempts.dispatch(d, exit_def.name, None)
            if d.st(exit_def.name).phase == StepPhase.RUNNING:
                return
    if exit_def is not None and not d.st(exit_def.name).phase.is_terminal:
        return
    finish(d, d.s.exitPhase or RunPhase.SUCCEEDED)


def finish(d: Decider, phase: RunPhase) -> None:
    old = d.s.phase
    d.s.phase = phase
    d.s.finishedAt = d.now
    d.s.timers.clear()
    if phase == RunPhase.SUCCEEDED:
        d.s.message = ""
    d.audit(None, old, phase, d.s.message or "all steps finished")
    parent = d.s.parent
    if parent:
        base = {
            "run": parent["run"],
            "step": parent["step"],
            "item": parent.get("item"),
            "attempt": parent["attempt"],
            "worker": f"run:{d.s.run}",
        }
        if phase == RunPhase.SUCCEEDED:
            body = {"type": "result", **base, "output": d.run_output()}
        else:
            body = {
                "type": "failed",
                **base,
                "error": TaskFailure(
                    type=f"Child{phase}",
                    message=f"sub-workflow {d.s.workflow} {phase.lower()}: {d.s.message}",
                    retryable=False,
                    child=d.s.run,
                ).wire(),
            }
        d.command(
            Publish(
                subject=event_subject(parent.get("namespace", d.s.namespace), parent["run"]),
                msg_id=f"child:{d.s.run}",
                body=body,
            )
        )
