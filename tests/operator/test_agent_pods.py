"""An Agent's pod: secret and ConfigMap references, envFrom and a podTemplate merged into
its Deployment, which still validates against the Kubernetes schema; what Cadenza owns
cannot be overridden (an error naming the field, exit 2 in `cadenza validate`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from cadenza_operator.cli import main
from cadenza_operator.kube import builders
from cadenza_operator.models import Agent
from pydantic import ValidationError

POD_TEMPLATE: dict[str, Any] = {
    "metadata": {"labels": {"team": "a", "cadenza.dev/agent": "impostor"}, "annotations": {"note": "x"}},
    "spec": {
        "volumes": [{"name": "models", "persistentVolumeClaim": {"claimName": "models"}}],
        "imagePullSecrets": [{"name": "registry"}],
        "nodeSelector": {"gpu": "true"},
        "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}
                    ]
                }
            }
        },
        "securityContext": {"runAsUser": 1000, "supplementalGroups": [2000]},
        "containers": [
            {
                "name": "agent",
                "volumeMounts": [{"name": "models", "mountPath": "/models", "readOnly": True}],
                "readinessProbe": {"exec": {"command": ["true"]}, "periodSeconds": 10},
                "resources": {"limits": {"memory": "1Gi"}},
                "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True},
            }
        ],
    },
}


def _agent(**spec: Any) -> Agent:
    return Agent.model_validate(
        {"metadata": {"name": "classifier", "namespace": "team-a"}, "spec": {"image": "img:1", **spec}}
    )


def _deployment(agent: Agent) -> dict[str, Any]:
    return builders.build_deployment(
        agent, nats_url="nats://nats:4222", replicas=1, nats_creds=("nats-creds", "agent.creds")
    )


def test_secret_and_configmap_references_are_rendered_as_references() -> None:
    agent = _agent(
        env=[
            {"name": "OPENAI_API_KEY", "valueFrom": {"secretKeyRef": {"name": "llm-keys", "key": "openai"}}},
            {"name": "REGION", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "region"}}},
            {"name": "MODEL", "value": "big"},
        ],
        envFrom=[{"secretRef": {"name": "more-keys"}}, {"configMapRef": {"name": "tuning"}, "prefix": "T_"}],
    )
    (container,) = _deployment(agent)["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["OPENAI_API_KEY"] == {
        "name": "OPENAI_API_KEY",
        "valueFrom": {"secretKeyRef": {"name": "llm-keys", "key": "openai"}},
    }
    assert env["REGION"]["valueFrom"] == {"configMapKeyRef": {"name": "settings", "key": "region"}}
    assert env["MODEL"] == {"name": "MODEL", "value": "big"}
    assert container["envFrom"] == [
        {"secretRef": {"name": "more-keys"}},
        {"configMapRef": {"name": "tuning"}, "prefix": "T_"},
    ]


def test_pod_template_is_merged_and_cadenza_keeps_what_it_owns() -> None:
    deployment = _deployment(_agent(command=["python", "agents.py"], podTemplate=POD_TEMPLATE))
    template = deployment["spec"]["template"]
    pod = template["spec"]
    (container,) = pod["containers"]
    assert template["metadata"]["labels"]["team"] == "a"
    assert template["metadata"]["labels"]["cadenza.dev/agent"] == "classifier"  # the selector's label wins
    assert template["metadata"]["annotations"] == {"note": "x"}
    assert [v["name"] for v in pod["volumes"]] == ["tmp", "nats-creds", "models"]
    assert [m["name"] for m in container["volumeMounts"]] == ["tmp", "nats-creds", "models"]
    assert pod["imagePullSecrets"] == [{"name": "registry"}]
    assert pod["nodeSelector"] == {"gpu": "true"}
    assert pod["tolerations"][0]["key"] == "gpu"
    assert "nodeAffinity" in pod["affinity"]
    assert pod["securityContext"]["runAsUser"] == builders.RUNNER_USER  # the floor wins
    assert pod["securityContext"]["supplementalGroups"] == [2000]
    assert container["readinessProbe"]["periodSeconds"] == 10
    assert container["resources"] == {"limits": {"memory": "1Gi"}}
    assert container["command"] == ["python", "agents.py"]
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert container["securityContext"]["runAsNonRoot"] is True


@pytest.mark.parametrize("version", ["1.30", kubernetes_validate.latest_version()])
def test_the_merged_deployment_validates_against_the_kubernetes_schema(version: str) -> None:
    agent = _agent(
        command=["python", "agents.py"],
        env=[{"name": "KEY", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}],
        envFrom=[{"secretRef": {"name": "more"}}],
        podTemplate=POD_TEMPLATE,
    )
    kubernetes_validate.validate(_deployment(agent), version, strict=True)


def test_a_misspelt_pod_template_field_fails_the_kubernetes_schema() -> None:
    agent = _agent(podTemplate={"spec": {"nodeSelectr": {"gpu": "true"}}})
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(_deployment(agent), "1.30", strict=True)


@pytest.mark.parametrize(
    ("template", "field"),
    [
        (
            {"spec": {"containers": [{"name": "agent", "command": ["sh"]}]}},
            "podTemplate.spec.containers[0].command",
        ),
        ({"spec": {"containers": [{"args": ["x"]}]}}, "podTemplate.spec.containers[0].args"),
        (
            {"spec": {"containers": [{"env": [{"name": "CADENZA_NATS_CREDS", "value": "/x"}]}]}},
            "containers[0].env",
        ),
        (
            {"spec": {"containers": [{"securityContext": {"allowPrivilegeEscalation": True}}]}},
            "containers[0].securityContext",
        ),
        (
            {"spec": {"containers": [{"securityContext": {"capabilities": {"add": ["NET_ADMIN"]}}}]}},
            "containers[0].securityContext.capabilities",
        ),
        ({"spec": {"securityContext": {"runAsNonRoot": False}}}, "podTemplate.spec.securityContext"),
        ({"spec": {"volumes": [{"name": "nats-creds", "emptyDir": {}}]}}, "podTemplate.spec.volumes[0].name"),
        ({"spec": {"serviceAccountName": "admin"}}, "podTemplate.spec.serviceAccountName"),
        ({"spec": {"initContainers": [{"name": "root", "image": "x"}]}}, "podTemplate.spec.initContainers"),
        ({"spec": {"containers": [{"name": "sidecar"}]}}, "podTemplate.spec.containers[0].name"),
    ],
)
def test_what_cadenza_owns_cannot_be_overridden(template: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as caught:
        _agent(podTemplate=template)
    assert field in str(caught.value)


def test_nats_credentials_are_not_an_env_entry() -> None:
    with pytest.raises(ValidationError, match="CADENZA_NATS_CREDS"):
        _agent(env=[{"name": "CADENZA_NATS_CREDS", "value": "/tmp/mine"}])


def test_a_reference_needs_exactly_one_source() -> None:
    with pytest.raises(ValidationError, match="exactly one"):
        _agent(env=[{"name": "X", "valueFrom": {}}])
    with pytest.raises(ValidationError, match="value or valueFrom"):
        _agent(env=[{"name": "X", "value": "a", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}])


def test_cadenza_validate_names_the_overridden_field_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = {
        "apiVersion": "cadenza.dev/v1alpha1",
        "kind": "Agent",
        "metadata": {"name": "classifier"},
        "spec": {
            "command": ["python", "a.py"],
            "podTemplate": {"spec": {"containers": [{"command": ["sh"]}]}},
        },
    }
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(manifest))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "agent.yaml" in err and "Agent/classifier" in err
    assert "podTemplate.spec.containers[0].command" in " ".join(err.split())
    assert "Traceback" not in err
