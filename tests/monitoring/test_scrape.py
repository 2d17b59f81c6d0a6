"""A real Prometheus scrapes a real `cadenza dev` (the CLI as a subprocess) running a
workload with retries, a timeout, a forEach, model calls (an OpenAI-compatible server
answering 429 then 200, and recorded usage) and an approval, its target labelled with a
`namespace` as a ServiceMonitor labels the operator's; then every dashboard query,
with the dashboard's variables filled in, is evaluated through Prometheus' HTTP API.

Each must succeed, and each must return series unless every metric it selects is one
this workload cannot produce (EMPTY_ALLOWED says why for each). While the run waits for
its approval, the stuck-runs alert's expression must be empty for it (the old one, which
counted waiting runs, is not: the test would catch it coming back).

Every wait is a bounded poll on something that must happen; nothing times a duration."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from cadenza_operator.local.nats_server import free_port

from ..integration.chat_server import ChatServer
from ..integration.harness import write_project
from ..integration.test_unreachable_nats import Process
from .promql import alert_rules, dashboard, exported, panel_queries, parse, series_index, variable_queries

NAMESPACE = "default"  # cadenza dev's
OPERATOR_NAMESPACE = "cadenza-system"  # the scrape target's, as a ServiceMonitor labels it
WORKFLOW = "scraped"
# Metrics the workload cannot produce under cadenza dev, and why. A query may come back
# empty only when every series it selects belongs to one of these.
EMPTY_ALLOWED = {
    "cadenza_agent_pending_tasks": "set by the operator's Agent reconciler; cadenza dev runs no operator",
    "cadenza_agent_in_flight_tasks": "set by the operator's Agent reconciler; cadenza dev runs no operator",
    "cadenza_dead_letters": "nothing in this workload is given up on",
    "cadenza_forged_events": "every agent reports on its own subject: nothing forged",
    "cadenza_kube_status_writes": "WorkflowRun status is written by the operator in a cluster only",
}

AGENTS = """
import sys
from cadenza import Agent, RetryableError

worker = Agent("worker")
caller = Agent("caller")


@worker.handler
async def work(task):
    mode = task.input["mode"]
    if mode == "flaky" and task.attempt == 1:
        raise RetryableError("busy")  # retried: cadenza_step_retries_total
    if mode == "slow" and task.attempt == 1:
        await task.wait_cancelled()  # outlives its timeout: cadenza_step_timeouts_total
        return {"late": True}
    if mode == "item":
        task.record_usage("recorded", 10, 5, 0.5)  # cadenza_model_tokens_total, _cost_total
    return {"mode": mode}


@caller.handler
async def call(task):
    reply = await task.model("metered").chat([{"role": "user", "content": "hi"}])  # 429, then 200
    return {"text": reply.text}


if __name__ == "__main__":
    {"worker": worker, "caller": caller}[sys.argv[1]].run()
"""

MANIFESTS = """
apiVersion: cadenza.dev/v1alpha1
kind: Model
metadata: {name: metered}
spec: {provider: openai, baseURL: BASE_URL, model: tiny, pricing: {input: 1, output: 2, per: 1M}}
---
apiVersion: cadenza.dev/v1alpha1
kind: Agent
metadata: {name: worker}
spec: {command: ["python", "agents.py", "worker"], concurrency: 4}
---
apiVersion: cadenza.dev/v1alpha1
kind: Agent
metadata: {name: caller}
spec: {command: ["python", "agents.py", "caller"], models: [metered]}
---
apiVersion: cadenza.dev/v1alpha1
kind: Workflow
metadata: {name: scraped}
spec:
  triggers:
    - nats: {subject: scrape.go}
  steps:
    - {name: flaky, agent: worker, input: {mode: flaky}, retry: {limit: 2, backoff: {initial: 10ms}}}
    - name: fan
      agent: worker
      forEach: "[1, 2, 3]"
      maxParallel: 2
      input: {mode: item}
    - name: slow
      agent: worker
      input: {mode: slow}
      timeout: 500ms
      retry: {limit: 1, backoff: {initial: 10ms}}
    - {name: call, agent: caller}
    - name: gate
      dependsOn: [flaky, fan, slow, call]
      approval: {message: "ship it?"}
