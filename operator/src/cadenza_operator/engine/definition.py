"""A Workflow compiled for the engine: expressions compiled, the graph checked and ordered.

Compiling is also validation: every problem found here is raised as a `DefinitionError`
naming the field path, so `cadenza validate`, the operator's Valid condition and the
engine all report the same message.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from ..expressions import Expr, ExpressionError, Template, compile_expr, compile_template
from ..models import MAX_PARALLEL, ApprovalSpec, BudgetSpec, OnExitStep, Step, WorkflowSpec, parse_duration

DEFAULT_FOREACH_WINDOW = MAX_PARALLEL
"""Items of a forEach in flight when maxParallel is unset: bounds the run record and memory."""

GRAPH_VARS = frozenset({"input", "steps", "run"})
"""What `when`, `forEach` and the workflow output see: no `item`/`index` (no item yet), no `event`."""
ITEM_VARS = GRAPH_VARS | {"item", "index"}


class DefinitionError(ValueError):
    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message


@dataclass(frozen=True)
class CompiledBudget:
    """A budget (the run's or a step's): limits on recorded model usage."""

    tokens: int | None
    cost: float | None
    fail: bool  # onExceeded: fail (else pause)


def _budget(spec: BudgetSpec | None, path: str) -> CompiledBudget | None:
    if spec is None:
        return None
    if spec.tokens is None and spec.cost is None:
        raise DefinitionError(path, "a budget needs tokens, cost or both")
    return CompiledBudget(tokens=spec.tokens, cost=spec.cost, fail=spec.onExceeded == "fail")


@dataclass(frozen=True)
class CompiledStep:
    name: str
    spec: Step | OnExitStep
    kind: str  # agent | workflow | approval | signal
    deps: tuple[str, ...]
    when: Expr | None
    for_each: Expr | None
    input: Template
    window: int
    timeout: float | None
    heartbeat: float | None
    queue_timeout: float | None
    retry_limit: int
    backoff_initial: float
    backoff_factor: float
    backoff_max: float
    backoff_jitter: float
    on_failure: str  # fail | continue | <fallback step>
    approval_timeout: float | None = None
    signal_timeout: float | None = None
    is_exit: bool = False
    non_retryable: tuple[str, ...] = ()  # exception types never retried (retry.nonRetryable)
    approval_message: Template | None = None  # approval.message, `${{ }}` over input and steps
    budget: CompiledBudget | None = None

    @property
    def agent(self) -> str | None:
        return getattr(self.spec, "agent", None)

    @property
    def workflow(self) -> str | None:
        return getattr(self.spec, "workflow", None)

    @property
    def approval(self) -> ApprovalSpec | None:
        """An approval step's settings (onExit is never one)."""
        return self.spec.approval if isinstance(self.spec, Step) else None

    @property
    def signal(self) -> str | None:
        """The signal a signal step waits for."""
        return self.spec.waitFor.signal if isinstance(self.spec, Step) and self.spec.waitFor else None

    @property
    def skipped_with_deps(self) -> bool:
        """Skipped when all its dependencies were (`ifDependenciesSkipped: skip`)."""
        return isinstance(self.spec, Step) and self.spec.ifDependenciesSkipped == "skip"


@dataclass
class CompiledWorkflow:
    name: str
    namespace: str
    spec: WorkflowSpec
    steps: dict[str, CompiledStep]
    order: tuple[str, ...]  # topological
    dependents: dict[str, tuple[str, ...]]
    fallbacks: frozenset[str]  # steps that run only as some step's onFailure
    output: Template
    deadline: float | None
    on_exit: CompiledStep | None
    budget: CompiledBudget | None = None
    digest: str = ""
    agents: frozenset[str] = field(default_factory=frozenset)
    signals: frozenset[str] = field(default_factory=frozenset)  # what waitFor steps wait for

    @property
    def key(self) -> str:
        """Definition key in the definitions bucket: immutable per content."""
        return f"{self.namespace}.{self.name}.{self.digest}"


def spec_digest(spec: WorkflowSpec) -> str:
    raw = json.dumps(spec.model_dump(mode="json", exclude_defaults=True), sort_keys=True).encode()
    return hashlib.sha256(raw).hexdigest()[:16]


def _seconds(value: str | None, path: str) -> float | None:
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise DefinitionError(path, str(exc)) from None


def _seconds_or(value: str | None, path: str, default: float) -> float:
    seconds = _seconds(value, path)
    return default if seconds is None else seconds  # "0s" is zero, not the default


