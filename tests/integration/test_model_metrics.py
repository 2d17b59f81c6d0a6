"""Model metrics end to end, on a real nats-server: an agent process calls a Model through
`task.model()` against a real OpenAI-compatible HTTP server (chat_server.py) that answers
429 with Retry-After first and 200 next; the engine (in this process) counts the call's
requests by outcome and observes its rate-limit wait and latency from the usage event;
and the agent's reply carries what the call measured."""

from __future__ import annotations

from pathlib import Path

from cadenza_operator.local.nats_server import NatsServer

from .chat_server import INPUT_TOKENS, OUTPUT_TOKENS, ChatServer
from .harness import run_project, write_project
from .metrics import summed

MODEL = "metered"  # a name no other test uses: the registry is this process's

MANIFESTS = """
apiVersion: cadenza.dev/v1alpha1
kind: Model
metadata: {name: metered}
spec: {provider: openai, baseURL: BASE_URL, model: tiny, pricing: {input: 1, output: 2, per: 1M}}
---
apiVersion: cadenza.dev/v1alpha1
kind: Agent
metadata: {name: caller}
spec: {command: ["python", "agents.py"], models: [metered]}
---
apiVersion: cadenza.dev/v1alpha1
kind: Workflow
metadata: {name: metered-calls}
spec:
  steps:
    - {name: call, agent: caller}
"""

AGENTS = """
from cadenza import Agent

caller = Agent("caller")


@caller.handler
async def call(task):
    r = await task.model("metered").chat([{"role": "user", "content": "hi"}])  # 429, then 200
    return {"text": r.text, "waited": r.usage.waited, "requests": r.usage.requests}


if __name__ == "__main__":
    caller.run()
"""


def _value(name: str, **labels: str) -> float:
    return summed(name, {"model": MODEL, **labels})


async def test_a_429_then_200_call_is_counted_by_outcome_with_its_wait(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    names = [
        ("cadenza_model_requests_total", {"outcome": "ok"}),
        ("cadenza_model_requests_total", {"outcome": "ratelimited"}),
        ("cadenza_model_ratelimit_wait_seconds_count", {}),
        ("cadenza_model_ratelimit_wait_seconds_sum", {}),
        ("cadenza_model_latency_seconds_count", {}),
    ]
    before = [_value(name, **labels) for name, labels in names]
    async with ChatServer() as server:
        server.failures = [(429, {"Retry-After": "1"})]
        root = write_project(tmp_path / "p", AGENTS, MANIFESTS.replace("BASE_URL", server.url))
        summary, code = await run_project(root, nats_server.url)
    assert code == 0, summary
    output = summary["steps"]["call"]["output"]
    assert output["text"] == "echo: hi"
    assert output["requests"] == {"ratelimited": 1, "ok": 1} and output["waited"] >= 1.0
    assert len(server.arrivals) == 2

    after = [_value(name, **labels) for name, labels in names]
    delta = {f"{n}{labels}": a - b for (n, labels), a, b in zip(names, after, before, strict=True)}
    assert delta["cadenza_model_requests_total{'outcome': 'ok'}"] == 1
    assert delta["cadenza_model_requests_total{'outcome': 'ratelimited'}"] == 1
    assert delta["cadenza_model_ratelimit_wait_seconds_count{}"] == 1  # one per call
    assert delta["cadenza_model_ratelimit_wait_seconds_sum{}"] >= 1.0  # the Retry-After it honoured
    assert delta["cadenza_model_latency_seconds_count{}"] == 1
    usage = summary["usage"]
    assert (usage["inputTokens"], usage["outputTokens"], usage["calls"]) == (INPUT_TOKENS, OUTPUT_TOKENS, 1)