"""


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "cadenza_operator.cli", *args]


async def poll(what: Callable[[], Awaitable[bool]], describe: str, timeout: float = 90) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await what():
        assert loop.time() < deadline, f"not within {timeout}s: {describe}"
        await asyncio.sleep(0.2)


class Prometheus:
    """A real Prometheus on 127.0.0.1 scraping one target every second."""

    def __init__(self, tmp: Path, target: str) -> None:
        self.port = free_port()
        tmp.mkdir(parents=True, exist_ok=True)
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            # The target labels a ServiceMonitor gives the operator's series: its own
            # `namespace` among them, which an exported `namespace` would clash with.
            "scrape_configs": [
                {
                    "job_name": "cadenza-dev",
                    "static_configs": [{"targets": [target], "labels": {"namespace": OPERATOR_NAMESPACE}}],
                }
            ],
        }
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        binary = shutil.which("prometheus") or "prometheus"
        self.process = Process(
            [
                binary,
                f"--config.file={tmp / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            tmp / "prometheus.log",
            cwd=tmp,
        )

    def _get(self, path: str, **params: str) -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.port}{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                body: dict[str, Any] = json.loads(response.read())
        except urllib.error.HTTPError as error:  # a bad query: 400 with the error in the body
            body = json.loads(error.read())
        return body

    async def ready(self) -> bool:
        def get() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=5) as r:
                    return bool(r.status == 200)
            except OSError:
                return False

        assert self.process.proc.poll() is None, self.process.output()[-3000:]
        return await asyncio.to_thread(get)

    async def query(self, promql: str) -> list[dict[str, Any]]:
        """The instant query's result; a query Prometheus refuses fails the test."""
        body = await asyncio.to_thread(self._get, "/api/v1/query", query=promql)
        assert body.get("status") == "success", f"{promql}: {body}"
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    async def series(self, selector: str) -> list[dict[str, str]]:
        body = await asyncio.to_thread(self._get, "/api/v1/series", **{"match[]": selector})
        assert body.get("status") == "success", f"{selector}: {body}"
        found: list[dict[str, str]] = body["data"]
        return found

    async def value(self, promql: str) -> float | None:
        result = await self.query(promql)
        return float(result[0]["value"][1]) if result else None


def fill(expr: str) -> str:
    """The dashboard's variables as Grafana sends them with this workload selected."""
    return (
        expr.replace("$__rate_interval", "5m").replace("$namespace", NAMESPACE).replace("$workflow", WORKFLOW)
    )


def may_be_empty(expr: str) -> bool:
    index = series_index()
    selected = {index[s.name].name for s in parse(fill(expr))[0]}
    return selected <= set(EMPTY_ALLOWED)


def _stuck_expr() -> str:
    return str(next(r["expr"] for r in alert_rules() if r["alert"] == "CadenzaRunsStuck"))


OLD_STUCK = (
    "(sum by (workload_namespace, workflow) (cadenza_active_runs) > 0) unless "
    "(sum by (workload_namespace, workflow) (increase(cadenza_runs_finished_total[30m])) > 0)"
)