def _compile_step(step: Step | OnExitStep, path: str, *, is_exit: bool = False) -> CompiledStep:
    try:
        when = (
            compile_expr(step.when, f"{path}.when", GRAPH_VARS)
            if isinstance(step, Step) and step.when
            else None
        )
        for_each = (
            compile_expr(step.forEach, f"{path}.forEach", GRAPH_VARS)
            if isinstance(step, Step) and step.forEach
            else None
        )
        template = compile_template(step.input, f"{path}.input", ITEM_VARS)
    except ExpressionError as exc:
        raise DefinitionError(exc.path, str(exc)) from None
    if for_each is None and template.variables & {"item", "index"}:
        raise DefinitionError(f"{path}.input", "uses `item`/`index` but the step has no forEach")
    retry = step.retry
    backoff = retry.backoff if retry else None
    if isinstance(step, Step):
        kind = step.kind
        declared = [k for k in ("agent", "workflow", "approval", "waitFor") if getattr(step, k) is not None]
        if len(declared) != 1:
            what = "none" if not declared else " and ".join(declared)
            raise DefinitionError(
                path, f"a step needs exactly one of agent, workflow, approval, waitFor (has {what})"
            )
        if step.forEach and kind not in ("agent", "workflow"):
            raise DefinitionError(f"{path}.forEach", f"forEach needs an agent or workflow step, not {kind}")
        unused = {
            "approval": ("timeout", "queueTimeout", "heartbeatTimeout", "retry"),  # approval.timeout decides
            "signal": ("timeout", "queueTimeout", "heartbeatTimeout", "retry"),  # waitFor.timeout decides
            "workflow": ("queueTimeout", "heartbeatTimeout"),  # a child run has no queue, no heartbeats
        }.get(kind, ())
        for name in unused:
            if getattr(step, name) is not None:
                raise DefinitionError(f"{path}.{name}", f"has no effect on {kind} steps")
        if step.maxParallel is not None and not step.forEach:
            raise DefinitionError(f"{path}.maxParallel", "maxParallel needs a forEach")
        window = step.maxParallel or DEFAULT_FOREACH_WINDOW
        deps = tuple(step.dependsOn)
        on_failure = step.onFailure
        heartbeat = _seconds(step.heartbeatTimeout, f"{path}.heartbeatTimeout")
        queue_timeout = _seconds(step.queueTimeout, f"{path}.queueTimeout")
        approval_timeout = (
            _seconds(step.approval.timeout, f"{path}.approval.timeout") if step.approval else None
        )
        approval_message = None
        if step.approval and "${{" in step.approval.message:
            try:
                approval_message = compile_template(
                    step.approval.message, f"{path}.approval.message", GRAPH_VARS
                )
            except ExpressionError as exc:
                raise DefinitionError(exc.path, str(exc)) from None
        signal_timeout = _seconds(step.waitFor.timeout, f"{path}.waitFor.timeout") if step.waitFor else None
    else:
        kind, window, deps, on_failure, heartbeat = "agent", 1, (), "fail", None
        queue_timeout = None
        approval_timeout = signal_timeout = None
        approval_message = None
    return CompiledStep(
        name=step.name,
        spec=step,
        kind=kind,
        deps=deps,
        when=when,
        for_each=for_each,
        input=template,
        window=window,
        timeout=_seconds(step.timeout, f"{path}.timeout"),
        heartbeat=heartbeat,
        queue_timeout=queue_timeout,
        retry_limit=retry.limit if retry else 0,
        backoff_initial=_seconds_or(
            backoff.initial if backoff else None, f"{path}.retry.backoff.initial", 1.0
        ),
        backoff_factor=backoff.factor if backoff else 2.0,
        backoff_max=_seconds_or(backoff.max if backoff else None, f"{path}.retry.backoff.max", 300.0),
        backoff_jitter=backoff.jitter if backoff else 0.2,
        on_failure=on_failure,
        approval_timeout=approval_timeout,
        signal_timeout=signal_timeout,
        is_exit=is_exit,
        non_retryable=tuple(retry.nonRetryable) if retry else (),
        approval_message=approval_message,
        budget=_budget(step.budget, f"{path}.budget") if isinstance(step, Step) else None,
    )


