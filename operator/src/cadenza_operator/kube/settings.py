"""The operator's settings: one object, read from the environment the Helm chart fills.

Every field says why it exists; the environment variable comes first in its docstring.
Tests build the object directly (no environment needed) with short intervals.
"""

from __future__ import annotations

import os
import random
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

from cadenza.tracing import enabled as tracing_enabled

from .agent_policy import parse_patterns

AGENT_OTEL_VARIABLES = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
"""The operator's OTLP variables its agents get too (`OperatorSettings.agent_otel_env`)."""


class SettingsError(ValueError):
    """A malformed environment variable; the message names it."""


@dataclass(frozen=True)
class OperatorSettings:
    """Settings of `cadenza operator` (kopf + engine in one process)."""

    nats_url: str = "nats://127.0.0.1:4222"
    """CADENZA_NATS_URL: the NATS server (JetStream) the engine and the operator use; run
    state, tasks and events live there, not in etcd."""

    nats_creds: str | None = None
    """CADENZA_NATS_CREDS: path to a NATS credentials file, for servers that authenticate
    clients (the chart mounts it from a Secret)."""

    nats_ca: str = ""
    """CADENZA_NATS_CA: the CA certificate (PEM file) of a NATS that serves TLS (the chart's
    `nats.tls` mounts ca.crt alone). The engine connects with it; with per-Agent
    credentials (`nats_account_seed_file`) each `<agent>-nats` Secret carries it too, as
    `ca.crt`, and its pods get CADENZA_NATS_CA (a pod mounts only its own namespace's
    Secrets, so the CA travels with the credential)."""

    agent_nats_url: str = ""
    """CADENZA_AGENT_NATS_URL: the NATS URL injected into agent pods. Empty means
    `nats_url`; set it when agents reach NATS by another address than the operator (e.g.
    another namespace's Service name, or a leaf node)."""

    agent_nats_creds_secret: str = ""
    """CADENZA_AGENT_NATS_CREDS_SECRET: a Secret holding a NATS credentials file for agents.
    Every agent pod mounts it read-only under /etc/cadenza/nats, and CADENZA_NATS_CREDS
    points the SDK at the file. A pod mounts Secrets of its own namespace only: the Secret
    must exist in each namespace that has Agents. The operator never reads it. Empty
    means agents connect without credentials."""

    agent_nats_creds_key: str = "nats.creds"
    """CADENZA_AGENT_NATS_CREDS_KEY: the key of the credentials file in that Secret."""

    nats_account_seed_file: str = ""
    """CADENZA_NATS_ACCOUNT_SEED_FILE: the CADENZA account seed (the chart mounts it from
    the keys Secret its install hook made). Set: every Agent gets its own credential,
    minted here with only its permissions and written to the Secret `<agent>-nats` it
    mounts (kube/nats_credentials.py), instead of `agent_nats_creds_secret`. Read from the
    file at each reconcile, so a rotated seed is used without reading the API."""

    watch_namespaces: tuple[str, ...] = ()
    """CADENZA_WATCH_NAMESPACES: comma-separated namespaces to serve; empty serves the
    whole cluster. Namespaced mode lets the operator run with Roles instead of a
    ClusterRole (the chart renders RBAC to match)."""

    metrics_port: int = 9090
    """CADENZA_METRICS_PORT: Prometheus /metrics of the engine and the operator; 0 turns it off."""

    console_port: int = 0
    """CADENZA_CONSOLE_PORT: the web console (runs, graphs, approvals; observe/web) on
    0.0.0.0:PORT; 0 (the default) serves none. Anyone who reaches it may steer runs, so the
    chart leaves it off and documents putting an authenticating proxy in front."""

    console_address: str = "0.0.0.0"
    """CADENZA_CONSOLE_ADDRESS: the address the console listens on: every interface of the
    pod, for its Service (tests listen on 127.0.0.1)."""

    console_user_header: str = ""
    """CADENZA_CONSOLE_USER_HEADER: the request header an authenticating proxy in front of
    the console sets to the signed-in user (oauth2-proxy: X-Forwarded-User). Set, that user
    is who approves, cancels and signals, checked against approvers by the engine, and a
    request without it is refused; empty, actions carry the unverified name `console`
    (refused by any approval step that names its approvers)."""

    console_groups_header: str = ""
    """CADENZA_CONSOLE_GROUPS_HEADER: the proxy's header of the user's groups,
    comma-separated (oauth2-proxy: X-Forwarded-Groups), read with the user header: an
    approval naming `group:NAME` then accepts a member, as the operator does for a
    WorkflowRun annotation whose author Kubernetes admission checked."""

    health_port: int = 8080
    """CADENZA_HEALTH_PORT: kopf's liveness endpoint /healthz, probed by the kubelet; 0 turns it off."""

    log_format: str = "json"
    """CADENZA_LOG_FORMAT: json (for log collectors) or console (for people); it is also
    injected into agent pods so that one cluster logs one way."""

    peering: str = "cadenza"
    """CADENZA_PEERING: kopf peering name. Replicas of the operator sharing it elect one
    active instance, so that two replicas never both act on the same objects (the chart
    ships the KopfPeering CRDs). Empty runs standalone: no peering object is needed."""

    peering_priority: int = field(default_factory=lambda: random.randint(1, 2**31 - 1))
    """CADENZA_PEERING_PRIORITY: this replica's peering priority; the live replica with the
    highest acts, the others pause until it is gone. kopf pauses *all* replicas of equal
    priority, so the default is random per start: replicas of one Deployment differ."""

    peer_id: str = field(default_factory=socket.gethostname)
    """POD_ID: this replica's identity in peering and the engine's name in logs (the chart
    sets the pod name; defaults to the host name)."""

    status_interval: float = 1.0
    """CADENZA_STATUS_INTERVAL: seconds between two status writes of one WorkflowRun. Run
    state changes are coalesced into at most one write per interval (plus the final one),
    so a 10,000-item fan-out costs the API server a handful of writes, not 10,000."""

    agent_interval: float = 10.0
    """CADENZA_AGENT_INTERVAL: seconds between two evaluations of an Agent's queue depth
    (status pending/inFlight, autoscaling) and of its pods (crash loops). Shorter reacts
    faster and asks NATS and the API server (one pod list per Agent) more often."""

    scale_down_window: float = 60.0
    """CADENZA_SCALE_DOWN_WINDOW: seconds a lower replica count must be wanted before an
    autoscaled Agent shrinks, so a queue emptying between bursts does not make it flap."""

    workflow_interval: float = 10.0
    """CADENZA_WORKFLOW_INTERVAL: seconds between two refreshes of Workflow status (run
    counts) and the garbage collection of finished runs beyond `runHistoryLimit`."""

    outputs_limit: int = 8192
    """CADENZA_STATUS_OUTPUTS_LIMIT: bytes of run outputs copied into WorkflowRun status;
    larger outputs are replaced by a reference (the run id), keeping objects small in etcd."""

    agent_images: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """CADENZA_AGENT_IMAGES: JSON, namespace (or `*`) -> glob patterns of the images an
    Agent's pods may run there (kube/agent_policy.py); empty allows any image."""

    agent_service_accounts: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """CADENZA_AGENT_SERVICE_ACCOUNTS: JSON, namespace (or `*`) -> glob patterns of the
    ServiceAccounts an Agent may name there; empty allows any."""

    agent_otel_env: Mapping[str, str] = field(default_factory=dict)
    """OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: the operator's own
    collector, passed on to every Agent's pods (kube/builders.py `tracing_env`), so that an
    agent's handler and model-call spans reach the backend that holds the engine's attempt
    spans they nest under. Filled only when the operator itself exports traces
    (`cadenza.tracing.enabled`); empty, agents get no OTEL_* variable at all. Only the
    endpoints travel: the operator's OTEL_SERVICE_NAME and resource attributes name the
    operator, not the agent (the SDK names an agent's service after the Agent), and its
    headers may hold a token (`agent_otel_headers_secret`)."""

    agent_otel_headers_secret: str = ""
    """CADENZA_AGENT_OTEL_HEADERS_SECRET: a Secret whose key holds OTEL_EXPORTER_OTLP_HEADERS
    (e.g. the collector's token) for agents, referenced with `optional: true`: a pod reads
    Secrets of its own namespace only and the operator never reads them, so the Secret must
    be created in each namespace that has Agents; where it is missing an agent still runs
    and exports without headers (traces are not worth an agent that does not start).
    Unused unless `agent_otel_env` is set."""

    agent_otel_headers_key: str = "headers"
    """CADENZA_AGENT_OTEL_HEADERS_KEY: the key of the headers in that Secret."""

    @property
    def agents_nats_url(self) -> str:
        """The NATS URL agents get: `agent_nats_url`, else the operator's own."""
        return self.agent_nats_url or self.nats_url

    @property
    def agents_nats_creds(self) -> tuple[str, str] | None:
        """(Secret name, key) of the credentials agents mount, or None."""
        if not self.agent_nats_creds_secret:
            return None
        return self.agent_nats_creds_secret, self.agent_nats_creds_key

    @property
    def agents_otel_headers(self) -> tuple[str, str] | None:
        """(Secret name, key) of the OTLP headers agents reference, or None: only when
        agents export traces at all."""
        if not (self.agent_otel_env and self.agent_otel_headers_secret):
            return None
        return self.agent_otel_headers_secret, self.agent_otel_headers_key

    @property
    def clusterwide(self) -> bool:
        return not self.watch_namespaces

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> OperatorSettings:
        """Read the settings from the environment; unset or empty variables keep the defaults."""
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}

        def text(var: str, name: str) -> None:
            if env.get(var):
                values[name] = env[var]

        def number(var: str, name: str, kind: type[int] | type[float]) -> None:
            raw = env.get(var, "")
            if raw == "":
                return
            try:
                value = kind(raw)
            except ValueError:
                raise SettingsError(f"{var}={raw!r} is not a number") from None
            if value < 0:
                raise SettingsError(f"{var}={raw!r} must not be negative")
            values[name] = value

        text("CADENZA_NATS_URL", "nats_url")
        text("CADENZA_NATS_CREDS", "nats_creds")
        text("CADENZA_NATS_CA", "nats_ca")
        text("CADENZA_AGENT_NATS_URL", "agent_nats_url")
        text("CADENZA_AGENT_NATS_CREDS_SECRET", "agent_nats_creds_secret")
        text("CADENZA_AGENT_NATS_CREDS_KEY", "agent_nats_creds_key")
        text("CADENZA_NATS_ACCOUNT_SEED_FILE", "nats_account_seed_file")
        text("CADENZA_LOG_FORMAT", "log_format")
        text("CADENZA_CONSOLE_USER_HEADER", "console_user_header")
        text("CADENZA_CONSOLE_GROUPS_HEADER", "console_groups_header")
        text("CADENZA_CONSOLE_ADDRESS", "console_address")
        text("POD_ID", "peer_id")
        text("CADENZA_AGENT_OTEL_HEADERS_SECRET", "agent_otel_headers_secret")
        text("CADENZA_AGENT_OTEL_HEADERS_KEY", "agent_otel_headers_key")
        if tracing_enabled(env):
            values["agent_otel_env"] = {var: env[var] for var in AGENT_OTEL_VARIABLES if env.get(var)}
        if "CADENZA_PEERING" in env:  # set but empty means standalone, not the default name
            values["peering"] = env["CADENZA_PEERING"].strip()
        namespaces = env.get("CADENZA_WATCH_NAMESPACES", "")
        values["watch_namespaces"] = tuple(n.strip() for n in namespaces.split(",") if n.strip())
        number("CADENZA_PEERING_PRIORITY", "peering_priority", int)
        number("CADENZA_METRICS_PORT", "metrics_port", int)
        number("CADENZA_HEALTH_PORT", "health_port", int)
        number("CADENZA_CONSOLE_PORT", "console_port", int)
        number("CADENZA_STATUS_INTERVAL", "status_interval", float)
        number("CADENZA_AGENT_INTERVAL", "agent_interval", float)
        number("CADENZA_SCALE_DOWN_WINDOW", "scale_down_window", float)
        number("CADENZA_WORKFLOW_INTERVAL", "workflow_interval", float)
        number("CADENZA_STATUS_OUTPUTS_LIMIT", "outputs_limit", int)
        for var, name in (
            ("CADENZA_AGENT_IMAGES", "agent_images"),
            ("CADENZA_AGENT_SERVICE_ACCOUNTS", "agent_service_accounts"),
        ):
            try:
                values[name] = parse_patterns(var, env.get(var, ""))
            except ValueError as exc:
                raise SettingsError(str(exc)) from None
        if values.get("log_format", "json") not in ("json", "console"):
            raise SettingsError(f"CADENZA_LOG_FORMAT={values['log_format']!r}: use json or console")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})  # type: ignore[arg-type]
