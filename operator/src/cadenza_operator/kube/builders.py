"""Where an Agent becomes Kubernetes objects: pure `build_*()` functions returning manifests.

No I/O here: the handlers in `agents.py` adopt these manifests (ownerReferences) and
create or patch them. Keeping them pure makes every field testable without a cluster.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any

from ..models import Agent, ModelSpec, parse_duration

MANAGED_BY = "cadenza"
AGENT_LABEL = "cadenza.dev/agent"
SPEC_HASH_ANNOTATION = "cadenza.dev/spec-hash"
RUNNER_USER = 65532
"""The uid agent containers run as unless their image says otherwise: the distroless
`nonroot` user, so that an image built FROM a root-user base still runs non-root."""

Manifest = dict[str, Any]

NATS_CREDS_DIR = "/etc/cadenza/nats"
"""Where agent pods mount the NATS credentials Secret (the chart mounts the operator's there too)."""


class SpecError(ValueError):
    """An Agent spec that cannot become a Deployment; `path` names the field."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message


def agent_labels(name: str) -> dict[str, str]:
    """Labels on everything made for an Agent (and on its pods)."""
    return {
        "app.kubernetes.io/name": "cadenza-agent",
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/component": "agent",
        "app.kubernetes.io/managed-by": MANAGED_BY,
        AGENT_LABEL: name,
    }


def agent_selector(name: str) -> dict[str, str]:
    # A Deployment's selector is immutable: keep it to the one label that never changes.
    return {AGENT_LABEL: name}


def resource_name(agent: Agent) -> str:
    """Name of the Deployment, ServiceAccount and Service of an Agent."""
    return f"{agent.metadata.name}-agent"


def service_account_name(agent: Agent) -> str:
    return agent.spec.serviceAccountName or resource_name(agent)


def secret_variable(name: str, key: str) -> str:
    """Where an agent reads Secret `name`'s `key`: CADENZA_SECRET_<NAME>_<KEY> ('-' and '.'
    as '_'), as cadenza.models.secret_env_var and local/secrets.secret_variable name it."""
    return "CADENZA_SECRET_" + re.sub(r"[-.]", "_", f"{name}_{key}").upper()


def model_env(agent: Agent, models: Mapping[str, ModelSpec]) -> list[Manifest]:
    """What the SDK learns of the agent's Models: CADENZA_MODELS (their specs, which hold
    no secret value) and each API key as a reference to its Secret, in the variable the
    SDK reads it from."""
    if not agent.spec.models:
        return []
    specs = {name: models[name].model_dump(mode="json", exclude_none=True) for name in agent.spec.models}
    env: list[Manifest] = [
        {"name": "CADENZA_MODELS", "value": json.dumps(specs, separators=(",", ":"), sort_keys=True)}
    ]
    for name in agent.spec.models:
        key = models[name].apiKey
        if key is not None:
            ref = key.secretKeyRef
            env.append(
                {
                    "name": secret_variable(ref.name, ref.key),
                    "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}},
                }
            )
    return env


OTEL_ENDPOINT_VARIABLES = frozenset({"OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"})


def tracing_env(
    agent: Agent, otel_env: Mapping[str, str], headers: tuple[str, str] | None = None
) -> list[Manifest]:
    """The operator's trace collector for an Agent's pods (`OperatorSettings.agent_otel_env`),
    so its handler spans reach the backend holding the engine's attempt spans; `headers`
    the (Secret, key) of OTEL_EXPORTER_OTLP_HEADERS, referenced `optional`: it must exist
    in the Agent's namespace, and an agent without it still starts. Nothing when the
    operator exports no traces, and nothing when the Agent's own `env` names a collector:
    a traces endpoint passed on would override its general one, and the operator's
    headers (a token) must not go to a collector the Agent chose."""
    if not otel_env or any(var.name in OTEL_ENDPOINT_VARIABLES for var in agent.spec.env):
        return []
    env: list[Manifest] = [{"name": k, "value": v} for k, v in sorted(otel_env.items())]
    if headers is not None:
        secret, key = headers
        ref = {"name": secret, "key": key, "optional": True}
        env.append({"name": "OTEL_EXPORTER_OTLP_HEADERS", "valueFrom": {"secretKeyRef": ref}})
    return env


def agent_env(
    agent: Agent,
    *,
    nats_url: str,
    log_format: str = "json",
    nats_creds: tuple[str, str] | None = None,
    models: Mapping[str, ModelSpec] | None = None,
    nats_ca: str | None = None,
    otel_env: Mapping[str, str] | None = None,
    otel_headers: tuple[str, str] | None = None,
) -> list[Manifest]:
    """The agent's environment: the SDK's connection settings, then the spec's own `env`
    (which may override them on purpose, e.g. a different NATS URL for one agent). A
    variable taken from a Secret or ConfigMap stays a reference: its value is never read."""
    base = {
        "CADENZA_NATS_URL": nats_url,
        "CADENZA_AGENT": agent.metadata.name,
        "CADENZA_NAMESPACE": agent.metadata.namespace or "default",
        "CADENZA_CONCURRENCY": str(agent.spec.concurrency),
        "CADENZA_ACK_WAIT": f"{parse_duration(agent.spec.ackWait):g}",
        "CADENZA_LOG_FORMAT": log_format,
        # The root file system is read-only: anything that wants a writable home gets /tmp.
        "HOME": "/tmp",
        "PYTHONUNBUFFERED": "1",
    }
    if nats_creds is not None:
        base["CADENZA_NATS_CREDS"] = f"{NATS_CREDS_DIR}/{nats_creds[1]}"
        if nats_ca is not None:
            base["CADENZA_NATS_CA"] = f"{NATS_CREDS_DIR}/{nats_ca}"
    rendered: dict[str, Manifest] = {k: {"name": k, "value": v} for k, v in base.items()}
    rendered.update({var["name"]: var for var in model_env(agent, models or {})})
    rendered.update({var["name"]: var for var in tracing_env(agent, otel_env or {}, otel_headers)})
    for var in agent.spec.env:
        if var.valueFrom is not None:
            rendered[var.name] = {"name": var.name, "valueFrom": var.valueFrom.model_dump(exclude_none=True)}
        else:
            rendered[var.name] = {"name": var.name, "value": var.value}
    return list(rendered.values())


def agent_env_from(agent: Agent) -> list[Manifest]:
    """`envFrom` as the container takes it: references to whole Secrets and ConfigMaps."""
    return [source.model_dump(exclude_none=True, exclude_defaults=True) for source in agent.spec.envFrom]


def pod_security_context() -> Manifest:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUNNER_USER,
        "runAsGroup": RUNNER_USER,
        "fsGroup": RUNNER_USER,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context() -> Manifest:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def build_service_account(agent: Agent) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {"name": resource_name(agent), "labels": agent_labels(agent.metadata.name)},
        # Agents talk to NATS, not to the Kubernetes API: no token in their pods.
        "automountServiceAccountToken": False,
    }


def build_deployment(
    agent: Agent,
    *,
    nats_url: str,
    replicas: int,
    log_format: str = "json",
    nats_creds: tuple[str, str] | None = None,
    models: Mapping[str, ModelSpec] | None = None,
    nats_ca: str | None = None,
    otel_env: Mapping[str, str] | None = None,
    otel_headers: tuple[str, str] | None = None,
) -> Manifest:
    """The Deployment running an Agent's replicas; `replicas` is decided by the caller
    (the spec, or the autoscaler when `spec.autoscaling` is set). `nats_creds` is the
    (Secret name, key) of a NATS credentials file to mount, when NATS wants one;
    `nats_ca` the key of the NATS CA (TLS) in that same Secret; `otel_env` and
    `otel_headers` the operator's trace collector (`tracing_env`)."""
    if not agent.spec.image:
        raise SpecError("spec.image", "an Agent needs an image to run in a cluster")
    name = agent.metadata.name
    labels = agent_labels(name)
    container: Manifest = {
        "name": "agent",
        "image": agent.spec.image,
        "env": agent_env(
            agent,
            nats_url=nats_url,
            log_format=log_format,
            nats_creds=nats_creds,
            models=models,
            nats_ca=nats_ca if nats_creds is not None else None,
            otel_env=otel_env,
            otel_headers=otel_headers,
        ),
        "securityContext": container_security_context(),
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
        # An agent that exits non-zero leaves the tail of its log (80 lines, 2 KiB) in its
        # status, where the operator reads why it crash-loops (pods.py) with no log access.
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if agent.spec.envFrom:
        container["envFrom"] = agent_env_from(agent)
    if agent.spec.command:
        container["command"] = list(agent.spec.command)
    if agent.spec.resources:
        container["resources"] = agent.spec.resources
    if agent.spec.metrics and agent.spec.metrics.enabled:
        container["ports"] = [
            {"name": "metrics", "containerPort": agent.spec.metrics.port, "protocol": "TCP"}
        ]
    pod_spec: Manifest = {
        "serviceAccountName": service_account_name(agent),
        "securityContext": pod_security_context(),
        # The SDK drains in-flight tasks for 25 s on SIGTERM; leave it that and a margin.
        "terminationGracePeriodSeconds": 30,
        "containers": [container],
        "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}}],
    }
    if nats_creds is not None:
        secret, key = nats_creds
        items = [{"key": k, "path": k} for k in (key, nats_ca) if k is not None]
        container["volumeMounts"].append(
            {"name": "nats-creds", "mountPath": NATS_CREDS_DIR, "readOnly": True}
        )
        pod_spec["volumes"].append(
            {
                "name": "nats-creds",
                # 0440 and the pod's fsGroup: readable by the agent's user, by no one else.
                "secret": {"secretName": secret, "defaultMode": 0o440, "items": items},
            }
        )
    if not agent.spec.serviceAccountName:
        # Our own ServiceAccount has no API permissions: mount no token. A user-chosen
        # account decides for itself (it may be there precisely for its token).
        pod_spec["automountServiceAccountToken"] = False
    template: Manifest = {"metadata": {"labels": labels}, "spec": pod_spec}
    if agent.spec.podTemplate:
        merge_pod_template(template, agent.spec.podTemplate)
    deployment: Manifest = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": resource_name(agent), "labels": labels, "annotations": {}},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": agent_selector(name)},
            # Replicas are competing consumers of one durable: a rolling update never
            # loses a task (unacknowledged ones are redelivered), so roll fast.
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"},
            },
            "template": template,
        },
    }
    return stamp(deployment)


