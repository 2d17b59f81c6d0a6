"""`task.model(name)`: chat, stream, usage and cost against a real OpenAI-compatible HTTP
server (tests/integration/chat_server.py); 429 + Retry-After; and a Model's limits held
across two processes through JetStream KV on a real nats-server."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import nats
import pytest
from cadenza import Task
from cadenza.errors import FatalError, RetryableError
from cadenza.models import Model, ModelRegistry, ModelSpec, secret_env_var
from cadenza_operator.local.nats_server import NatsServer

from .chat_server import INPUT_TOKENS, OUTPUT_TOKENS, ChatServer
from .harness import unique_namespace

HELLO = [{"role": "user", "content": "hello"}]


def spec(url: str, **extra: Any) -> dict[str, Any]:
    return {
        "provider": "openai",
        "baseURL": url,
        "model": "tiny",
        "pricing": {"input": 0.15, "output": 0.60, "per": "1M"},
        **extra,
    }


def recording_task(specs: dict[str, ModelSpec], js: Any = None) -> tuple[Task, list[tuple[Any, ...]]]:
    recorded: list[tuple[Any, ...]] = []
    task = Task(input=None, run_id="r1", step="s")
    task._models = ModelRegistry(specs, js)
    task._usage = lambda *call: recorded.append(call)  # what the agent publishes as `usage`
    return task, recorded


async def test_chat_and_stream_return_text_usage_and_cost() -> None:
    async with ChatServer() as server:
        task, recorded = recording_task({"fast": ModelSpec.from_spec("fast", spec(server.url))})
        m = task.model("fast")
        r = await m.chat(HELLO, temperature=0)
        assert r.text == "echo: hello"
        assert (r.usage.input_tokens, r.usage.output_tokens) == (INPUT_TOKENS, OUTPUT_TOKENS)
        assert r.usage.cost == pytest.approx((INPUT_TOKENS * 0.15 + OUTPUT_TOKENS * 0.60) / 1e6)
        assert r.raw["choices"][0]["message"]["content"] == "echo: hello"
        assert server.bodies[0]["temperature"] == 0 and server.bodies[0]["model"] == "tiny"

        pieces = [piece async for piece in m.stream(HELLO)]
        assert "".join(pieces) == "echo: hello" and len(pieces) == 3
        assert server.bodies[1]["stream"] is True
        assert [call[:4] for call in recorded] == [("fast", INPUT_TOKENS, OUTPUT_TOKENS, r.usage.cost)] * 2
        assert recorded[0][4]["requests"] == {"ok": 1} and recorded[1][4]["requests"] == {"ok": 1}


async def test_sync_twins_from_a_worker_thread() -> None:
    async with ChatServer() as server:
        task, recorded = recording_task({"fast": ModelSpec.from_spec("fast", spec(server.url))})

        def handler() -> tuple[str, list[str]]:  # a sync handler runs in a thread
            m = task.model("fast")
            return m.chat_sync(HELLO).text, list(m.stream_sync(HELLO))

        text, pieces = await asyncio.to_thread(handler)
        assert text == "echo: hello" and "".join(pieces) == "echo: hello"
        assert len(recorded) == 2


async def test_429_with_retry_after_is_honoured_then_succeeds() -> None:
    async with ChatServer() as server:
        server.failures = [(429, {"Retry-After": "1"}), (500, {"Retry-After": "0"})]
        task, _ = recording_task({"fast": ModelSpec.from_spec("fast", spec(server.url))})
        r = await task.model("fast").chat(HELLO)
        assert r.text == "echo: hello"
        assert len(server.arrivals) == 3
        assert server.arrivals[1] - server.arrivals[0] >= 1.0  # waited as the server asked


async def test_each_call_reports_its_requests_by_outcome_its_wait_and_latency() -> None:
    async with ChatServer() as server:
        server.failures = [(429, {"Retry-After": "1"}), (500, {"Retry-After": "0"})]
        task, recorded = recording_task({"fast": ModelSpec.from_spec("fast", spec(server.url))})
        m = task.model("fast")
        r = await m.chat(HELLO)
        assert r.usage.requests == {"ratelimited": 1, "error": 1, "ok": 1}
        assert r.usage.waited >= 1.0  # the 429's Retry-After; the 500's backoff is no rate limit
        assert r.usage.latency is not None and r.usage.latency >= 0
        measured = recorded[0][4]
        assert measured == {
            "requests": r.usage.requests,
            "waited": r.usage.waited,
            "latency": r.usage.latency,
        }

        # A call that fails is reported too, with no tokens: it was made (and may be paid).
        server.failures = [(503, {"Retry-After": "0"})] * 2
        m.max_retries = 1
        with pytest.raises(RetryableError):
            await m.chat(HELLO)
        assert recorded[1][:4] == ("fast", 0, 0, 0.0)
        assert recorded[1][4]["requests"] == {"error": 2}
        server.failures = [(400, {})]
        with pytest.raises(FatalError):
            await m.chat(HELLO)
        assert recorded[2][:4] == ("fast", 0, 0, 0.0) and recorded[2][4]["requests"] == {"error": 1}

        # task.record_usage (a call made another way) measures nothing.
        task.record_usage(model="fast", input_tokens=1, output_tokens=1)
        assert recorded[3] == ("fast", 1, 1, None, None)


async def test_retries_are_bounded_then_retryable_error() -> None:
    async with ChatServer() as server:
        server.failures = [(503, {"Retry-After": "0"})] * 10
        model = Model(ModelSpec.from_spec("fast", spec(server.url)), max_retries=2)
        with pytest.raises(RetryableError, match="answered 503"):
            await model.chat(HELLO)
        assert len(server.arrivals) == 3


async def test_api_key_comes_from_the_secret_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    var = secret_env_var("llm-keys", "openai")
    assert var == "CADENZA_SECRET_LLM_KEYS_OPENAI"
    monkeypatch.setenv(var, "sk-test-123")
    async with ChatServer() as server:
        ref = {"secretKeyRef": {"name": "llm-keys", "key": "openai"}}
        model = Model(ModelSpec.from_spec("fast", spec(server.url, apiKey=ref)))
        await model.chat(HELLO)
        assert server.authorizations == ["Bearer sk-test-123"]
        assert "sk-test-123" not in repr(model)


async def test_an_unknown_model_names_the_known_ones() -> None:
    task, _ = recording_task({"fast": ModelSpec.from_spec("fast", spec("http://127.0.0.1:9/v1"))})
    with pytest.raises(Exception, match="'slow' is not one of this Agent's models: fast"):
        task.model("slow")


CALLER = """
import asyncio, json, os, sys
import nats
from cadenza.models import ModelRegistry, load_model_specs

