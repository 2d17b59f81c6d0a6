"""The CRDs generated from the models: no drift, valid CustomResourceDefinitions, structural
schemas a real API server accepts, CEL rules that say what they mean, and the examples
accepted by the schemas."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cel
import jsonschema
import kubernetes_validate
import pytest
import yaml
from cadenza_operator import crds
from cadenza_operator.crds import CRD_FILES, CrdError, build_crds, model_schema, write_crds
from pydantic import BaseModel, Field

ROOT = Path(__file__).resolve().parents[2]
CRDS = ROOT / "crds"
CHART_CRDS = ROOT / "charts" / "cadenza" / "files" / "crds"
EXAMPLES = ROOT / "examples"


def _schema(kind: str) -> dict[str, Any]:
    (crd,) = [c for c in build_crds() if c["spec"]["names"]["kind"] == kind]
    schema: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def _nodes(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, node
    for name, prop in (node.get("properties") or {}).items():
        yield from _nodes(prop, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from _nodes(node["items"], f"{path}[*]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _nodes(node["additionalProperties"], f"{path}{{*}}")


def test_committed_crds_match_the_models(tmp_path: Path) -> None:
    """CI's drift check: regenerate and compare byte for byte, chart copies included."""
    written = write_crds(tmp_path / "crds", chart_dir=tmp_path / "chart")
    assert sorted(p.name for p in written) == sorted(CRD_FILES * 2)
    for name in CRD_FILES:
        fresh = (tmp_path / "crds" / name).read_bytes()
        assert (tmp_path / "chart" / name).read_bytes() == fresh
        assert (CRDS / name).read_bytes() == fresh, f"crds/{name} is stale: run `cadenza crds`"
        assert (CHART_CRDS / name).read_bytes() == fresh, f"chart copy of {name} is stale: run `cadenza crds`"


def test_generation_is_deterministic(tmp_path: Path) -> None:
    write_crds(tmp_path / "a")
    write_crds(tmp_path / "b")
    for name in CRD_FILES:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


@pytest.mark.parametrize("name", CRD_FILES)
@pytest.mark.parametrize("version", ["1.28", "1.30", "1.33"])
def test_crds_are_valid_custom_resource_definitions(name: str, version: str) -> None:
    document = yaml.safe_load((CRDS / name).read_text())
    kubernetes_validate.validate(document, version, strict=True)