def merge_pod_template(template: Manifest, partial: Manifest) -> None:
    """Merge a user's partial PodTemplateSpec (`spec.podTemplate`, already checked by the
    model: it overrides nothing Cadenza owns) into the Deployment's pod template: lists
    (volumes, mounts, tolerations, imagePullSecrets) are appended to, maps are merged with
    Cadenza's own keys winning (the selector label, the securityContext floor)."""
    meta = partial.get("metadata") or {}
    for key in ("labels", "annotations"):
        if meta.get(key):
            template["metadata"][key] = {**meta[key], **template["metadata"].get(key, {})}
    spec = dict(partial.get("spec") or {})
    pod_spec = template["spec"]
    container = pod_spec["containers"][0]
    for given in spec.pop("containers", None) or []:
        override = {k: v for k, v in given.items() if k != "name"}
        container["volumeMounts"] += override.pop("volumeMounts", None) or []
        if "securityContext" in override:
            container["securityContext"] = {**override.pop("securityContext"), **container["securityContext"]}
        container.update(override)  # probes and resources
    pod_spec["volumes"] += spec.pop("volumes", None) or []
    if "securityContext" in spec:
        pod_spec["securityContext"] = {**spec.pop("securityContext"), **pod_spec["securityContext"]}
    pod_spec.update(spec)


