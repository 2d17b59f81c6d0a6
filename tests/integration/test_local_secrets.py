"""Secrets and ConfigMap values reach a local agent through `cadenza run` (a real
subprocess, on a real nats-server): from CADENZA_SECRET_* / CADENZA_CONFIGMAP_* variables
and from --env-file. The handler returns only a hash of what it received; the plain
value appears in no output, log line or audit record. A missing one is exit 2 naming the
Agent and the variable."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import textwrap
from pathlib import Path

from cadenza_operator.local.nats_server import NatsServer

from ..conftest import cadenza

EXIT_INVALID = 2
API_KEY = "sk-test-6f1d0c-plain-secret"
REGION = "eu-west-region-value"
EXTRA = "extra-token-from-env-from"

AGENT = """
import hashlib, os, sys
from cadenza import Agent, Task

keeper = Agent("keeper")

def digest(name):
    return hashlib.sha256(os.environ[name].encode()).hexdigest()

@keeper.handler
async def handle(task: Task) -> dict:
    leaked = [k for k in os.environ if k.startswith(("CADENZA_SECRET_", "CADENZA_CONFIGMAP_"))]
    digests = {"key": digest("API_KEY"), "region": digest("REGION"), "extra": digest("X_TOKEN")}
    return {**digests, "leaked": leaked}

if __name__ == "__main__":
    keeper.run()
"""

MANIFESTS = """
apiVersion: cadenza.dev/v1alpha1
kind: Agent
metadata: {name: keeper}
spec:
  command: [python, agent.py]
  env:
    - {name: API_KEY, valueFrom: {secretKeyRef: {name: llm-keys, key: openai.key}}}
    - {name: REGION, valueFrom: {configMapKeyRef: {name: settings, key: region}}}
  envFrom:
    - {secretRef: {name: extra}, prefix: X_}
---
apiVersion: cadenza.dev/v1alpha1
kind: Workflow
metadata: {name: keep}
spec:
  steps:
    - {name: hold, agent: keeper}
  output: {result: "${{ steps.hold.output }}"}
"""


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _project(tmp_path: Path) -> Path:
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "agent.py").write_text(textwrap.dedent(AGENT))
    (folder / "cadenza.yaml").write_text(MANIFESTS)
    return folder


def _cadenza(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {
        k: v for k, v in os.environ.items() if not k.startswith(("CADENZA_SECRET_", "CADENZA_CONFIGMAP_"))
    }
    return cadenza(*args, timeout=180, env={**base, "CADENZA_LOG_FORMAT": "json", **env})


def test_secrets_from_the_environment_and_an_env_file_reach_the_handler_and_nowhere_else(
    tmp_path: Path, fresh_nats: NatsServer
) -> None:
    folder = _project(tmp_path)
    env_file = tmp_path / "local.env"
    env_file.write_text(
        f"# local values\nCADENZA_CONFIGMAP_SETTINGS_REGION={REGION}\nCADENZA_SECRET_EXTRA_TOKEN='{EXTRA}'\n"
    )
    result = _cadenza(
        "run",
        str(folder),
        "--env-file",
        str(env_file),
        "--output",
        "json",
        "--nats",
        fresh_nats.url,
        env={"CADENZA_SECRET_LLM_KEYS_OPENAI_KEY": API_KEY},
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["outputs"]["result"] == {
        "key": _sha(API_KEY),
        "region": _sha(REGION),
        "extra": _sha(EXTRA),
        "leaked": [],  # the agent sees what it references, not every CADENZA_SECRET_* variable
    }
    audit = _cadenza("audit", summary["run"], "--nats", fresh_nats.url, "--output", "json", env={})
    assert audit.returncode == 0, audit.stderr
    assert audit.stdout.strip()
    for shown in (result.stdout, result.stderr, audit.stdout, audit.stderr):
        for value in (API_KEY, REGION, EXTRA):
            assert value not in shown


def test_a_missing_secret_names_the_agent_and_the_variable(tmp_path: Path) -> None:
    folder = _project(tmp_path)
    result = _cadenza(
        "run",
        str(folder),
        env={"CADENZA_CONFIGMAP_SETTINGS_REGION": REGION, "CADENZA_SECRET_EXTRA_TOKEN": EXTRA},
    )
    assert result.returncode == EXIT_INVALID
    message = " ".join(result.stderr.split())
    assert "Agent/keeper" in message and "CADENZA_SECRET_LLM_KEYS_OPENAI_KEY" in message
    assert "Traceback" not in result.stderr


def test_an_env_file_that_is_not_there_is_named(tmp_path: Path) -> None:
    result = _cadenza("run", str(_project(tmp_path)), "--env-file", str(tmp_path / "absent.env"), env={})
    assert result.returncode == EXIT_INVALID
    assert "absent.env" in result.stderr and "Traceback" not in result.stderr


def test_dev_checks_references_before_starting_anything(tmp_path: Path) -> None:
    env_file = tmp_path / "local.env"
    env_file.write_text(f"CADENZA_SECRET_LLM_KEYS_OPENAI_KEY={API_KEY}\nCADENZA_SECRET_EXTRA_TOKEN={EXTRA}\n")
    result = _cadenza("dev", str(_project(tmp_path)), "--env-file", str(env_file), env={})
    assert result.returncode == EXIT_INVALID
    message = " ".join(result.stderr.split())
    assert "Agent/keeper" in message and "CADENZA_CONFIGMAP_SETTINGS_REGION" in message
    assert API_KEY not in result.stdout + result.stderr
