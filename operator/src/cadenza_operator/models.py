"""The resource schema: Agent, Workflow and WorkflowRun as pydantic models.

These models are the single source of truth for the CRDs (`cadenza crds` generates
`crds/` from them), for `cadenza validate`, for the operator (a spec is parsed here at
the edge) and for the engine. Every field carries a description because it becomes the
text of `kubectl explain`.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

API_GROUP = "cadenza.dev"
API_VERSION = "v1alpha1"
GROUP_VERSION = f"{API_GROUP}/{API_VERSION}"

STEP_NAME_PATTERN = r"^[a-z][a-zA-Z0-9_]*$"
DURATION_PATTERN = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h|d))+$"
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}

MAX_DURATION_DAYS = 3650
"""The longest duration accepted. Every deadline and timer is `now + duration`, shown as a
date in status and arithmetic on in the engine; unbounded, '9999999999999999999999d' (or
400 digits: infinity) made times no datetime can hold."""

CEL_RESERVED = frozenset(
    {"false", "in", "null", "true"}  # CEL's literals and operator
    | {"as", "break", "const", "continue", "else", "for", "function", "if", "import", "let"}
    | {"loop", "package", "namespace", "return", "var", "void", "while"}  # reserved by the spec
)
"""Words CEL does not accept as a name: a step called `in` could never be read as `steps.in`."""

OWN_SUBJECT_TOKENS = frozenset({"cadenza", "*", ">"})
"""First tokens a trigger subject may not have: Cadenza's tasks, events and dead letters
live under `cadenza.>`, and a subject starting with a wildcard could match them too."""


def parse_duration(text: str) -> float:
    """Seconds in a duration string ('1h30m' -> 5400.0). Raises ValueError when malformed
    or longer than MAX_DURATION_DAYS."""
    if not re.fullmatch(DURATION_PATTERN, text):
        raise ValueError(f"invalid duration {text!r} (use e.g. 500ms, 30s, 5m, 1h)")
    seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in _DURATION_PART.findall(text))
    if not seconds <= MAX_DURATION_DAYS * 86400:
        raise ValueError(f"duration {text!r} is longer than the {MAX_DURATION_DAYS}d allowed")
    return seconds


def _bounded_duration(text: str) -> str:
    parse_duration(text)
    return text


Duration = Annotated[
    str,
    Field(
        pattern=DURATION_PATTERN,
        max_length=32,
        description=f"A duration such as 500ms, 30s, 5m, 1h or 1h30m, at most {MAX_DURATION_DAYS}d.",
        examples=["30s"],
    ),
    AfterValidator(_bounded_duration),
]


MAX_PARALLEL = 1000
"""The largest forEach window (maxParallel); also the default one."""
MAX_VALUE_DEPTH = 100
"""How deeply a JSON value (a run input, a step input, an output mapping) may nest. The
engine parses every event and run record with pydantic-core, which refuses JSON nested
past 200 levels, and a value sits a few levels down inside them; Python's json module and
PyYAML recurse and raise RecursionError near 1,000."""


def nesting_error(value: Any, limit: int = MAX_VALUE_DEPTH) -> str | None:
    """Why `value` nests too deeply (naming where), or None. Iterative, so that a value
    nested 100,000 deep is measured without recursing."""
    stack: list[tuple[Any, int, tuple[Any, ...] | None]] = [(value, 0, None)]
    while stack:
        node, depth, trail = stack.pop()
        if depth > limit:
            keys: list[Any] = []
            while trail is not None:
                key, trail = trail
                keys.append(key)
            shown = "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in reversed(keys[-6:]))
            return f"nested deeper than {limit} levels (at {shown}...)"
        if isinstance(node, dict):
            stack.extend((v, depth + 1, (k, trail)) for k, v in node.items())
        elif isinstance(node, list):
            stack.extend((v, depth + 1, (i, trail)) for i, v in enumerate(node))
    return None


def _shallow(value: Any) -> Any:
    error = nesting_error(value)
    if error is not None:
        raise ValueError(error)
    return value


JsonValue = Annotated[Any, AfterValidator(_shallow)]
"""Free-form JSON in a manifest, nested at most MAX_VALUE_DEPTH levels."""


def _step_name(name: str) -> str:
    if name in CEL_RESERVED:
        raise ValueError(f"{name!r} is a reserved word in CEL: expressions could not read steps.{name}")
    return name


def _trigger_subject(subject: str) -> str:
    tokens = subject.split(".")
    if any(not t or any(c in t for c in " \t\r\n") for t in tokens):
        raise ValueError(f"{subject!r} is not a NATS subject (dot-separated tokens, no spaces)")
    if any((">" in t or "*" in t) and len(t) > 1 for t in tokens) or ">" in tokens[:-1]:
        raise ValueError(f"{subject!r}: wildcards are whole tokens, and '>' only the last one")
    if tokens[0] in OWN_SUBJECT_TOKENS:
        raise ValueError(
            f"{subject!r} would overlap Cadenza's own subjects (cadenza.>): start it with another token"
        )
    if tokens[0].startswith("$") or tokens[0] == "_INBOX":
        raise ValueError(f"{subject!r} is a NATS system subject ($... or _INBOX.>)")
    return subject


class _Model(BaseModel):
    # Unknown fields are errors: a typo in a manifest must be reported, not ignored.
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


# --------------------------------------------------------------------------- Agent


class AutoscalingSpec(_Model):
    """Scale the agent's Deployment on the depth of its task queue (no KEDA needed)."""

    minReplicas: int = Field(1, ge=0, description="Fewest replicas; 0 lets an idle agent scale to zero.")
    maxReplicas: int = Field(10, ge=1, description="Most replicas the operator will run.")
    targetPendingPerReplica: int = Field(
        10,
        ge=1,
        description="Pending tasks one replica is expected to absorb; replicas = ceil(pending / this).",
    )


