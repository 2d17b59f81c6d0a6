"""Loading Agent and Workflow manifests from files and folders, with errors that name
the file, the object and the field, e.g.

    workflow.yaml: Workflow/triage: spec.steps[2].dependsOn[0]: unknown step 'lokup'
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .engine.definition import CompiledWorkflow, DefinitionError, compile_workflow
from .models import GROUP_VERSION, KINDS, Agent, Workflow


@dataclass(frozen=True)
class ManifestError:
    file: str
    obj: str  # Kind/name, or "" when the document could not be identified
    path: str  # field path, or ""
    message: str

    def __str__(self) -> str:
        return ": ".join(p for p in (self.file, self.obj, self.path, self.message) if p)


class InvalidManifests(Exception):
    def __init__(self, errors: list[ManifestError]) -> None:
        super().__init__("\n".join(str(e) for e in errors))
        self.errors = errors


@dataclass
class Bundle:
    """Everything loaded from a set of paths."""

    agents: dict[str, tuple[Agent, Path]] = field(default_factory=dict)
    workflows: dict[str, tuple[Workflow, Path]] = field(default_factory=dict)
    compiled: dict[str, CompiledWorkflow] = field(default_factory=dict)

    def agent_dir(self, name: str) -> Path:
        return self.agents[name][1].parent


def loc_path(loc: tuple[Any, ...]) -> str:
    """pydantic's ('spec', 'steps', 2, 'dependsOn') -> 'spec.steps[2].dependsOn'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif str(part).startswith(("function-", "tagged-union")):
            continue
        else:
            out += f".{part}" if out else str(part)
    return out


def _files(paths: list[Path]) -> list[Path]:
    found: list[Path] = []
    for p in paths:
        if p.is_dir():
            found += sorted(
                x
                for x in p.rglob("*")
                if x.suffix in (".yaml", ".yml")
                and x.is_file()
                and not any(part.startswith(".") for part in x.relative_to(p).parts)
            )
        else:
            found.append(p)
    return found


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def load(paths: Sequence[str | Path], namespace: str = "default") -> Bundle:
    """Load and validate manifests; raise InvalidManifests listing every problem found."""
    errors: list[ManifestError] = []
    bundle = Bundle()
    for path in _files([Path(p) for p in paths]):
        shown = _display(path)
        if not path.exists():
            errors.append(ManifestError(shown, "", "", "no such file or directory"))
            continue
        try:
            docs = list(yaml.safe_load_all(path.read_text()))
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(exc, "problem", None) or str(exc)
            errors.append(ManifestError(shown, "", where, f"invalid YAML: {problem}"))
            continue
        for index, doc in enumerate(docs):
            if doc is None:
                continue
            _load_doc(doc, index, path, shown, bundle, errors)
    if not errors:
        known_agents = set(bundle.agents)
        known_workflows = set(bundle.workflows)
        for name, (wf, path) in bundle.workflows.items():
            try:
                bundle.compiled[name] = compile_workflow(
                    name, wf.spec, wf.metadata.namespace or namespace, known_agents, known_workflows
                )
            except DefinitionError as exc:
                errors.append(ManifestError(_display(path), f"Workflow/{name}", exc.path, exc.message))
        for name, (_, path) in bundle.workflows.items():
            if name in bundle.compiled:
                cycle = _sub_workflow_cycle(name, bundle)
                if cycle:
                    errors.append(
                        ManifestError(
                            _display(path),
                            f"Workflow/{name}",
                            "spec.steps",
                            f"sub-workflow cycle: {' -> '.join(cycle)}",
                        )
                    )
    if errors:
        raise InvalidManifests(errors)
    return bundle


def _load_doc(
    doc: Any, index: int, path: Path, shown: str, bundle: Bundle, errors: list[ManifestError]
) -> None:
    if not isinstance(doc, dict):
        errors.append(
            ManifestError(shown, f"document {index + 1}", "", "expected a mapping with apiVersion and kind")
        )
        return
    kind = doc.get("kind")
    name = (doc.get("metadata") or {}).get("name") if isinstance(doc.get("metadata"), dict) else None
    obj = f"{kind}/{name}" if kind and name else f"document {index + 1}"
    if kind not in KINDS:
        errors.append(
            ManifestError(
                shown, obj, "kind", f"unknown kind {kind!r} (expected Agent, Workflow or WorkflowRun)"
            )
        )
        return
    if doc.get("apiVersion") != GROUP_VERSION:
        errors.append(
            ManifestError(
                shown, obj, "apiVersion", f"expected {GROUP_VERSION!r}, got {doc.get('apiVersion')!r}"
            )
        )
        return
    try:
        model = KINDS[kind].model_validate(doc)
    except ValidationError as exc:
        for err in exc.errors():
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = "unknown field"
            errors.append(ManifestError(shown, obj, loc_path(err["loc"]), msg))
        return
    if isinstance(model, Agent):
        if model.metadata.name in bundle.agents:
            errors.append(ManifestError(shown, obj, "metadata.name", "another Agent has this name"))
        bundle.agents[model.metadata.name] = (model, path)
    elif isinstance(model, Workflow):
        if model.metadata.name in bundle.workflows:
            errors.append(ManifestError(shown, obj, "metadata.name", "another Workflow has this name"))
        bundle.workflows[model.metadata.name] = (model, path)


def _sub_workflow_cycle(start: str, bundle: Bundle) -> list[str] | None:
    def children(name: str) -> list[str]:
        return [s.workflow for s in bundle.workflows[name][0].spec.steps if s.workflow]

    stack = [(start, [start])]
    while stack:
        name, trail = stack.pop()
        for child in children(name):
            if child == start:
                return [*trail, child]
            if child not in trail and child in bundle.workflows:
                stack.append((child, [*trail, child]))
    return None
