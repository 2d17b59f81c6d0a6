"""Render the Cadenza chart offline (Helm's Go SDK via helm-python-sdk) into objects."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "cadenza"
CI_SCENARIOS = sorted(p.name.removesuffix("-values.yaml") for p in (CHART / "ci").glob("*-values.yaml"))

RELEASE = "cadenza"
NAMESPACE = "cadenza-system"


def scenario_values(scenario: str) -> dict[str, Any]:
    """The values of one `ci/<scenario>-values.yaml` file."""
    return helm.values_from_yaml((CHART / "ci" / f"{scenario}-values.yaml").read_text())


@functools.cache
def _render_cached(values_json: str, release: str, namespace: str) -> dict[str, str]:
    with helm.Chart.load(CHART) as chart:
        return chart.render(json.loads(values_json), name=release, namespace=namespace, is_install=True)


def render_files(
    values: dict[str, Any] | None = None, *, release: str = RELEASE, namespace: str = NAMESPACE
) -> dict[str, str]:
    """Template path -> rendered text, NOTES.txt included."""
    return dict(_render_cached(json.dumps(values or {}, sort_keys=True), release, namespace))


def render(
    values: dict[str, Any] | None = None, *, release: str = RELEASE, namespace: str = NAMESPACE
) -> list[dict[str, Any]]:
    """Every object the chart renders (hooks included), in template order."""
    objects: list[dict[str, Any]] = []
    for path, text in sorted(render_files(values, release=release, namespace=namespace).items()):
        if path.endswith("NOTES.txt"):
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects


def of_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    """The single object of `kind` (and `name`); fails the test when there are none or several."""
    found = [o for o in of_kind(objects, kind) if name is None or o["metadata"]["name"] == name]
    assert len(found) == 1, (
        f"expected one {kind} {name or ''}, found {[o['metadata']['name'] for o in found]}"
    )
    return found[0]
