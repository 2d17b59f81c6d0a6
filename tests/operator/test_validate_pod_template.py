"""`cadenza validate` checks an Agent's podTemplate against the Kubernetes schema (the
kubernetes client's PodTemplateSpec) and refuses what Cadenza owns: a wrong type, an
unknown field or an override is exit 2 naming the file, the object and the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from cadenza_operator.cli import main
from cadenza_operator.pod_schema import pod_template_schema_errors

VALID: dict[str, Any] = {
    "metadata": {"labels": {"team": "support"}, "annotations": {"note": "x"}},
    "spec": {
        "volumes": [
            {"name": "kb", "persistentVolumeClaim": {"claimName": "kb"}},
            {"name": "scratch", "emptyDir": {"sizeLimit": "1Gi"}},
        ],
        "imagePullSecrets": [{"name": "registry"}],
        "nodeSelector": {"pool": "cpu"},
        "tolerations": [
            {"key": "gpu", "operator": "Exists", "effect": "NoSchedule", "tolerationSeconds": 60}
        ],
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}
                    ]
                }
            }
        },
        "containers": [
            {
                "name": "agent",
                "volumeMounts": [{"name": "kb", "mountPath": "/kb", "readOnly": True}],
                "readinessProbe": {"httpGet": {"path": "/healthz", "port": 8080}, "periodSeconds": 10},
                "livenessProbe": {"tcpSocket": {"port": "metrics"}},
                "resources": {"limits": {"cpu": 1, "memory": "1Gi"}, "requests": {"cpu": "250m"}},
            }
        ],
    },
}


def _validate(
    tmp_path: Path, template: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> tuple[int, str]:
    manifest = {
        "apiVersion": "cadenza.dev/v1alpha1",
        "kind": "Agent",
        "metadata": {"name": "classifier"},
        "spec": {"command": ["python", "agents.py"], "podTemplate": template},
    }
    (tmp_path / "agents.yaml").write_text(yaml.safe_dump(manifest))
    code = main(["validate", str(tmp_path / "agents.yaml")])
    return code, " ".join(capsys.readouterr().err.split())


def test_a_pod_template_within_the_schema_validates(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert pod_template_schema_errors(VALID) == []
    code, err = _validate(tmp_path, VALID, capsys)
    assert code == 0, err


@pytest.mark.parametrize(
    ("template", "field", "message"),
    [
        (
            {"spec": {"containers": [{"name": "agent", "readinessProbe": {"periodSeconds": "ten"}}]}},
            "spec.podTemplate.spec.containers[0].readinessProbe.periodSeconds",
            "expected an integer, got a string ('ten')",
        ),
        (
            {"spec": {"nodeSelector": ["pool=cpu"]}},
            "spec.podTemplate.spec.nodeSelector",
            "expected a mapping",
        ),
        (
            {"spec": {"tolerations": [{"key": "gpu", "effect": True}]}},
            "tolerations[0].effect",
            "expected a string",
        ),
        (
            {"spec": {"volumes": [{"name": "kb", "emptyDir": {"sizeLimit": []}}]}},
            "emptyDir.sizeLimit",
            "quantity",
        ),
        (
            {"spec": {"containers": [{"name": "agent", "resources": {"limits": {"memory": {"gi": 1}}}}]}},
            "resources.limits.memory",
            "expected a quantity",
        ),
    ],
)
def test_a_wrong_type_exits_2_naming_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], template: dict[str, Any], field: str, message: str
) -> None:
    code, err = _validate(tmp_path, template, capsys)
    assert code == 2
    assert "agents.yaml" in err and "Agent/classifier" in err
    assert field in err and message in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("template", "field"),
    [
        ({"spec": {"nodeSelectr": {"pool": "cpu"}}}, "spec.podTemplate.spec.nodeSelectr"),
        (
            {"spec": {"affinity": {"nodeAffinity": {"required": {}}}}},
            "spec.podTemplate.spec.affinity.nodeAffinity.required",
        ),
        (
            {"spec": {"containers": [{"name": "agent", "readinessProbe": {"httpGet": {"prot": 80}}}]}},
            "readinessProbe.httpGet.prot",
        ),
    ],
)
def test_an_unknown_field_exits_2_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], template: dict[str, Any], field: str
) -> None:
    code, err = _validate(tmp_path, template, capsys)
    assert code == 2
    assert "agents.yaml" in err and "Agent/classifier" in err
    assert field in err and "unknown field" in err


@pytest.mark.parametrize(
    ("template", "field"),
    [
        (
            {"spec": {"containers": [{"name": "agent", "command": ["sh"]}]}},
            "podTemplate.spec.containers[0].command",
        ),
        ({"spec": {"hostNetwork": True}}, "podTemplate.spec.hostNetwork"),
        ({"spec": {"securityContext": {"runAsUser": 0}}}, "podTemplate.spec.securityContext"),
    ],
)
def test_a_forbidden_override_exits_2_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], template: dict[str, Any], field: str
) -> None:
    code, err = _validate(tmp_path, template, capsys)
    assert code == 2
    assert "agents.yaml" in err and "Agent/classifier" in err and field in err
    assert "Traceback" not in err
