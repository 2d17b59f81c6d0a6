"""The Model resource: manifests that validate or exit 2 naming file/object/field, the
environment a local agent gets for its Models (no secret value but its own key), and
`cadenza run` with an agent calling `task.model()` against a real OpenAI-compatible
server: async and sync handlers, the key reaching the server and nowhere else."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest
from cadenza.models import secret_env_var
from cadenza_operator.local.model_env import model_environment
from cadenza_operator.local.secrets import MissingReference, secret_variable
from cadenza_operator.manifests import load

from ..conftest import ROOT, cadenza
from .chat_server import INPUT_TOKENS, OUTPUT_TOKENS, ChatServer

SECRET = "sk-never-shown-4711"

MODEL = """\
apiVersion: cadenza.dev/v1alpha1
kind: Model
metadata: {name: fast}
spec:
  provider: openai
  baseURL: BASE_URL
  model: tiny
  apiKey: {secretKeyRef: {name: llm-keys, key: openai}}
  limits: {requests: 50, tokens: 100000, per: 1m, concurrency: 4}
  pricing: {input: 0.15, output: 0.60, per: 1M}
"""

AGENT = """\
apiVersion: cadenza.dev/v1alpha1
kind: Agent
metadata: {name: writer}
spec:
  command: ["python", "agent.py"]
  models: [MODELS]
"""

WORKFLOW = """\
apiVersion: cadenza.dev/v1alpha1
kind: Workflow
metadata: {name: write}
spec:
  steps:
    - {name: draft, agent: writer, input: {topic: cats, sync: false}}
    - {name: polish, agent: writer, dependsOn: [draft], input: {topic: dogs, sync: true}}
  output: {draft: "${{ steps.draft.output }}", polish: "${{ steps.polish.output }}"}
"""

AGENT_CODE = """\
import asyncio

from cadenza import Agent, Task

writer = Agent("writer")


def write_sync(task: Task) -> dict:  # as a sync handler would: in a worker thread, the sync twins
    m = task.model("fast")
    text = m.chat_sync([{"role": "user", "content": task.input["topic"]}]).text
    return {"text": text, "streamed": "".join(m.stream_sync([{"role": "user", "content": "x"}]))}


@writer.handler
async def write(task: Task) -> dict:
    if task.input["sync"]:
        return await asyncio.to_thread(write_sync, task)
    r = await task.model("fast").chat([{"role": "user", "content": task.input["topic"]}])
    return {"text": r.text, "cost": r.usage.cost, "tokens": r.usage.input_tokens + r.usage.output_tokens}


writer.run()
"""


def project(tmp_path: Path, base_url: str = "http://127.0.0.1:9/v1", models: str = "fast") -> Path:
    (tmp_path / "model.yaml").write_text(MODEL.replace("BASE_URL", base_url))
    (tmp_path / "agent.yaml").write_text(AGENT.replace("MODELS", models))
    (tmp_path / "workflow.yaml").write_text(WORKFLOW)
    (tmp_path / "agent.py").write_text(AGENT_CODE)
    return tmp_path


def test_a_model_manifest_validates(tmp_path: Path) -> None:
    result = cadenza("validate", str(project(tmp_path)))
    assert result.returncode == 0, result.stderr
    bundle = load([tmp_path])
    assert bundle.models["fast"][0].spec.limits is not None
    assert bundle.agents["writer"][0].spec.models == ["fast"]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (("requests: 50", "requests: 0"), "model.yaml: Model/fast: spec.limits.requests:"),
        (("per: 1m, concurrency", "per: soon, concurrency"), "model.yaml: Model/fast: spec.limits.per:"),
        (("provider: openai", "provider: carrier-pigeon"), "model.yaml: Model/fast: spec.provider:"),
        (
            ("model: tiny", "model: tiny\n  apiKey2: sk-inline"),
            "model.yaml: Model/fast: spec.apiKey2: unknown field",
        ),
        (("per: 1M", "per: lots"), "model.yaml: Model/fast: spec.pricing.per:"),
        (("baseURL: http", "baseURL: ftp"), "model.yaml: Model/fast: spec.baseURL:"),
    ],
)
def test_a_bad_model_exits_2_naming_file_object_and_field(
    tmp_path: Path, change: tuple[str, str], expected: str
) -> None:
    project(tmp_path)
    path = tmp_path / "model.yaml"
    path.write_text(path.read_text().replace(*change))
    result = cadenza("validate", str(tmp_path))
    assert result.returncode == 2
    assert expected in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_an_agent_naming_an_unknown_model_exits_2(tmp_path: Path) -> None:
    result = cadenza("validate", str(project(tmp_path, models="fast, slow")))
    assert result.returncode == 2
    assert "agent.yaml: Agent/writer: spec.models[1]: unknown Model 'slow' (Models: fast)" in result.stderr


def test_the_agent_environment_holds_specs_and_only_its_key(tmp_path: Path) -> None:
    bundle = load([project(tmp_path)])
    agent = bundle.agents["writer"][0]
    models = {name: m for name, (m, _) in bundle.models.items()}
    variable = secret_variable("llm-keys", "openai")
    assert variable == secret_env_var("llm-keys", "openai")  # what the SDK reads
    env = model_environment(agent, models, {variable: SECRET, "OTHER": "x"})
    assert env[variable] == SECRET and "OTHER" not in env
    specs = json.loads(env["CADENZA_MODELS"])
    assert specs["fast"]["apiKey"] == {"secretKeyRef": {"name": "llm-keys", "key": "openai"}}
    assert SECRET not in env["CADENZA_MODELS"]
    with pytest.raises(MissingReference, match=f"Model/fast .*Agent/writer.*set {variable}"):
        model_environment(agent, models, {})


def test_run_without_the_models_key_exits_2_naming_the_variable(tmp_path: Path) -> None:
    env_without = {k: v for k, v in os.environ.items() if not k.startswith("CADENZA_SECRET_")}
    result = asyncio.run(_cadenza(env_without, "run", str(project(tmp_path))))
    assert result[0] == 2
    assert "Model/fast" in result[2] and "CADENZA_SECRET_LLM_KEYS_OPENAI" in result[2]
    assert "Traceback" not in result[2]


async def _cadenza(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cadenza_operator.cli",
        *args,
        cwd=ROOT,
        env={**env, "CADENZA_LOG_FORMAT": "json"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 180)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_an_agent_calls_its_model_through_cadenza_run(tmp_path: Path) -> None:
    async with ChatServer() as server:
        project(tmp_path, base_url=server.url)
        env = {**os.environ, "CADENZA_SECRET_LLM_KEYS_OPENAI": SECRET}
        code, out, err = await _cadenza(env, "run", str(tmp_path), "--output", "json")
    assert code == 0, err
    result = json.loads(out)
    outputs = result["outputs"]
    assert outputs["draft"]["text"] == "echo: cats"
    assert outputs["draft"]["tokens"] == INPUT_TOKENS + OUTPUT_TOKENS
    assert outputs["polish"] == {"text": "echo: dogs", "streamed": "echo: x"}
    assert set(server.authorizations) == {f"Bearer {SECRET}"}
    assert len(server.arrivals) == 3
    # Every call's usage reached the engine through task.record_usage: what the server counted.
    usage = result["usage"]
    assert (usage["inputTokens"], usage["outputTokens"], usage["calls"]) == (
        3 * INPUT_TOKENS,
        3 * OUTPUT_TOKENS,
        3,
    )
    assert usage["cost"] == pytest.approx(3 * (INPUT_TOKENS * 0.15 + OUTPUT_TOKENS * 0.60) / 1e6)
    assert SECRET not in out and SECRET not in err