class MetricsSpec(_Model):
    """Expose the agent's Prometheus metrics through a Service."""

    enabled: bool = Field(False, description="Create a metrics Service selecting the agent's pods.")
    port: int = Field(9100, ge=1, le=65535, description="Container port serving /metrics.")


class SecretKeyRef(_Model):
    """One key of a Kubernetes Secret. In a cluster it becomes a reference (the operator
    never reads the value); locally `cadenza run`/`dev` read it from the variable
    CADENZA_SECRET_<NAME>_<KEY> (upper-cased, '-' and '.' as '_') or from --env-file."""

    name: str = Field(min_length=1, description="Name of the Secret, in the resource's namespace.")
    key: str = Field(min_length=1, description="Key in the Secret.")


class ConfigMapKeyRef(_Model):
    """One key of a ConfigMap; locally read from CADENZA_CONFIGMAP_<NAME>_<KEY>."""

    name: str = Field(min_length=1, description="Name of the ConfigMap, in the resource's namespace.")
    key: str = Field(min_length=1, description="Key in the ConfigMap.")


class EnvVarSource(_Model):
    """Where a variable's value comes from instead of a literal: exactly one reference."""

    secretKeyRef: SecretKeyRef | None = Field(None, description="A key of a Secret.")
    configMapKeyRef: ConfigMapKeyRef | None = Field(None, description="A key of a ConfigMap.")

    @model_validator(mode="after")
    def _exactly_one(self) -> EnvVarSource:
        if (self.secretKeyRef is None) == (self.configMapKeyRef is None):
            raise ValueError("give exactly one of secretKeyRef or configMapKeyRef")
        return self


class EnvVar(_Model):
    """An environment variable for the agent's container or local process."""

    name: str = Field(description="Variable name.")
    value: str = Field("", description="Literal value.")
    valueFrom: EnvVarSource | None = Field(
        None, description="Take the value from a Secret or ConfigMap key (never written into the manifest)."
    )

    @model_validator(mode="after")
    def _value_or_reference(self) -> EnvVar:
        if self.value and self.valueFrom is not None:
            raise ValueError("give value or valueFrom, not both")
        if self.name == "CADENZA_NATS_CREDS":
            raise ValueError("CADENZA_NATS_CREDS is Cadenza's: the operator mounts the NATS credentials")
        return self


class NamedRef(_Model):
    """A Secret or ConfigMap named in `envFrom`."""

    name: str = Field(min_length=1, description="Name of the Secret or ConfigMap.")