def build_metrics_service(agent: Agent) -> Manifest | None:
    """A Service selecting the agent's pods on their metrics port, or None when disabled."""
    metrics = agent.spec.metrics
    if metrics is None or not metrics.enabled:
        return None
    service: Manifest = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": resource_name(agent),
            "labels": agent_labels(agent.metadata.name),
            "annotations": {},
        },
        "spec": {
            "type": "ClusterIP",
            "selector": agent_selector(agent.metadata.name),
            "ports": [{"name": "metrics", "port": metrics.port, "targetPort": "metrics", "protocol": "TCP"}],
        },
    }
    return stamp(service)


def stamp(manifest: Manifest) -> Manifest:
    """Record the manifest's spec hash on it (again after `kopf.adopt` added the owner's labels)."""
    manifest["metadata"].setdefault("annotations", {})[SPEC_HASH_ANNOTATION] = spec_hash(manifest)
    return manifest


def spec_hash(manifest: Manifest) -> str:
    """A digest of what the operator decides about an object, replicas excluded.

    Compared with the annotation on the live object to decide whether to patch: the API
    server adds defaults to what it stores, so comparing objects field by field would see
    a difference on every pass and patch forever.
    """
    decided = {k: v for k, v in manifest.items() if k not in ("metadata", "status")}
    decided["labels"] = manifest.get("metadata", {}).get("labels", {})
    spec = dict(decided.get("spec") or {})
    spec.pop("replicas", None)  # owned by the autoscaler, patched on its own
    decided["spec"] = spec
    raw = json.dumps(decided, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(raw).hexdigest()[:16]
