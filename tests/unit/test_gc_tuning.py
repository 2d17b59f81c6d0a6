"""The garbage collector of a process that hosts an engine (engine.host.tune_gc): tuned
when `cadenza engine|operator|dev|run` is the process, untouched when other code calls
the CLI's `main` (a test, an embedding program). Each case runs in its own interpreter:
tuning this one would change it for every later test."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from cadenza_operator.engine.host import GC_YOUNG_THRESHOLD

PROBE = textwrap.dedent(
    """
    import asyncio, gc, json, sys
    import cadenza_operator.engine.serve as serve_module
    from cadenza_operator import cli

    async def serve(settings, operations=None):  # stands in for the engine: reports its collector
        print(json.dumps({"threshold": gc.get_threshold(), "frozen": gc.get_freeze_count()}))

    serve_module.serve = serve
    argv = ["engine", "--nats", "nats://127.0.0.1:1"]
    if sys.argv[1] == "process":
        sys.argv = ["cadenza", *argv]
        code = cli.main()
    else:
        code = cli.main(argv)
    sys.exit(code)
    """
)


def _collector(mode: str) -> dict[str, object]:
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    doc: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return doc


def test_cadenza_engine_as_the_process_tunes_its_collector() -> None:
    found = _collector("process")
    threshold = found["threshold"]
    assert isinstance(threshold, list) and threshold[0] == GC_YOUNG_THRESHOLD
    assert isinstance(found["frozen"], int) and found["frozen"] > 10_000  # the imports, at least


def test_main_called_from_code_leaves_the_collector_alone() -> None:
    found = _collector("called")
    threshold = found["threshold"]
    assert isinstance(threshold, list) and threshold[0] == 700  # CPython's default
    assert found["frozen"] == 0