class EnvFromSource(_Model):
    """Every key of a Secret or ConfigMap as a variable: exactly one reference."""

    secretRef: NamedRef | None = Field(None, description="Every key of this Secret.")
    configMapRef: NamedRef | None = Field(None, description="Every key of this ConfigMap.")
    prefix: str = Field("", description="Prepended to each key to make the variable name.")

    @model_validator(mode="after")
    def _exactly_one(self) -> EnvFromSource:
        if (self.secretRef is None) == (self.configMapRef is None):
            raise ValueError("give exactly one of secretRef or configMapRef")
        return self


OWNED_VOLUMES = frozenset({"tmp", "nats-creds"})
"""Volumes (and mounts) the Agent's Deployment always has: a podTemplate may not name them."""

OWNED_MOUNT_PATHS = frozenset({"/tmp", "/etc/cadenza/nats"})

_FORBIDDEN_POD_FIELDS = {
    "containers": None,  # checked one by one below
    "serviceAccountName": "use spec.serviceAccountName",
    "serviceAccount": "use spec.serviceAccountName",
    "automountServiceAccountToken": "decided by spec.serviceAccountName",
    "hostNetwork": "agents do not share the node's network",
    "hostPID": "agents do not share the node's processes",
    "hostIPC": "agents do not share the node's IPC",
    # Containers Cadenza does not build would escape the securityContext floor.
    "initContainers": "only the agent's container runs in its pods",
    "ephemeralContainers": "only the agent's container runs in its pods",
}
_PROBES = ("livenessProbe", "readinessProbe", "startupProbe")
_ALLOWED_CONTAINER_FIELDS = frozenset({"name", "volumeMounts", "resources", "securityContext", *_PROBES})
_OWNED_CONTAINER_FIELDS = {
    "command": "owned by Cadenza: use spec.command",
    "args": "owned by Cadenza: use spec.command",
    "image": "use spec.image",
    "env": "use spec.env",
    "envFrom": "use spec.envFrom",
}


def pod_template_errors(template: dict[str, Any]) -> list[tuple[str, str]]:
    """(field path, message) for each part of a podTemplate that would override what Cadenza
    owns: the container's command and image, its NATS credentials and environment, the
    reserved volumes, and the securityContext floor (non-root, no privilege escalation,
    every capability dropped). The rest is checked against the Kubernetes schema."""
    errors: list[tuple[str, str]] = []
    template = _dict(template)
    for key in template:
        if key not in ("metadata", "spec"):
            errors.append((key, "unknown field (a PodTemplateSpec has metadata and spec)"))
    metadata = _dict(template.get("metadata"))
    for key in metadata:
        if key not in ("labels", "annotations"):
            errors.append((f"metadata.{key}", "only labels and annotations may be set"))
    spec = _dict(template.get("spec"))
    for key, why in _FORBIDDEN_POD_FIELDS.items():
        if key in spec and why is not None:
            errors.append((f"spec.{key}", why))
    sc = _dict(spec.get("securityContext"))
    if sc.get("runAsNonRoot") is False or sc.get("runAsUser") == 0:
        errors.append(("spec.securityContext", "agents run as non-root: the floor cannot be lowered"))
    for i, volume in enumerate(_list(spec.get("volumes"))):
        if isinstance(volume, dict) and volume.get("name") in OWNED_VOLUMES:
            errors.append((f"spec.volumes[{i}].name", f"{volume['name']!r} is a volume Cadenza owns"))
    containers = [_dict(c) for c in _list(spec.get("containers"))]
    if len(containers) > 1:
        errors.append(("spec.containers", "one container only: the agent's (named 'agent')"))
    for i, container in enumerate(containers[:1]):
        where = f"spec.containers[{i}]"
        if container.get("name", "agent") != "agent":
            errors.append((f"{where}.name", "the agent's container is named 'agent'"))
        for key in container:
            if key in _OWNED_CONTAINER_FIELDS:
                errors.append((f"{where}.{key}", _OWNED_CONTAINER_FIELDS[key]))
            elif key not in _ALLOWED_CONTAINER_FIELDS:
                errors.append((f"{where}.{key}", "not settable through a podTemplate"))
        for j, mount in enumerate(_dict(m) for m in _list(container.get("volumeMounts"))):
            if mount.get("name") in OWNED_VOLUMES or mount.get("mountPath") in OWNED_MOUNT_PATHS:
                errors.append((f"{where}.volumeMounts[{j}]", "a mount Cadenza owns"))
        csc = _dict(container.get("securityContext"))
        if csc.get("allowPrivilegeEscalation") is True or csc.get("privileged") is True:
            errors.append((f"{where}.securityContext", "no privilege escalation: a floor that stays"))
        if csc.get("runAsNonRoot") is False or csc.get("runAsUser") == 0:
            errors.append((f"{where}.securityContext", "agents run as non-root: a floor that stays"))
        caps = _dict(csc.get("capabilities"))
        if caps.get("add") or ("drop" in caps and "ALL" not in _list(caps.get("drop"))):
            errors.append((f"{where}.securityContext.capabilities", "every capability stays dropped"))
    return errors