def compile_workflow(
    name: str,
    spec: WorkflowSpec,
    namespace: str = "default",
    known_agents: set[str] | None = None,
    known_workflows: set[str] | None = None,
) -> CompiledWorkflow:
    """Compile and check a workflow. `known_*`, when given, are checked for references."""
    steps: dict[str, CompiledStep] = {}
    index = {s.name: i for i, s in enumerate(spec.steps)}
    for i, step in enumerate(spec.steps):
        steps[step.name] = _compile_step(step, f"spec.steps[{i}]")

    fallbacks: set[str] = {s.onFailure for s in spec.steps} - {"fail", "continue"}
    for i, step in enumerate(spec.steps):
        path = f"spec.steps[{i}]"
        for j, dep in enumerate(step.dependsOn):
            if dep not in steps:
                raise DefinitionError(f"{path}.dependsOn[{j}]", f"unknown step {dep!r}")
            if dep == step.name:
                raise DefinitionError(f"{path}.dependsOn[{j}]", "a step cannot depend on itself")
            if dep in fallbacks:
                raise DefinitionError(
                    f"{path}.dependsOn[{j}]",
                    f"{dep!r} is a fallback step; depend on the step it stands in for instead",
                )
        if step.onFailure not in ("fail", "continue"):
            if step.onFailure not in steps:
                raise DefinitionError(
                    f"{path}.onFailure",
                    f"must be fail, continue or a step name; unknown step {step.onFailure!r}",
                )
            if step.onFailure == step.name:
                raise DefinitionError(f"{path}.onFailure", "a step cannot be its own fallback")
        if known_agents is not None and step.agent and step.agent not in known_agents:
            raise DefinitionError(f"{path}.agent", f"unknown agent {step.agent!r}")
        if known_workflows is not None and step.workflow and step.workflow not in known_workflows:
            raise DefinitionError(f"{path}.workflow", f"unknown workflow {step.workflow!r}")

    fallback_of = {s.name: s.onFailure for s in spec.steps if s.onFailure in fallbacks}
    _check_fallback_chains(fallback_of, index)
    order = _topological(spec, index, fallback_of)

    # Expressions may only read steps that surely finished first: their (transitive)
    # dependencies; a fallback step may also read the step it stands in for (its error).
    deps_of = {name: cs.deps for name, cs in steps.items()}
    stands_in_for: dict[str, set[str]] = {}
    for failed, fallback in fallback_of.items():
        stands_in_for.setdefault(fallback, set()).add(failed)
    for step_name in order:
        cs = steps[step_name]
        refs = set(cs.input.steps)
        for expr in (cs.when, cs.for_each):
            if expr is not None:
                refs |= expr.steps
        if cs.approval_message is not None:
            refs |= cs.approval_message.steps
        for ref in sorted(refs):
            path = f"spec.steps[{index[step_name]}]"
            if ref not in steps:
                raise DefinitionError(path, f"expression refers to unknown step {ref!r}")
            if (
                ref not in stands_in_for.get(step_name, ())
                and not _upstream(deps_of, step_name, ref)
                and not _recovers_upstream(fallback_of, deps_of, step_name, ref)
            ):
                raise DefinitionError(
                    path, f"expression reads steps.{ref} but {ref!r} is not among the step's dependencies"
                )

    try:
        output = compile_template(spec.output, "spec.output", GRAPH_VARS)
    except ExpressionError as exc:
        raise DefinitionError(exc.path, str(exc)) from None
    for ref in sorted(output.steps):
        if ref not in steps:
            raise DefinitionError("spec.output", f"expression refers to unknown step {ref!r}")

    on_exit = None
    if spec.onExit is not None:
        if spec.onExit.name in steps:
            raise DefinitionError("spec.onExit.name", f"{spec.onExit.name!r} is also the name of a step")
        on_exit = _compile_step(spec.onExit, "spec.onExit", is_exit=True)
        if known_agents is not None and spec.onExit.agent not in known_agents:
            raise DefinitionError("spec.onExit.agent", f"unknown agent {spec.onExit.agent!r}")
        for ref in sorted(on_exit.input.steps):
            if ref not in steps:
                raise DefinitionError("spec.onExit.input", f"expression refers to unknown step {ref!r}")

    for i, trigger in enumerate(spec.triggers):
        if (trigger.nats is None) == (trigger.schedule is None):
            raise DefinitionError(f"spec.triggers[{i}]", "a trigger needs exactly one of nats, schedule")
        if trigger.nats and trigger.nats.dedupKey:
            try:
                compile_expr(trigger.nats.dedupKey, f"spec.triggers[{i}].nats.dedupKey", frozenset({"event"}))
            except ExpressionError as exc:
                raise DefinitionError(exc.path, str(exc)) from None
        if trigger.nats and trigger.nats.input is not None:
            try:
                compile_template(trigger.nats.input, f"spec.triggers[{i}].nats.input", frozenset({"event"}))
            except ExpressionError as exc:
                raise DefinitionError(exc.path, str(exc)) from None
        if trigger.schedule:
            from croniter import croniter

            if not croniter.is_valid(trigger.schedule.cron):
                raise DefinitionError(
                    f"spec.triggers[{i}].schedule.cron", f"invalid cron {trigger.schedule.cron!r}"
                )
    if spec.inputSchema is not None:
        import jsonschema

        try:
            jsonschema.Draft202012Validator.check_schema(spec.inputSchema)
        except jsonschema.SchemaError as exc:
            raise DefinitionError("spec.inputSchema", f"not a valid JSON Schema: {exc.message}") from None

    dependents: dict[str, list[str]] = {n: [] for n in steps}
    for step_name, cs in steps.items():
        for dep in cs.deps:
            dependents[dep].append(step_name)
    agents = {cs.agent for cs in steps.values() if cs.agent}
    if on_exit is not None and on_exit.agent:
        agents.add(on_exit.agent)
    return CompiledWorkflow(
        name=name,
        namespace=namespace,
        spec=spec,
        steps=steps,
        order=order,
        dependents={k: tuple(v) for k, v in dependents.items()},
        fallbacks=frozenset(fallbacks),
        output=output,
        deadline=_seconds(spec.deadline, "spec.deadline"),
        on_exit=on_exit,
        budget=_budget(spec.budget, "spec.budget"),
        digest=spec_digest(spec),
        agents=frozenset(agents),
        signals=frozenset(s.waitFor.signal for s in spec.steps if s.waitFor is not None),
    )


