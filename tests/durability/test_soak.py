"""The soak at CI size: 200 runs while engines, agents and nats-server are killed and
restarted and poison is injected. Nothing may be lost, stuck, wrong, started after being
abandoned or applied twice; exactly the injected poison is dead-lettered.

SOAK_RUNS, SOAK_SEED and SOAK_SECONDS change the size; the closing run of issue 9 is
`python -m tests.durability.soak --runs 2000 --seconds 900`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from .soak import SoakConfig, run_soak

RUNS = int(os.environ.get("SOAK_RUNS", "200"))
SEED = int(os.environ.get("SOAK_SEED", str(SoakConfig.seed)))
SECONDS = float(os.environ.get("SOAK_SECONDS", "200"))


@pytest.mark.timeout(SECONDS + 90)
async def test_runs_survive_killed_engines_agents_and_server_restarts(tmp_path: Path) -> None:
    report = await run_soak(SoakConfig(runs=RUNS, seconds=SECONDS, seed=SEED, workdir=tmp_path))
    print(json.dumps(report, indent=2, default=str))  # shown by pytest when the test fails
    headline = {k: v for k, v in report.items() if k not in ("details", "poison_run", "consumers")}
    assert report["failures"] == [], json.dumps(headline, default=str)
