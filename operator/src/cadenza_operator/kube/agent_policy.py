"""Which images and ServiceAccounts an Agent may run with, per namespace.

Creating an Agent runs a container: without a policy, anyone allowed to create Agents in
a namespace runs any image under any ServiceAccount of it (with that account's API
rights). A platform team sets allow-lists in the chart (`agentPolicy`), which reach the
operator as JSON in CADENZA_AGENT_IMAGES and CADENZA_AGENT_SERVICE_ACCOUNTS: a namespace
(or `*`, for every namespace not named) -> glob patterns (`fnmatch`, e.g.
`ghcr.io/acme/*`). A namespace with no entry and no `*` is unrestricted.

The check reads the Deployment the operator built, after the Agent's `podTemplate` was
merged in (the model already refuses an image, a ServiceAccount or another container set
through the template; what runs is checked all the same). The ServiceAccount the
operator creates for an Agent that names none has no rights and is always allowed.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Iterator, Mapping
from typing import Any

Patterns = Mapping[str, tuple[str, ...]]


def parse_patterns(var: str, raw: str) -> dict[str, tuple[str, ...]]:
    """`{"namespace": ["pattern", ...]}` from the environment variable `var`; ValueError
    naming the variable when it is not that."""
    if not raw.strip():
        return {}
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"{var}: not JSON ({exc})") from None
    if not isinstance(doc, dict) or not all(
        isinstance(ns, str) and isinstance(p, list) and all(isinstance(x, str) for x in p)
        for ns, p in doc.items()
    ):
        raise ValueError(f'{var}: expected {{"namespace": ["pattern", ...]}}, got {raw[:200]!r}')
    return {ns: tuple(p) for ns, p in doc.items()}


def _allowed(patterns: Patterns, namespace: str, value: str) -> tuple[bool, tuple[str, ...]]:
    scoped = patterns.get(namespace, patterns.get("*"))
    if scoped is None:
        return True, ()
    return any(fnmatch.fnmatchcase(value, p) for p in scoped), scoped


def _images(pod: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    for kind in ("containers", "initContainers"):
        for i, container in enumerate(pod.get(kind) or []):
            yield f"{kind}[{i}]", str(container.get("image") or "")


def _refused(what: str, value: str, namespace: str, allowed: tuple[str, ...]) -> str:
    return f"{what} {value!r} is not allowed in namespace {namespace} (allowed: {', '.join(allowed)})"


def violations(
    deployment: Mapping[str, Any], namespace: str, images: Patterns, accounts: Patterns, own_account: str
) -> list[tuple[str, str]]:
    """(field, message) for each image or ServiceAccount of the Deployment's pods that the
    namespace's allow-lists do not admit."""
    pod = deployment["spec"]["template"]["spec"]
    found = []
    for where, image in _images(pod):
        ok, allowed = _allowed(images, namespace, image)
        if not ok:
            field = "spec.image" if where == "containers[0]" else f"spec.podTemplate.spec.{where}.image"
            found.append((field, _refused("image", image, namespace, allowed)))
    account = str(pod.get("serviceAccountName") or "default")
    if account != own_account:
        ok, allowed = _allowed(accounts, namespace, account)
        if not ok:
            found.append(("spec.serviceAccountName", _refused("ServiceAccount", account, namespace, allowed)))
    return found