def _dict(value: Any) -> dict[str, Any]:
    # A wrong type is the Kubernetes schema's to report; here it only must not crash.
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


class AgentSpec(_Model):
    """An agent: a process that takes tasks for this agent name from JetStream."""

    image: str | None = Field(None, description="Container image run in a cluster. Unused by `cadenza run`.")
    command: list[str] = Field(
        default_factory=list,
        description=(
            "Container command in a cluster; locally, the command `cadenza run` starts with the "
            "manifest's folder as working directory ('python' means the current interpreter)."
        ),
    )
    env: list[EnvVar] = Field(default_factory=list, description="Extra environment for the agent.")
    envFrom: list[EnvFromSource] = Field(
        default_factory=list, description="Every key of these Secrets or ConfigMaps as variables."
    )
    models: list[Annotated[str, Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=63)]] = Field(
        default_factory=list,
        description="Models (same namespace) the agent calls with `task.model(name)`.",
    )
    replicas: int = Field(1, ge=0, description="Replicas (pods in a cluster, processes locally).")
    concurrency: int = Field(4, ge=1, le=10_000, description="Tasks in flight per replica.")
    ackWait: Duration = Field(
        "30s",
        description=(
            "How long JetStream waits for a replica's heartbeat before redelivering its task to "
            "another replica. Replicas heartbeat every third of it while a task runs."
        ),
    )
    autoscaling: AutoscalingSpec | None = Field(
        None, description="Scale replicas on queue depth; when set, `replicas` is the initial count."
    )
    metrics: MetricsSpec | None = Field(None, description="Metrics Service for the agent's pods.")
    resources: dict[str, Any] | None = Field(
        None,
        description="Container resources (requests/limits) for the agent's pods.",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )
    serviceAccountName: str | None = Field(
        None, description="Use this ServiceAccount instead of the one the operator creates."
    )
    podTemplate: dict[str, Any] | None = Field(
        None,
        description=(
            "A partial PodTemplateSpec merged into the agent's Deployment: labels, annotations, "
            "volumes, imagePullSecrets, nodeSelector, tolerations, affinity, and for the container "
            "named 'agent' volumeMounts, probes and resources. The command, image, environment, "
            "NATS credentials and the securityContext floor stay Cadenza's."
        ),
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )

    @field_validator("podTemplate")
    @classmethod
    def _owned_fields_stay_owned(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        errors = pod_template_errors(value) if value is not None else []
        if errors:
            raise ValueError("; ".join(f"podTemplate.{path}: {msg}" for path, msg in errors))
        return value


class Condition(_Model):
    """A Kubernetes-style condition."""

    model_config = ConfigDict(extra="allow")
    type: str = Field(description="Condition type, e.g. Ready.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field("", description="One-word CamelCase reason.")
    message: str = Field("", description="Human-readable detail.")
    lastTransitionTime: str | None = Field(None, description="When the status last changed.")


class AgentStatus(_Model):
    """Observed state of an Agent."""

    model_config = ConfigDict(extra="allow")
    replicas: int = Field(0, description="Replicas the Deployment wants.")
    readyReplicas: int = Field(0, description="Replicas ready to take tasks.")
    pending: int = Field(0, description="Tasks waiting in the agent's queue.")
    inFlight: int = Field(0, description="Tasks delivered to a replica and not yet acknowledged.")
    ready: str = Field("", description="readyReplicas/replicas, for kubectl get.")
    observedGeneration: int = Field(0, description="The spec generation this status describes.")
    conditions: list[Condition] = Field(default_factory=list, description="Ready and Degraded conditions.")


# --------------------------------------------------------------------------- Model

TOKEN_COUNT_PATTERN = r"^[0-9]+(\.[0-9]+)?[KkMm]?$"


class ModelApiKey(_Model):
    """Where the provider's API key is: a Secret key, never a value in the manifest."""

    secretKeyRef: SecretKeyRef = Field(description="The Secret key holding the API key.")


class ModelLimits(_Model):
    """Limits every agent process and replica calling this Model shares (through NATS)."""

    requests: int | None = Field(None, ge=1, description="Most requests in any window of `per`.")
    tokens: int | None = Field(
        None, ge=1, description="Most input plus output tokens in any window of `per`."
    )
    per: Duration = Field("1m", description="The sliding window of `requests` and `tokens`.")
    concurrency: int | None = Field(None, ge=1, description="Most requests in flight at once.")


class ModelPricing(_Model):
    """What tokens cost, in any unit (dollars, credits); budgets and usage use the same unit."""

    input: float = Field(0.0, ge=0, description="Cost of `per` input (prompt) tokens.")
    output: float = Field(0.0, ge=0, description="Cost of `per` output (completion) tokens.")
    per: str = Field(
        "1M", pattern=TOKEN_COUNT_PATTERN, max_length=16, description="Token count priced: 1M, 1K or 1000."
    )


class ModelSpec(_Model):
    """A model agents call through `task.model(name)`, with cluster-wide limits and pricing."""

    provider: Literal["openai"] = Field(
        "openai", description="The protocol: openai is the OpenAI-compatible chat completions API."
    )
    baseURL: str = Field(
        pattern=r"^https?://[^\s]+$", max_length=2048, description="Base URL, e.g. https://api.openai.com/v1."
    )
    model: str = Field(min_length=1, max_length=256, description="The provider's model name.")
    apiKey: ModelApiKey | None = Field(None, description="The API key, as a Secret reference.")
    limits: ModelLimits | None = Field(None, description="Cluster-wide rate and concurrency limits.")
    pricing: ModelPricing | None = Field(None, description="Cost per tokens, for usage and budgets.")


class ModelStatus(_Model):
    """Observed state of a Model."""

    model_config = ConfigDict(extra="allow")
    observedGeneration: int = Field(0, description="The spec generation this status describes.")
    conditions: list[Condition] = Field(default_factory=list, description="Conditions.")
    agents: list[str] = Field(
        default_factory=list, description="The Agents in the namespace whose spec.models names it."
    )


# ------------------------------------------------------------------------ Workflow


class Backoff(_Model):
    """Exponential backoff between attempts, with jitter and a cap."""

    initial: Duration = Field("1s", description="Delay before the second attempt.")
    factor: float = Field(2.0, ge=1.0, le=10.0, description="Multiplier applied for each further attempt.")
    max: Duration = Field("5m", description="Upper bound on any single delay.")
    jitter: float = Field(
        0.2, ge=0.0, le=1.0, description="Fraction of each delay randomised (deterministically per attempt)."
    )


EXCEPTION_TYPE_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$"
MAX_NON_RETRYABLE = 64


class RetryPolicy(_Model):
    """How a failed attempt is retried. As in Temporal, every exception a handler raises is
    retried, and timeouts and lost heartbeats, except FatalError and the types in nonRetryable."""

    limit: int = Field(
        0, ge=0, le=1000, description="Retries after the first attempt (attempts <= limit + 1)."
    )
    backoff: Backoff = Field(default_factory=Backoff, description="Delay between attempts.")
    nonRetryable: list[
        Annotated[str, Field(min_length=1, max_length=200, pattern=EXCEPTION_TYPE_PATTERN)]
    ] = Field(
        default_factory=list,
        max_length=MAX_NON_RETRYABLE,
        description=(
            "Exception types a handler raises that fail the step without a retry, matched on "
            "the exception's class and its bases by name (OSError covers ConnectionResetError) "
            "or by a dotted suffix of module.QualName (requests.exceptions.ConnectionError). "
            "Every other exception is retried, except FatalError; timeouts are always retryable."
        ),
    )


class ApprovalSpec(_Model):
    """Wait for a human decision before the workflow goes on."""

    timeout: Duration | None = Field(None, description="How long to wait; unset waits forever.")
    onTimeout: Literal["approve", "reject"] = Field(
        "reject", description="Decision taken when the timeout passes."
    )
    approvers: list[str] = Field(
        default_factory=list,
        description=(
            "Who may decide: user names and groups written group:NAME (a Kubernetes user's groups, "
            "bound by the chart's admission policy); empty lets anyone who can send the decision."
        ),
    )
    message: str = Field("", description="What the approver is asked, shown by the CLI and in status.")


class WaitForSpec(_Model):
    """Wait for a named external signal; its payload becomes the step's output."""

    signal: str = Field(pattern=r"^[a-zA-Z0-9_.-]+$", description="Signal name sent with `cadenza signal`.")
    timeout: Duration | None = Field(None, description="Fail the step when no signal came in time.")


class BudgetSpec(_Model):
    """A cap on the model usage agents record (`task.record_usage`, `task.model()`).
    Checked before each attempt is dispatched: a run that has reached it pauses (or fails)."""

    tokens: int | None = Field(None, ge=1, description="Input plus output tokens.")
    # ge, not gt: a CRD schema's exclusiveMinimum is a boolean that JSON Schema tools reject
    cost: float | None = Field(None, ge=0, description="Cost, in the Models' pricing units (above 0).")
    onExceeded: Literal["pause", "fail"] = Field(
        "pause",
        description=(
            "pause: the run goes to Paused (what runs finishes, nothing new starts) until "
            "`cadenza resume` raises the budget; fail: the run fails."
        ),
    )

    @field_validator("cost")
    @classmethod
    def _cost_above_zero(cls, cost: float | None) -> float | None:
        if cost is not None and not cost > 0:
            raise ValueError("a cost budget must be above 0")
        return cost


class Step(_Model):
    """One node of the workflow graph."""

    name: Annotated[str, AfterValidator(_step_name)] = Field(
        pattern=STEP_NAME_PATTERN,
        description="Unique step name, usable in expressions (not a CEL reserved word such as `in`).",
    )
    agent: str | None = Field(None, description="Agent that executes the step.")
    workflow: str | None = Field(None, description="Run this Workflow (same namespace) as a sub-workflow.")
    approval: ApprovalSpec | None = Field(None, description="Make this a human approval step.")
    waitFor: WaitForSpec | None = Field(None, description="Make this step wait for an external signal.")
    dependsOn: list[str] = Field(default_factory=list, description="Steps that must finish first.")
    when: str | None = Field(None, description="CEL condition; the step is Skipped when false.")
    ifDependenciesSkipped: Literal["skip", "run"] = Field(
        "skip",
        description="A step whose dependencies were all skipped is skipped too, unless this says run.",
    )
    input: JsonValue = Field(
        None,
        description="Input for the agent; strings may hold ${{ CEL }} expressions.",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )
    forEach: str | None = Field(
        None, description="CEL list: run the step once per item (binds item and index)."
    )
    maxParallel: int | None = Field(
        None,
        ge=1,
        # The run record holds one slot and, when they start, one task command per item in
        # flight: 1,000 keep it near 400 KB, under NATS's 1 MiB message limit. 10,000 made
        # a 3.6 MB record that could never be written (the run never started).
        le=MAX_PARALLEL,
        description=f"Items of a forEach in flight at once (at most {MAX_PARALLEL}, the default).",
    )
    retry: RetryPolicy | None = Field(None, description="Retry policy for failed attempts.")
    timeout: Duration | None = Field(
        None,
        description="Start-to-close limit of one attempt: counted from the moment an agent starts it.",
    )
    queueTimeout: Duration | None = Field(
        None,
        description=(
            "Schedule-to-start limit of one attempt: how long it may wait for an agent to start "
            "it. Expiry is a retryable failure (QueueTimeout); unset waits as long as it takes."
        ),
    )
    heartbeatTimeout: Duration | None = Field(
        None, description="Fail the attempt when the agent sends no heartbeat for this long."
    )
    onFailure: str = Field(
        "fail",
        description=(
            "fail: the run fails; continue: dependents go on (steps.X.phase is Failed); "
            "or the name of a fallback step that runs instead."
        ),
    )
    budget: BudgetSpec | None = Field(None, description="A cap on this step's model usage.")

    @property
    def kind(self) -> Literal["agent", "workflow", "approval", "signal"]:
        if self.approval is not None:
            return "approval"
        if self.waitFor is not None:
            return "signal"
        if self.workflow is not None:
            return "workflow"
        return "agent"


class OnExitStep(_Model):
    """A step that always runs when the workflow's graph has finished, whatever its outcome."""

    name: Annotated[str, AfterValidator(_step_name)] = Field(
        "onExit", pattern=STEP_NAME_PATTERN, description="Step name."
    )
    agent: str = Field(description="Agent that executes it; `run.phase` says how the run went.")
    input: JsonValue = Field(
        None,
        description="Input; may use ${{ run.phase }} and step outputs.",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )
    timeout: Duration | None = Field(None, description="Start-to-close limit.")
    retry: RetryPolicy | None = Field(None, description="Retry policy.")


class NatsTrigger(_Model):
    """Start a run for each message on a NATS subject."""

    subject: Annotated[str, AfterValidator(_trigger_subject)] = Field(
        max_length=255,
        description=(
            "Subject (wildcards allowed, not under cadenza.>); the message JSON becomes the run input."
        ),
    )
    dedupKey: str | None = Field(
        None, description="CEL over `event` giving an idempotency key; a repeated key starts no new run."
    )
    input: JsonValue = Field(
        None,
        description=(
            "The run input built from the message, with ${{ event.x }} expressions; unset, the message "
            "JSON is the input. An event it cannot be evaluated on is dead-lettered, with a Warning."
        ),
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )


class ScheduleTrigger(_Model):
    """Start a run on a cron schedule."""

    cron: str = Field(description="Five-field cron expression, UTC.")
    input: JsonValue = Field(
        None,
        description="Input of scheduled runs.",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )


class Trigger(_Model):
    """An event source that starts runs."""

    nats: NatsTrigger | None = Field(None, description="Messages on a NATS subject.")
    schedule: ScheduleTrigger | None = Field(None, description="A cron schedule.")


class WorkflowSpec(_Model):
    """A declarative workflow: a graph of steps executed by agents."""

    steps: list[Step] = Field(min_length=1, description="The steps; order does not matter, dependsOn does.")
    output: JsonValue = Field(
        None,
        description="The run's output mapping; strings may hold ${{ CEL }} expressions.",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )
    inputSchema: Annotated[dict[str, Any], AfterValidator(_shallow)] | None = Field(
        None,
        description="JSON Schema the run input must match; a mismatch rejects the run before it starts.",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )
    deadline: Duration | None = Field(None, description="Fail the whole run when it takes longer.")
    budget: BudgetSpec | None = Field(None, description="A cap on the run's model usage.")
    onExit: OnExitStep | None = Field(None, description="A step that always runs at the end.")
    triggers: list[Trigger] = Field(default_factory=list, description="Event sources that start runs.")
    concurrencyPolicy: Literal["Allow", "Forbid", "Replace"] = Field(
        "Allow", description="What a trigger does while a run is active: start another, skip, or replace it."
    )
    maxActiveRuns: int | None = Field(
        None, ge=1, description="Most runs active at once; triggers wait beyond."
    )
    runHistoryLimit: int = Field(20, ge=0, description="Finished triggered WorkflowRuns kept in the cluster.")

    @field_validator("steps")
    @classmethod
    def _names_unique(cls, steps: list[Step]) -> list[Step]:
        seen: set[str] = set()
        for index, step in enumerate(steps):
            if step.name in seen:
                raise ValueError(f"duplicate step name {step.name!r} at steps[{index}]")
            seen.add(step.name)
        return steps


class WorkflowStatus(_Model):
    """Observed state of a Workflow."""

    model_config = ConfigDict(extra="allow")
    steps: int = Field(0, description="Number of steps.")
    activeRuns: int = Field(0, description="Runs not yet finished.")
    lastRun: str = Field("", description="Name of the most recent run.")
    lastRunPhase: str = Field("", description="Phase of the most recent run.")
    runs: dict[str, int] = Field(default_factory=dict, description="Finished runs by phase.")
    observedGeneration: int = Field(0, description="The spec generation this status describes.")
    conditions: list[Condition] = Field(default_factory=list, description="The Valid condition.")


# --------------------------------------------------------------------- WorkflowRun


class WorkflowRunSpec(_Model):
    """A request to run a Workflow once."""

    workflowRef: str = Field(description="Name of the Workflow, in the run's namespace.")
    input: JsonValue = Field(
        None,
        description="The run input (JSON).",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )


class StepSummary(_Model):
    """Bounded summary of one step, mirrored from the engine."""

    model_config = ConfigDict(extra="allow")
    phase: str = Field(description="Step phase.")
    attempts: int = Field(0, description="Attempts made.")
    message: str = Field("", description="Error or waiting reason.")
    items: dict[str, int] | None = Field(None, description="forEach steps: item counts by phase.")
    waiting: str = Field(
        "", description="Time its finished attempts waited: ready to queued plus queued to started."
    )
    executing: str = Field("", description="Time agents spent executing its finished attempts.")


class RunUsage(_Model):
    """Model usage summed over a run's attempts."""

    inputTokens: int = Field(0, description="Input (prompt) tokens.")
    outputTokens: int = Field(0, description="Output (completion) tokens.")
    cost: float = Field(0.0, description="Cost, in the Models' pricing units.")
    calls: int = Field(0, description="Model calls.")
    tokens: int = Field(0, description="Input plus output tokens (what a token budget counts).")


class WorkflowRunStatus(_Model):
    """Observed state of a run; the full record lives in JetStream."""

    model_config = ConfigDict(extra="allow")
    phase: str = Field("Pending", description="Pending, Running, Paused, Succeeded, Failed or Cancelled.")
    runId: str = Field("", description="Engine run id.")
    startedAt: str | None = Field(None, description="When the run started.")
    finishedAt: str | None = Field(None, description="When the run finished.")
    progress: str = Field("", description="Finished steps / all steps.")
    duration: str = Field("", description="Wall-clock duration.")
    waiting: str = Field(
        "",
        description="Time attempts spent ready but not started by an agent (behind maxParallel, "
        "maxActiveRuns, a busy engine, or in an agent's queue), summed over steps.",
    )
    executing: str = Field("", description="Time agents spent executing attempts, summed over steps.")
    usage: RunUsage | None = Field(None, description="Model usage the run's agents recorded.")
    steps: dict[str, StepSummary] = Field(default_factory=dict, description="Per-step summary.")
    outputs: Any = Field(
        None,
        description="Run outputs, or a reference when they are large.",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )
    message: str = Field("", description="Why the run failed, or what it waits for.")
    conditions: list[Condition] = Field(default_factory=list, description="Conditions.")


# ---------------------------------------------------------------- Resource wrappers


class ObjectMeta(BaseModel):
    """The part of Kubernetes metadata Cadenza reads."""

    model_config = ConfigDict(extra="allow")
    name: str = Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=63)
    namespace: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class Agent(BaseModel):
    """Agent resource."""

    model_config = ConfigDict(extra="forbid")
    apiVersion: Literal["cadenza.dev/v1alpha1"] = "cadenza.dev/v1alpha1"
    kind: Literal["Agent"] = "Agent"
    metadata: ObjectMeta
    spec: AgentSpec
    status: AgentStatus | None = None


class Workflow(BaseModel):
    """Workflow resource."""

    model_config = ConfigDict(extra="forbid")
    apiVersion: Literal["cadenza.dev/v1alpha1"] = "cadenza.dev/v1alpha1"
    kind: Literal["Workflow"] = "Workflow"
    metadata: ObjectMeta
    spec: WorkflowSpec
    status: WorkflowStatus | None = None


class WorkflowRun(BaseModel):
    """WorkflowRun resource."""

    model_config = ConfigDict(extra="forbid")
    apiVersion: Literal["cadenza.dev/v1alpha1"] = "cadenza.dev/v1alpha1"
    kind: Literal["WorkflowRun"] = "WorkflowRun"
    metadata: ObjectMeta
    spec: WorkflowRunSpec
    status: WorkflowRunStatus | None = None


class Model(BaseModel):
    """Model resource."""

    model_config = ConfigDict(extra="forbid")
    apiVersion: Literal["cadenza.dev/v1alpha1"] = "cadenza.dev/v1alpha1"
    kind: Literal["Model"] = "Model"
    metadata: ObjectMeta
    spec: ModelSpec
    status: ModelStatus | None = None


KINDS: dict[str, type[BaseModel]] = {
    "Agent": Agent,
    "Workflow": Workflow,
    "WorkflowRun": WorkflowRun,
    "Model": Model,
}