def test_kubernetes_validate_would_catch_a_broken_crd() -> None:
    broken = copy.deepcopy(build_crds()[0])
    broken["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["minimum"] = "low"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, "1.30", strict=True)


@pytest.mark.parametrize("kind", ["Agent", "Workflow", "WorkflowRun"])
def test_schemas_are_structural_and_described(kind: str) -> None:
    """What the API server demands of a structural schema, and `kubectl explain` of us."""
    for path, node in _nodes(_schema(kind)):
        assert "$ref" not in node and "$defs" not in node, path
        assert "anyOf" not in node and "oneOf" not in node and "allOf" not in node, path
        assert node.get("type") or node.get("x-kubernetes-preserve-unknown-fields"), f"{path}: no type"
        assert not ("properties" in node and "additionalProperties" in node), path
        assert node.get("additionalProperties") is not False, path
        assert "title" not in node and "examples" not in node, path
        assert node.get("default", 0) is not None, f"{path}: default null"
        for name, prop in (node.get("properties") or {}).items():
            assert prop.get("description"), f"{path}.{name} has no description"


def test_optional_fields_are_nullable_and_free_form_fields_preserved() -> None:
    spec = _schema("Workflow")["properties"]["spec"]
    step = spec["properties"]["steps"]["items"]
    assert step["properties"]["agent"] == {
        "description": "Agent that executes the step.",
        "type": "string",
        "nullable": True,
    }
    assert step["properties"]["input"]["x-kubernetes-preserve-unknown-fields"] is True
    assert "type" not in step["properties"]["input"]  # any JSON value, scalars included
    assert spec["properties"]["inputSchema"]["x-kubernetes-preserve-unknown-fields"] is True
    assert _schema("Agent")["properties"]["spec"]["properties"]["resources"][
        "x-kubernetes-preserve-unknown-fields"
    ]
    assert _schema("WorkflowRun")["properties"]["spec"]["properties"]["input"][
        "x-kubernetes-preserve-unknown-fields"
    ]
    assert step["properties"]["approval"]["properties"]["onTimeout"]["enum"] == ["approve", "reject"]


def test_names_columns_and_subresources() -> None:
    by_kind = {c["spec"]["names"]["kind"]: c for c in build_crds()}
    expected = {
        "Agent": ("agents", ["ag"], ["Ready", "Replicas", "Pending", "Age"]),
        "Workflow": ("workflows", ["wf"], ["Steps", "Active", "Last-Run", "Age"]),
        "WorkflowRun": (
            "workflowruns",
            ["wfr"],
            ["Workflow", "Phase", "Progress", "Duration", "Tokens", "Age"],
        ),
    }
    for kind, (plural, short, columns) in expected.items():
        crd = by_kind[kind]
        assert crd["metadata"]["name"] == f"{plural}.cadenza.dev"
        assert crd["spec"]["scope"] == "Namespaced"
        assert crd["spec"]["names"]["shortNames"] == short
        assert crd["spec"]["names"]["categories"] == ["cadenza"]
        (version,) = crd["spec"]["versions"]
        assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
        assert version["subresources"] == {"status": {}}
        shown = [c["name"] for c in version["additionalPrinterColumns"] if not c.get("priority")]
        assert shown == columns


def _rules(node: dict[str, Any]) -> list[Any]:
    return [cel.compile(r["rule"]) for r in node.get("x-kubernetes-validations", [])]


def _admits(node: dict[str, Any], value: dict[str, Any]) -> bool:
    return all(program.execute({"self": value}) for program in _rules(node))


def test_step_rules() -> None:
    step = _schema("Workflow")["properties"]["spec"]["properties"]["steps"]["items"]
    assert len(_rules(step)) == 3
    assert _admits(step, {"name": "a", "agent": "x"})
    assert _admits(step, {"name": "a", "approval": {}})
    assert _admits(step, {"name": "a", "waitFor": {"signal": "go"}})
    assert _admits(step, {"name": "a", "workflow": "child", "forEach": "input.xs", "maxParallel": 2})
    assert not _admits(step, {"name": "a"})
    assert not _admits(step, {"name": "a", "agent": "x", "approval": {}})
    assert not _admits(step, {"name": "a", "agent": "x", "maxParallel": 3})
    assert not _admits(step, {"name": "a", "approval": {}, "forEach": "input.xs"})


def test_autoscaling_and_trigger_rules() -> None:
    autoscaling = _schema("Agent")["properties"]["spec"]["properties"]["autoscaling"]
    assert _admits(autoscaling, {"minReplicas": 0, "maxReplicas": 3})
    assert _admits(autoscaling, {"minReplicas": 3, "maxReplicas": 3})
    assert not _admits(autoscaling, {"minReplicas": 4, "maxReplicas": 3})
    trigger = _schema("Workflow")["properties"]["spec"]["properties"]["triggers"]["items"]
    assert _admits(trigger, {"nats": {"subject": "a"}})
    assert not _admits(trigger, {})
    assert not _admits(trigger, {"nats": {"subject": "a"}, "schedule": {"cron": "* * * * *"}})


def _as_json_schema(node: Any) -> Any:
    """The OpenAPI dialect of a CRD schema as JSON Schema (nullable -> a null type)."""
    if isinstance(node, list):
        return [_as_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {
        k: _as_json_schema(v) for k, v in node.items() if not k.startswith("x-kubernetes") and k != "nullable"
    }
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if (
        out.get("type") == "object"
        and "properties" in out
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False  # what pruning would remove, the test calls an error
    return out


def _example_documents() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(EXAMPLES.rglob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if isinstance(d, dict) and "kind" in d]
    return [d for d in docs if d.get("apiVersion") == "cadenza.dev/v1alpha1"]


def test_the_examples_are_accepted_by_the_schemas() -> None:
    docs = _example_documents()
    assert {d["kind"] for d in docs} >= {"Agent", "Workflow"}
    for doc in docs:
        schema = _as_json_schema(_schema(doc["kind"]))
        jsonschema.validate(doc, schema)


def test_the_schemas_reject_what_the_models_reject() -> None:
    schema = _as_json_schema(_schema("Workflow"))
    good = {
        "apiVersion": "cadenza.dev/v1alpha1",
        "kind": "Workflow",
        "metadata": {"name": "w"},
        "spec": {"steps": [{"name": "a", "agent": "x", "timeout": "30s"}]},
    }
    jsonschema.validate(good, schema)
    for broken in (
        {"steps": []},
        {"steps": [{"name": "Bad-Name", "agent": "x"}]},
        {"steps": [{"name": "a", "agent": "x", "timeout": "soon"}]},
        {"steps": [{"name": "a", "agent": "x", "typo": 1}]},
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({**good, "spec": broken}, schema)


def test_generator_refuses_an_undescribed_field() -> None:
    class Undocumented(BaseModel):
        """A model whose field has no description."""

        size: int = 1

    with pytest.raises(CrdError, match="description"):
        model_schema(Undocumented)


def test_generator_refuses_a_real_union() -> None:
    class Either(BaseModel):
        """A union the API server cannot check structurally."""

        value: int | str = Field(0, description="Either.")

    with pytest.raises(CrdError, match="union"):
        model_schema(Either)


def test_cli_writes_crds_and_chart_copies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cadenza_operator.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["crds"]) == 0
    for name in CRD_FILES:
        text = (tmp_path / "crds" / name).read_text()
        assert text.startswith(crds.HEADER)
        assert (tmp_path / "charts" / "cadenza" / "files" / "crds" / name).read_text() == text