async def main():
    nc = await nats.connect(sys.argv[1])
    registry = ModelRegistry(load_model_specs(), nc.jetstream(), asyncio.get_running_loop())
    m = registry.model("fast")
    replies = await asyncio.gather(*(m.chat([{"role": "user", "content": str(i)}]) for i in range(10)))
    print(json.dumps(sum(r.usage.input_tokens + r.usage.output_tokens for r in replies)))
    await nc.close()

asyncio.run(main())
"""


async def test_limits_hold_across_two_processes(nats_server: NatsServer, tmp_path: Path) -> None:
    requests, per, concurrency = 5, 2.0, 2
    script = tmp_path / "caller.py"
    script.write_text(CALLER)
    async with ChatServer(delay=0.2) as server:
        limits = {"requests": requests, "per": "2s", "concurrency": concurrency}
        env = {
            **os.environ,
            "CADENZA_MODELS": json.dumps({"fast": spec(server.url, limits=limits)}),
            "CADENZA_NAMESPACE": unique_namespace(),
        }
        callers = [
            await asyncio.create_subprocess_exec(
                sys.executable, str(script), nats_server.url, env=env, stdout=asyncio.subprocess.PIPE
            )
            for _ in range(2)
        ]
        outputs = await asyncio.wait_for(asyncio.gather(*(c.communicate() for c in callers)), 120)
        assert [c.returncode for c in callers] == [0, 0]
        assert sum(json.loads(out) for out, _ in outputs) == 20 * (INPUT_TOKENS + OUTPUT_TOKENS)

    arrivals = sorted(server.arrivals)
    assert len(arrivals) == 20
    # At most `requests` in any window of `per`: the (i + requests)-th arrival is `per` later.
    gaps = [arrivals[i + requests] - arrivals[i] for i in range(len(arrivals) - requests)]
    assert min(gaps) >= per, gaps
    assert server.most_in_flight <= concurrency

    nc = await nats.connect(nats_server.url)
    try:
        kv = await nc.jetstream().key_value("cadenza_limits")
        entry = await kv.get(f"{env['CADENZA_NAMESPACE']}.fast")
        assert json.loads(entry.value)["live"] == {}  # every slot released
    finally:
        await nc.close()


async def test_concurrency_alone_keeps_no_finished_calls(nats_server: NatsServer) -> None:
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        namespace = unique_namespace()
        async with ChatServer(delay=0.1) as server:
            model_spec = ModelSpec.from_spec("fast", spec(server.url, limits={"concurrency": 2}), namespace)
            m = ModelRegistry({"fast": model_spec}, js).model("fast")
            replies = await asyncio.gather(*(m.chat(HELLO) for _ in range(8)))
        assert [r.text for r in replies] == ["echo: hello"] * 8
        assert server.most_in_flight <= 2
        entry = await (await js.key_value("cadenza_limits")).get(f"{namespace}.fast")
        value = json.loads(entry.value)
        assert value["live"] == {} and value["done"] == {}  # released; finished calls are not kept
    finally:
        await nc.close()
