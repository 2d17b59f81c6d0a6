"""What the monitoring tests compare: the series the operator exports (read from the
prometheus_client objects in cadenza_operator.metrics, so a new metric is covered without
editing a list) and the series the chart's PrometheusRule and Grafana dashboard select
(read from the parsed PromQL, not by substring, so a histogram named without `_bucket`,
`_sum` or `_count` is caught)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import promql_parser
from cadenza_operator import metrics
from prometheus_client import Counter, Gauge, Histogram

from ..chart.render import CHART, one, render

# Labels a scrape adds to every series: a selector or a grouping may name them too.
TARGET_LABELS = frozenset({"namespace", "instance", "job", "pod", "service", "container", "endpoint"})
# Grafana's variables, as the dashboard would send them with "All" selected.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$namespace": ".*", "$workflow": ".*"}


@dataclass(frozen=True)
class Metric:
    name: str  # as defined, e.g. cadenza_step_retries (prometheus_client drops _total)
    kind: str  # counter | gauge | histogram
    labels: frozenset[str]

    @property
    def series(self) -> set[str]:
        """The names Prometheus stores for it."""
        if self.kind == "counter":
            return {f"{self.name}_total"}
        if self.kind == "histogram":
            return {f"{self.name}_{suffix}" for suffix in ("bucket", "sum", "count")}
        return {self.name}


def exported() -> dict[str, Metric]:
    """Every cadenza_ metric the operator defines, by its defined name."""
    found = {}
    for value in vars(metrics).values():
        if isinstance(value, Counter | Gauge | Histogram) and value._name.startswith("cadenza_"):
            found[value._name] = Metric(value._name, value._type, frozenset(value._labelnames))
    return found


def series_index() -> dict[str, Metric]:
    """Stored series name -> its metric."""
    return {series: m for m in exported().values() for series in m.series}


@dataclass(frozen=True)
class Selector:
    name: str
    matchers: dict[str, str]  # label -> value (regex or exact)


@dataclass(frozen=True)
class Grouping:
    labels: tuple[str, ...]
    selected: tuple[str, ...]  # the series names under the aggregation


def _children(node: Any) -> Iterator[Any]:
    for attr in ("expr", "lhs", "rhs", "param", "vector_selector"):
        child = getattr(node, attr, None)
        if child is not None and not isinstance(child, str | int | float):
            yield child
    yield from getattr(node, "args", None) or []


def _walk(node: Any) -> Iterator[Any]:
    yield node
    for child in _children(node):
        yield from _walk(child)


def parse(query: str) -> tuple[list[Selector], list[Grouping]]:
    """The series selectors of a PromQL query, and its `by (...)` groupings with the series
    each one aggregates. A parse error raises ValueError."""
    tree = promql_parser.parse(query)
    selectors = []
    groupings = []
    for node in _walk(tree):
        if isinstance(node, promql_parser.VectorSelector):
            matchers = {m.name: m.value for m in node.matchers.matchers if m.name != "__name__"}
            selectors.append(Selector(node.name or "", matchers))  # "": no name, never exported
        elif isinstance(node, promql_parser.AggregateExpr) and str(node.modifier).startswith("by"):
            inner = tuple(
                n.name or "" for n in _walk(node.expr) if isinstance(n, promql_parser.VectorSelector)
            )
            labels = node.modifier.labels if node.modifier is not None else []
            groupings.append(Grouping(tuple(str(label) for label in labels), inner))
    return selectors, groupings


def grafana_to_promql(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return expr


def dashboard() -> dict[str, Any]:
    """The dashboard as the chart renders it into its ConfigMap."""
    objects = render({"grafana": {"dashboard": {"enabled": True}}})
    configmap = one(objects, "ConfigMap", "cadenza-dashboard")
    rendered: dict[str, Any] = json.loads(configmap["data"]["cadenza.json"])
    assert rendered == json.loads((CHART / "files" / "dashboards" / "cadenza.json").read_text())
    return rendered


def panel_queries(board: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, Grafana expression) of every panel target."""
    return [(p["title"], t["expr"]) for p in board["panels"] for t in p.get("targets", [])]


_LABEL_VALUES = re.compile(r"^label_values\((?P<selector>.+),\s*(?P<label>\w+)\)$")


def variable_queries(board: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(variable, the PromQL selector of its label_values(), the label) of every query variable."""
    found = []
    for var in board["templating"]["list"]:
        if var["type"] != "query":
            continue
        match = _LABEL_VALUES.match(var["query"]["query"])
        assert match, f"variable {var['name']}: not label_values(selector, label): {var['query']}"
        found.append((var["name"], match["selector"], match["label"]))
    return found


def alert_rules(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The rules of the rendered PrometheusRule."""
    objects = render({"prometheusRule": {"enabled": True, **(values or {})}})
    rule = one(objects, "PrometheusRule")
    return [r for group in rule["spec"]["groups"] for r in group["rules"]]


def rule_groups(values: dict[str, Any] | None = None) -> dict[str, Any]:
    """The PrometheusRule's spec as a Prometheus rule file (`groups:`)."""
    objects = render({"prometheusRule": {"enabled": True, **(values or {})}})
    return {"groups": one(objects, "PrometheusRule")["spec"]["groups"]}
