"""Every series the chart's alerts and dashboard select is one the operator exports, under
the labels it has; every metric the operator exports is on a panel; the dashboard filters
by the workload's namespace and workflow wherever the series carry them.

The queries are parsed (promql-parser) and the exported names read from the
prometheus_client objects: a histogram selected by its bare name, a `namespace` matcher
on a series that has `workload_namespace`, or a new metric without a panel all fail."""

from __future__ import annotations

import pytest
from cadenza_operator.metrics import NS

from .promql import (
    TARGET_LABELS,
    alert_rules,
    dashboard,
    exported,
    grafana_to_promql,
    panel_queries,
    parse,
    series_index,
    variable_queries,
)

# The dashboard's variable for each label it filters by.
FILTERS = {NS: "$namespace", "workflow": "$workflow"}


def problems(query: str, *, grafana: bool) -> list[str]:
    """What is wrong with one query; empty when every series it selects is exported and
    every label it names is one those series have."""
    index = series_index()
    selectors, groupings = parse(query.replace("$__rate_interval", "1m"))
    found = []
    for sel in selectors:
        metric = index.get(sel.name)
        if metric is None:
            defined = exported().get(sel.name)
            hint = f" (a {defined.kind}: select {sorted(defined.series)})" if defined else ""
            found.append(f"selects {sel.name}, a series the operator does not export{hint}")
            continue
        # A series with workload_namespace must not be matched on the scrape's namespace.
        scrape = TARGET_LABELS - {"namespace"} if NS in metric.labels else TARGET_LABELS
        allowed = set(metric.labels | scrape)
        if sel.name.endswith("_bucket"):
            allowed |= {"le"}
        for label in sel.matchers:
            if label not in allowed:
                found.append(f"{sel.name}: matches on {label!r}, a label it does not have")
        if grafana:
            for label, variable in FILTERS.items():
                if label in metric.labels and sel.matchers.get(label) != variable:
                    found.append(f'{sel.name}: not filtered by {label}=~"{variable}"')
    for group in groupings:
        metrics = [index[name] for name in group.selected if name in index]
        labels: set[str] = set().union(*(m.labels for m in metrics))
        workload = any(NS in m.labels for m in metrics)
        allowed = labels | set(TARGET_LABELS - {"namespace"} if workload else TARGET_LABELS)
        if any(name.endswith("_bucket") for name in group.selected):
            allowed |= {"le"}
        for label in group.labels:
            if label not in allowed:
                found.append(f"groups {group.selected} by {label!r}, a label they do not have")
    return found


def test_every_series_an_alert_selects_is_exported_with_the_labels_used() -> None:
    rules = alert_rules()
    assert rules
    for rule in rules:
        assert problems(rule["expr"], grafana=False) == [], rule["alert"]


def test_every_series_a_panel_selects_is_exported_and_filtered_by_the_variables() -> None:
    queries = panel_queries(dashboard())
    assert queries
    for title, expr in queries:
        assert problems(expr, grafana=True) == [], f"panel {title!r}: {expr}"


@pytest.mark.parametrize(
    ("query", "wrong"),
    [
        # The defect the lag panel and alert had: a histogram by its bare name is no series.
        ("max(cadenza_engine_event_lag_seconds)", "does not export"),
        ("histogram_quantile(0.9, sum by (le) (rate(cadenza_step_queue_seconds[5m])))", "does not export"),
        ("sum(rate(cadenza_step_retries[5m]))", "does not export"),  # a counter without _total
        ('sum(cadenza_active_runs{namespace=~"$namespace", workflow=~"$workflow"})', "namespace"),
        ("sum by (namespace) (cadenza_active_runs)", "namespace"),
        ('sum(cadenza_active_runs{workload_namespace=~"$namespace"})', "$workflow"),
        ("sum by (phase) (cadenza_active_runs)", "phase"),
    ],
)
def test_the_check_rejects_what_scrapes_would_never_show(query: str, wrong: str) -> None:
    found = problems(query, grafana=True)
    assert found and any(wrong in p for p in found), found


def test_every_exported_metric_is_on_a_panel() -> None:
    shown = {sel.name for _, expr in panel_queries(dashboard()) for sel in parse(grafana_to_promql(expr))[0]}
    missing = [m.name for m in exported().values() if not m.series & shown]
    assert missing == [], f"metrics on no panel: {missing}"
    assert len(exported()) >= 23  # cadenza_runs_waiting among them


def test_the_dashboard_has_namespace_and_workflow_variables_from_exported_series() -> None:
    board = dashboard()
    variables = {name: (selector, label) for name, selector, label in variable_queries(board)}
    assert variables["namespace"][1] == NS
    assert variables["workflow"][1] == "workflow"
    for name, (selector, _) in variables.items():
        assert problems(selector, grafana=False) == [], name
    # The workflow list follows the namespace chosen.
    assert "$namespace" in variables["workflow"][0]


def test_waiting_over_executing_ratio_panel_per_workflow_and_step() -> None:
    ratio = [
        (title, expr)
        for title, expr in panel_queries(dashboard())
        if {s.name for s in parse(grafana_to_promql(expr))[0]}
        == {"cadenza_step_waiting_seconds_sum", "cadenza_step_execution_seconds_sum"}
    ]
    assert len(ratio) == 1, ratio
    _, groupings = parse(grafana_to_promql(ratio[0][1]))
    assert [g.labels for g in groupings] == [("workflow", "step"), ("workflow", "step")]
    expr = ratio[0][1]
    assert expr.index("waiting_seconds_sum") < expr.index(" / ") < expr.index("execution_seconds_sum")


def test_alerts_group_workload_series_by_workload_namespace() -> None:
    for rule in alert_rules():
        _, groupings = parse(rule["expr"])
        index = series_index()
        for group in groupings:
            if any(NS in index[n].labels for n in group.selected):
                assert NS in group.labels, (rule["alert"], group)
