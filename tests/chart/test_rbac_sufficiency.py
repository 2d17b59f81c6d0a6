"""RBAC sufficiency: the chart grants every Kubernetes API request the operator makes
(recorded by the API emulator while the real operator runs a representative scenario),
and nothing it does not make."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ..operator.scenarios import collect_operator_requests
from .rbac import Rule, allows, rendered_rules, rules_of
from .render import render, scenario_values

Permission = tuple[str, str, str, str | None]
CLUSTER_SCOPED = {("apiextensions.k8s.io", "customresourcedefinitions")}
# Granted without the scenario using them, each for a stated reason: kopf peering is off
# in the emulator scenario (standalone), and the chart grants it when peering is on.
PEERING = {
    ("kopf.dev", resource, verb)
    for resource in ("kopfpeerings", "clusterkopfpeerings")
    for verb in ("get", "list", "watch", "patch", "create")
}


@pytest.fixture(scope="module")
def used() -> Iterator[set[Permission]]:
    requests = collect_operator_requests()
    assert requests, "the scenario made no API request"
    yield requests


def _granted(rules: list[Rule]) -> set[tuple[str, str, str]]:
    return {(r.api_group, r.resource, r.verb) for r in rules}


def _as_grants(used: set[Permission]) -> set[tuple[str, str, str]]:
    return {(group, f"{resource}/{sub}" if sub else resource, verb) for verb, group, resource, sub in used}


def test_cluster_wide_rbac_allows_every_request_the_operator_made(used: set[Permission]) -> None:
    rules = rendered_rules()
    missing = [p for p in sorted(used, key=str) if not allows(rules, p[0], p[1], p[2], p[3])]
    assert not missing, f"the chart's RBAC refuses what the operator does: {missing}"


def test_cluster_wide_rbac_grants_nothing_more(used: set[Permission]) -> None:
    extra = _granted(rendered_rules()) - _as_grants(used) - PEERING
    assert not extra, f"granted but never used by the operator: {sorted(extra)}"


def test_namespaced_rbac_allows_every_request_in_each_watched_namespace(used: set[Permission]) -> None:
    values = scenario_values("namespaced")
    rules = rules_of(render(values))
    for namespace in values["watchNamespaces"]:
        for verb, group, resource, sub in used:
            where = None if (group, resource) in CLUSTER_SCOPED else namespace
            assert allows(rules, verb, group, resource, sub, namespace=where), (
                verb,
                group,
                resource,
                sub,
                where,
            )
    assert _granted(rules) - _as_grants(used) - PEERING == set()
