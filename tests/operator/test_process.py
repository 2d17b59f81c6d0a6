"""The operator as a process: `cadenza operator` from its environment (kubeconfig, NATS,
health endpoint, SIGTERM), and kopf peering between two replicas."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from cadenza_operator.local.nats_server import NatsServer, free_port

from ..kube.emulator import KubeEmulator
from ..kube.fixtures import wait_for
from .harness import AGENTS, DEPLOYMENTS, NAMESPACE, ROOT, RunningOperator, get, manifest, operator_settings

PEERINGS = "kopf.dev/v1/clusterkopfpeerings"


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as response:
        body: bytes = response.read()
        return body


def _healthy(port: int) -> bool:
    # Called from wait_for between event-loop turns: a short, local, blocking probe.
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=0.5) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def _agent_env(emulator: KubeEmulator, name: str) -> dict[str, str]:
    deployment = get(emulator, DEPLOYMENTS, f"{name}-agent") or {}
    containers = deployment.get("spec", {}).get("template", {}).get("spec", {}).get("containers") or [{}]
    return {e["name"]: e["value"] for e in containers[0].get("env", [])}


async def test_cadenza_operator_command_runs_from_its_environment(
    kube_emulator: KubeEmulator, cadenza_crds: Any, kubeconfig: Path, nats_server: NatsServer, tmp_path: Path
) -> None:
    health, metrics = free_port(), free_port()
    env = {
        **os.environ,
        "KUBECONFIG": str(kubeconfig),
        "CADENZA_NATS_URL": nats_server.url,
        "CADENZA_AGENT_NATS_URL": "nats://nats.cadenza-system:4222",
        "CADENZA_PEERING": "",
        "CADENZA_HEALTH_PORT": str(health),
        "CADENZA_METRICS_PORT": str(metrics),
        "CADENZA_LOG_FORMAT": "json",
        "POD_ID": "cadenza-operator-0",
    }
    log_path = tmp_path / "operator.log"
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "cadenza_operator.cli",
            "operator",
            env=env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        await wait_for(lambda: _healthy(health), timeout=30, interval=0.2)
        kube_emulator.create_object(AGENTS, manifest("Agent", "courier", {"image": "registry.example/a:1"}))
        env_of = await wait_for(lambda: _agent_env(kube_emulator, "courier"), timeout=30)
        assert env_of["CADENZA_NATS_URL"] == "nats://nats.cadenza-system:4222"
        assert b"cadenza_agent_pending_tasks" in await asyncio.to_thread(
            _get, f"http://127.0.0.1:{metrics}/metrics"
        )
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), 30)
        assert code == 0, log_path.read_text()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_peering_lets_one_replica_act_and_the_other_take_over(
    kube_emulator: KubeEmulator, cadenza_crds: Any, nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    # kopf says at INFO when a replica pauses or resumes and when a handler runs: should a
    # wait below run out, the report shows which replica stood where.
    caplog.set_level(logging.INFO, logger="kopf")
    kube_emulator.load_crds(ROOT / "charts" / "cadenza" / "files" / "kopf")
    kube_emulator.create_object(
        PEERINGS,
        {"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": "cadenza-test"}},
    )

    def replica(name: str, priority: int) -> RunningOperator:
        settings = operator_settings(
            nats_server.url,
            peering="cadenza-test",
            peering_priority=priority,
            peer_id=name,
            agent_nats_url=f"nats://{name}:4222",
        )
        return RunningOperator(kube_emulator, settings)

    leader, standby = replica("leader", 200), replica("standby", 100)
    await leader.start()
    await standby.start()
    try:
        # Both announce themselves in the peering object.
        await wait_for(
            lambda: (
                {"leader", "standby"}
                <= set((kube_emulator.get_object(PEERINGS, None, "cadenza-test") or {}).get("status") or {})
            ),
            timeout=60,
        )
        kube_emulator.create_object(AGENTS, manifest("Agent", "relay", {"image": "registry.example/a:1"}))
        # Bounded like the waits above: two operators, an emulator and two engines share
        # one event loop with whatever the other test worker runs (once, under two
        # workers, no Deployment within 20 s; not reproduced in 20 runs under a CPU hog).
        env = await wait_for(lambda: _agent_env(kube_emulator, "relay"), timeout=60)
        assert env["CADENZA_NATS_URL"] == "nats://leader:4222"
        await asyncio.sleep(1.0)  # several handler/timer rounds of a standby that would act
        assert _agent_env(kube_emulator, "relay")["CADENZA_NATS_URL"] == "nats://leader:4222"

        await leader.stop()  # leaves the peering object: the standby resumes
        kube_emulator.patch_object(AGENTS, NAMESPACE, "relay", {"spec": {"concurrency": 7}})
        env = await wait_for(
            lambda: (e := _agent_env(kube_emulator, "relay")).get("CADENZA_CONCURRENCY") == "7" and e,
            timeout=60,
        )
        assert env["CADENZA_NATS_URL"] == "nats://standby:4222"
    finally:
        await standby.stop()
        await leader.stop()
