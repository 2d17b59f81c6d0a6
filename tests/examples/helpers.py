"""Shared by the example tests: run an example through the CLI, import its agents.py."""

from __future__ import annotations

import importlib.util
import json
import sys
from types import ModuleType
from typing import Any

from ..conftest import EXAMPLES, cadenza


def run_example(name: str, *extra: str, input_file: bool = True, timeout: float = 120) -> dict[str, Any]:
    """`cadenza run examples/NAME --input @examples/NAME/input.json EXTRA... --output json`, parsed.

    Fails the test with the CLI's stderr when the command does not print a JSON document.
    """
    args = ["run", f"examples/{name}"]
    if input_file:
        args += ["--input", f"@examples/{name}/input.json"]
    result = cadenza(*args, *extra, "--output", "json", timeout=timeout)
    try:
        doc: dict[str, Any] = json.loads(result.stdout)
    except json.JSONDecodeError:
        raise AssertionError(
            f"exit {result.returncode}, no JSON on stdout\n{result.stdout}\n{result.stderr}"
        ) from None
    doc["_exit"] = result.returncode
    doc["_stderr"] = result.stderr
    return doc


def assert_succeeded(doc: dict[str, Any]) -> None:
    assert doc["phase"] == "Succeeded", (doc["message"], doc.get("agentLogs"), doc["_stderr"][-3000:])
    assert doc["_exit"] == 0


def phases(doc: dict[str, Any]) -> dict[str, str]:
    return {name: step["phase"] for name, step in doc["steps"].items()}


def load_agents(example: str) -> ModuleType:
    """Import examples/EXAMPLE/agents.py under a module name of its own (every example has an agents.py)."""
    name = f"example_{example.replace('-', '_')}_agents"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / example / "agents.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
