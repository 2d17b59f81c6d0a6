"""`benchmarks/run.py --quick` runs end to end and writes its JSON.

A smoke test of the harness only: the ratios are reported, never asserted (timings on
a shared CI machine are not a pass/fail signal).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _bench(out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`benchmarks/run.py --quick ARGS --output OUT`, which must succeed."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", *args, "--output", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_quick_benchmark_writes_ratio_table(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = _bench(out, "--shapes", "chain10")
    assert "chain10" in proc.stdout and "ratio" in proc.stdout  # the printed table

    doc = json.loads(out.read_text())
    assert set(doc["shapes"]) == {"chain10"}
    entry = doc["shapes"]["chain10"]
    for system in ("cadenza", "baseline"):
        stats = entry[system]
        assert stats["n"] >= 1
        for key in ("median_ms", "p99_ms"):
            assert isinstance(stats[key], float) and math.isfinite(stats[key]), (system, key, stats[key])
    assert isinstance(entry["ratio"], float) and math.isfinite(entry["ratio"])

    # Everything the benchmark started is gone once it returns.
    leftovers = {name: pid for name, pid in doc["meta"]["processes"].items() if _alive(pid)}
    assert not leftovers, f"processes left running: {leftovers}"


def test_baseline_on_the_engines_transport(tmp_path: Path) -> None:
    """`--baseline-transport cadenza`: the baseline alone, publishing through cadenza's Publisher.

    The baseline checks every run's result (a chain ends at n), so this fails if that
    publish path loses or garbles a message.
    """
    out = tmp_path / "bench.json"
    proc = _bench(
        out, "--shapes", "chain10,fan100", "--systems", "baseline", "--baseline-transport", "cadenza"
    )
    assert "baseline transport: cadenza" in proc.stdout
    doc = json.loads(out.read_text())
    assert doc["meta"]["baseline_transport"] == "cadenza"
    assert {name: doc["shapes"][name]["baseline"]["n"] >= 1 for name in ("chain10", "fan100")} == {
        "chain10": True,
        "fan100": True,
    }