def _recovers_upstream(
    fallback_of: dict[str, str], deps: dict[str, tuple[str, ...]], name: str, target: str
) -> bool:
    """Whether `target` is the fallback (or a fallback's fallback) of one of `name`'s
    dependencies: dependents of a recovered step wait for its fallback and may read it."""
    for failed in fallback_of:
        chain, nxt = [], fallback_of.get(failed)
        while nxt is not None and nxt not in chain:
            chain.append(nxt)
            nxt = fallback_of.get(nxt)
        if target in chain and _upstream(deps, name, failed):
            return True
    return False


def _upstream(deps: dict[str, tuple[str, ...]], name: str, target: str) -> bool:
    """Whether `target` is a (transitive) dependency of `name`."""
    if target in deps[name]:
        return True
    seen: set[str] = set()
    stack = list(deps[name])
    while stack:
        dep = stack.pop()
        if dep == target:
            return True
        if dep not in seen:
            seen.add(dep)
            stack.extend(deps[dep])
    return False


def _check_fallback_chains(fallback_of: dict[str, str], index: dict[str, int]) -> None:
    """A fallback step may fail over to another one, but the chain must end."""
    for start in fallback_of:
        chain = [start]
        while (nxt := fallback_of.get(chain[-1])) is not None:
            if nxt in chain:
                loop = [*chain[chain.index(nxt) :], nxt]
                raise DefinitionError(
                    f"spec.steps[{index[nxt]}].onFailure", f"fallback cycle: {' -> '.join(loop)}"
                )
            chain.append(nxt)


def _topological(spec: WorkflowSpec, index: dict[str, int], fallback_of: dict[str, str]) -> tuple[str, ...]:
    """Depth-first in declaration order, without recursion; a cycle is reported with its path.

    A step waits for its dependencies and, when one of them fails over to a fallback step,
    for that fallback (and the fallback's own fallbacks): these waits are edges too, so a
    fallback that waits for the very step it stands in for is a cycle, not a run that hangs.
    """
    edges: dict[str, list[tuple[str, str]]] = {}  # step -> [(waits for, as shown in a cycle)]
    for step in spec.steps:
        out: list[tuple[str, str]] = []
        for dep in step.dependsOn:
            out.append((dep, dep))
            fallback = fallback_of.get(dep)
            while fallback is not None:
                out.append((fallback, f"{fallback} ({dep}'s fallback)"))
                fallback = fallback_of.get(fallback)
        edges[step.name] = out
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    order: list[str] = []
    for root in spec.steps:
        if root.name in state:
            continue
        state[root.name] = 1
        stack = [(root.name, iter(edges[root.name]))]
        path, shown = [root.name], [root.name]
        while stack:
            name, pending = stack[-1]
            for dep, label in pending:
                if state.get(dep) == 2:
                    continue
                if state.get(dep) == 1:
                    cycle = [*shown[path.index(dep) :], label]
                    raise DefinitionError(
                        f"spec.steps[{index[dep]}].dependsOn", f"dependency cycle: {' -> '.join(cycle)}"
                    )
                state[dep] = 1
                stack.append((dep, iter(edges[dep])))
                path.append(dep)
                shown.append(label)
                break
            else:
                stack.pop()
                path.pop()
                shown.pop()
                state[name] = 2
                order.append(name)
    return tuple(order)


def definition_document(wf: CompiledWorkflow) -> dict[str, Any]:
    """What the definitions bucket stores: enough to recompile the workflow anywhere."""
    return {
        "name": wf.name,
        "namespace": wf.namespace,
        "spec": wf.spec.model_dump(mode="json", exclude_none=True),
    }
