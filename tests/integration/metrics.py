"""Reading this process's Prometheus registry in tests: the engine the tests run in-process
records into prometheus_client's global REGISTRY."""

from __future__ import annotations

from prometheus_client import REGISTRY


def summed(name: str, labels: dict[str, str]) -> float:
    """The samples of `name` whose labels include `labels`, summed over the rest (the
    workload_namespace of whichever namespace the test's runs had)."""
    return sum(
        s.value
        for m in REGISTRY.collect()
        for s in m.samples
        if s.name == name and labels.items() <= s.labels.items()
    )