async def test_prometheus_scraping_cadenza_dev_answers_every_dashboard_query(tmp_path: Path) -> None:
    if not shutil.which("prometheus"):
        if os.environ.get("CI") == "true":
            pytest.fail("prometheus is not installed (apt-get install prometheus): CI must run this")
        pytest.skip("prometheus is not installed (apt-get install prometheus)")
    async with ChatServer() as chat:
        chat.failures = [(429, {"Retry-After": "1"})]
        root = write_project(tmp_path / "p", AGENTS, MANIFESTS.replace("BASE_URL", chat.url))
        dev = Process(
            cli("dev", str(root), "--metrics-port", "0"),
            tmp_path / "dev.log",
            env={"COLUMNS": "400", "CADENZA_LOG_FORMAT": "json"},  # one line per message
        )
        prometheus: Prometheus | None = None
        try:
            await poll(lambda: _ready(dev), "cadenza dev printed its NATS and metrics addresses")
            nats_url = _match(dev, r"NATS\s+(nats://\S+)")
            metrics_port = _match(dev, r"metrics\s+http://127\.0\.0\.1:(\d+)/metrics")
            prometheus = Prometheus(tmp_path / "prom", f"127.0.0.1:{metrics_port}")
            await poll(prometheus.ready, "Prometheus ready")

            await _cadenza("publish", "scrape.go", json.dumps({"id": "1"}), "--nats", nats_url)
            await poll(lambda: _found(dev, r"(\S+) gate: WaitingApproval"), "the run waits for approval")
            run = _match(dev, r"(\S+) gate: WaitingApproval")

            # Scraped while the run waits: it is active and waiting, so not stuck.
            waiting = f'cadenza_runs_waiting{{workload_namespace="{NAMESPACE}", workflow="{WORKFLOW}"}}'
            await poll(lambda: _equals(prometheus, f"sum({waiting})", 1.0), "the waiting run scraped")
            assert await prometheus.value(f'sum(cadenza_active_runs{{workflow="{WORKFLOW}"}})') == 1.0
            assert await prometheus.value(f'sum(cadenza_pending_approvals{{workflow="{WORKFLOW}"}})') == 1.0
            assert await prometheus.query(_stuck_expr()) == []
            assert await prometheus.query(OLD_STUCK) != []  # what the alert did before

            await _cadenza("approve", run, "gate", "--nats", nats_url)
            await poll(lambda: _found(dev, rf"{re.escape(run)}: Succeeded"), "the run succeeded")
            # Twice scraped since the run finished, so rate() over it has two samples.
            finished = f'cadenza_runs_finished_total{{workflow="{WORKFLOW}", phase="Succeeded"}}'
            await poll(
                lambda: _at_least(prometheus, f"sum(count_over_time({finished}[5m]))", 2),
                "the finished run scraped twice",
            )
            assert await prometheus.value(f"sum({waiting})") == 0.0

            # The workload's namespace is its own label: the target's `namespace` does not
            # override it, and nothing was renamed exported_namespace.
            namespaces = await prometheus.query(
                "count by (namespace, workload_namespace) (cadenza_runs_started_total)"
            )
            assert [r["metric"] for r in namespaces] == [
                {"namespace": OPERATOR_NAMESPACE, "workload_namespace": NAMESPACE}
            ]
            assert await prometheus.query('count({exported_namespace!=""})') == []

            board = dashboard()
            for name, selector, label in variable_queries(board):
                values = {s.get(label) for s in await prometheus.series(fill(selector))}
                expected = {"namespace": NAMESPACE, "workflow": WORKFLOW}[name]
                assert expected in values, f"variable {name}: {values}"

            empty, shown = [], set()
            index = series_index()
            for title, expr in panel_queries(board):
                result = await prometheus.query(fill(expr))
                if result:
                    shown |= {index[s.name].name for s in parse(fill(expr))[0]}
                elif not may_be_empty(expr):
                    empty.append(f"{title}: {fill(expr)}")
            assert empty == [], "queries this workload exercises came back empty:\n" + "\n".join(empty)
            # The named set: every metric but those of EMPTY_ALLOWED is on a panel that showed data.
            assert set(exported()) - set(EMPTY_ALLOWED) <= shown, set(exported()) - shown

            for rule in alert_rules():  # every alert expression evaluates (empty or not)
                await prometheus.query(rule["expr"])
        finally:
            if prometheus is not None:
                prometheus.process.terminate()
            dev.terminate()


async def _ready(dev: Process) -> bool:
    assert dev.proc.poll() is None, dev.output()[-3000:]
    return "stops everything" in dev.output()


async def _found(dev: Process, pattern: str) -> bool:
    assert dev.proc.poll() is None, dev.output()[-3000:]
    return re.search(pattern, dev.output()) is not None


def _match(dev: Process, pattern: str) -> str:
    found = re.search(pattern, dev.output())
    assert found, f"{pattern!r} not in:\n{dev.output()[-3000:]}"
    return found[1]


async def _equals(prometheus: Prometheus, promql: str, expected: float) -> bool:
    return await prometheus.value(promql) == expected


async def _at_least(prometheus: Prometheus, promql: str, expected: float) -> bool:
    value = await prometheus.value(promql)
    return value is not None and value >= expected


async def _cadenza(*args: str) -> None:
    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(cli(*args), capture_output=True, text=True, timeout=60)

    result = await asyncio.to_thread(run)
    assert result.returncode == 0, f"cadenza {' '.join(args)}: {result.stdout}{result.stderr}"
