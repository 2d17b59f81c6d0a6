"""Loading Agent, Workflow and Model manifests from files and folders, with errors that name
the file, the object and the field, e.g.

    workflow.yaml: Workflow/triage: spec.steps[2].dependsOn[0]: unknown step 'lokup'

Whatever a file holds, loading it ends in such errors, never in a traceback: a file is
read only up to MAX_MANIFEST_BYTES, must be UTF-8, and its YAML is bounded in nesting and
in the size its aliases expand to (`BoundedLoader`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from yaml.events import AliasEvent
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from .engine.definition import CompiledWorkflow, DefinitionError, compile_workflow
from .models import GROUP_VERSION, KINDS, Agent, Model, Workflow
from .pod_schema import pod_template_schema_errors

MAX_MANIFEST_BYTES = 4 * 1024 * 1024
"""Largest manifest file read; the Kubernetes API server takes requests of up to 3 MiB."""

MAX_YAML_DEPTH = 128
"""Deepest nesting of a YAML document. PyYAML's composer recurses three frames per level
(20,000 levels raised RecursionError); this leaves room for a value nested
models.MAX_VALUE_DEPTH levels inside a manifest, which then gets the model's own message."""

MAX_EXPANDED_SIZE = 4 * MAX_MANIFEST_BYTES
"""Largest size (nodes plus scalar characters) a document may reach with its aliases
expanded: an alias is a reference, but whatever walks the document as a tree (validation,
compiling templates, JSON) copies it."""


class LimitExceeded(yaml.MarkedYAMLError):
    """A document beyond one of the bounds above."""


class BoundedLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader with a bound on nesting and on alias expansion.

    Aliases make a document a graph: nine levels of nine aliases each are a few hundred
    bytes of YAML and 10^9 values once anything walks the document as a tree; a step input
    like that grew `cadenza validate` to 5.6 GB. The composer sees each node once, after
    its children, so it can add up the size every node would have with all aliases
    expanded, and stop before anything expands them.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._sizes: dict[int, int] = {}  # id(node) -> its size with aliases expanded

    def compose_document(self) -> Node | None:
        try:
            return super().compose_document()  # type: ignore[no-any-return]
        finally:
            self._sizes = {}

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        event = self.peek_event()
        mark = event.start_mark
        anchored = self.anchors.get(event.anchor) if isinstance(event, AliasEvent) else None
        if anchored is not None and id(anchored) not in self._sizes:
            # Its node is still being composed: the alias would make the value contain itself.
            raise LimitExceeded(problem="an alias refers to a node that contains it", problem_mark=mark)
        if self._depth >= MAX_YAML_DEPTH:
            raise LimitExceeded(problem=f"nested deeper than {MAX_YAML_DEPTH} levels", problem_mark=mark)
        self._depth += 1
        try:
            node: Node | None = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if node is None:
            return None
        size = self._sizes.get(id(node))
        if size is None:  # a new node: its children (aliases too) have their sizes
            if isinstance(node, ScalarNode):
                children: list[Node] = []
            elif isinstance(node, SequenceNode):
                children = node.value
            elif isinstance(node, MappingNode):
                children = [n for pair in node.value for n in pair]
            size = 1 + (len(node.value) if isinstance(node, ScalarNode) else 0)
            size += sum(self._sizes[id(child)] for child in children)
            self._sizes[id(node)] = size
        if size > MAX_EXPANDED_SIZE:
            raise LimitExceeded(
                problem=f"expands to more than {MAX_EXPANDED_SIZE:,} values and characters "
                "(aliases are copied wherever they are used)",
                problem_mark=mark,
            )
        return node


class UnreadableManifest(Exception):
    """A manifest file that is not bounded UTF-8 YAML; `error` says where (without the file)."""

    def __init__(self, error: ManifestError) -> None:
        super().__init__(str(error))
        self.error = error


def load_yaml_documents(data: bytes) -> list[Any]:
    """The documents of a manifest file, within the bounds above; UnreadableManifest for
    anything beyond them."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise UnreadableManifest(
            ManifestError("", "", "", f"larger than {MAX_MANIFEST_BYTES // (1024 * 1024)} MiB")
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        where = f"line {line}, column {column}"
        raise UnreadableManifest(
            ManifestError("", "", where, f"not UTF-8 text (byte 0x{data[exc.start]:02x})")
        ) from None
    try:
        return list(yaml.load_all(text, Loader=BoundedLoader))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        message = problem if isinstance(exc, LimitExceeded) else f"invalid YAML: {problem}"
        raise UnreadableManifest(ManifestError("", "", where, message)) from None  # the line locates it


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
    models: dict[str, tuple[Model, Path]] = field(default_factory=dict)
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
            with path.open("rb") as f:
                data = f.read(MAX_MANIFEST_BYTES + 1)  # no more than it takes to tell it is too large
            docs = load_yaml_documents(data)
        except OSError as exc:
            errors.append(ManifestError(shown, "", "", exc.strerror or str(exc)))
            continue
        except UnreadableManifest as exc:
            errors.append(replace(exc.error, file=shown))
            continue
        for index, doc in enumerate(docs):
            if doc is None:
                continue
            _load_doc(doc, index, path, shown, bundle, errors)
    if not errors:
        for name, (agent, path) in bundle.agents.items():
            for i, model_name in enumerate(agent.spec.models):
                if model_name not in bundle.models:
                    known = ", ".join(sorted(bundle.models)) or "none loaded"
                    errors.append(
                        ManifestError(
                            _display(path),
                            f"Agent/{name}",
                            f"spec.models[{i}]",
                            f"unknown Model {model_name!r} (Models: {known})",
                        )
                    )
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
    name = doc["metadata"].get("name") if isinstance(doc.get("metadata"), dict) else None
    obj = f"{kind}/{name}" if isinstance(kind, str) and isinstance(name, str) else f"document {index + 1}"
    if not isinstance(kind, str) or kind not in KINDS:
        errors.append(
            ManifestError(
                shown, obj, "kind", f"unknown kind {kind!r} (expected Agent, Workflow, WorkflowRun or Model)"
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
        if model.spec.podTemplate is not None:
            for where, message in pod_template_schema_errors(model.spec.podTemplate):
                errors.append(ManifestError(shown, obj, f"spec.podTemplate.{where}", message))
        if model.metadata.name in bundle.agents:
            errors.append(ManifestError(shown, obj, "metadata.name", "another Agent has this name"))
        bundle.agents[model.metadata.name] = (model, path)
    elif isinstance(model, Workflow):
        if model.metadata.name in bundle.workflows:
            errors.append(ManifestError(shown, obj, "metadata.name", "another Workflow has this name"))
        bundle.workflows[model.metadata.name] = (model, path)
    elif isinstance(model, Model):
        if model.metadata.name in bundle.models:
            errors.append(ManifestError(shown, obj, "metadata.name", "another Model has this name"))
        bundle.models[model.metadata.name] = (model, path)


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
