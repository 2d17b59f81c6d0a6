"""Result provenance: whose word an attempt's event is.

Anyone who can publish on the events stream can write any body, so the body's `step`,
`attempt` and `worker` prove nothing. The subject can: an agent publishes the events of
its attempts (started, heartbeat, result, failed, context, usage) on
`cadenza.event.<ns>.<run>.agent.<agent>` (`cadenza.wire.agent_event_subject`), and an
agent's NATS credential may publish only on `cadenza.event.<ns>.*.agent.<agent>`
(operator/src/cadenza_operator/security). The engine accepts an attempt's event only when
that agent is the one its step names (`spec.agent`, a forEach item's too); anything
else is rejected before `decide` (`Engine._process`: acked, counted in
`cadenza_forged_events_total`, audited on the run, the run otherwise unaffected).

An event on the run's own subject (`cadenza.event.<ns>.<run>`) names no agent: the
engine's own (timers, a child run's outcome, a failed child start, `cadenza run`
failing the attempts of an agent that cannot start), a client's (start, cancel, signal,
approval, resume), or an agent's from before per-agent subjects. With provenance
required (`EngineSettings.require_provenance`, on when the engine connects with
credentials) an attempt event there is accepted only for a step that has no agent (a
sub-workflow step, whose child run reports on that subject); without it, an old agent's
events are accepted as before, and so is anyone's who can publish on that subject: an
open bus has no identities to check. An agent subject carries attempt events only: a
start, cancel, signal, approval or resume sent there is rejected too.
"""

from __future__ import annotations

from typing import Any

from cadenza.protocol import AttemptEvent, Event
from cadenza.wire import event_source

from .definition import CompiledWorkflow


def step_agent(wf: CompiledWorkflow, step: Any) -> str | None:
    """The agent the step `step` dispatches its attempts to; None for a step that has none
    (a sub-workflow, an approval, a wait) or that the workflow does not have."""
    compiled = wf.steps.get(step) if isinstance(step, str) else None
    if compiled is None and wf.on_exit is not None and wf.on_exit.name == step:
        compiled = wf.on_exit
    return compiled.agent if compiled is not None and compiled.kind == "agent" else None


def forged(subject: str, event: Event, namespace: str, wf: CompiledWorkflow, required: bool) -> str | None:
    """Why the event that came on `subject` for a run of `namespace` may not be applied
    (naming the agent it claims and the one its step names), or None when it may."""
    source = event_source(subject)
    if source is None:  # not an events subject at all: the stream takes cadenza.event.> only
        return f"came on {subject!r}, not an event subject"
    ns, run, sender = source
    if sender is None:
        if not required or not isinstance(event, AttemptEvent):
            return None
        expected = step_agent(wf, event.step)
        if expected is None:
            return None  # a sub-workflow step: its child run reports on the run's subject
        return (
            f"sent on the run's own subject, naming no agent; step {event.step!r} runs on agent {expected!r}"
        )
    if ns != namespace or run != event.run:
        return f"sent as agent {sender!r} on the subject of run {ns}/{run}, not of {namespace}/{event.run}"
    if not isinstance(event, AttemptEvent):
        return f"a {event.type} event sent as agent {sender!r}: agents send attempt events only"
    expected = step_agent(wf, event.step)
    if sender != expected:
        return f"sent as agent {sender!r}; step {event.step!r} runs on agent {expected!r}"
    return None
