"""The NATS CA reaches Agents (the chart's `nats.tls`): with per-Agent credentials, the
operator puts its own CA (CADENZA_NATS_CA) beside the credential in each `<agent>-nats`
Secret, and the Deployment mounts both and points CADENZA_NATS_CA at the CA. (Kubernetes
API emulator, real nats-server, the real operator in-process.)"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
from cadenza_operator.kube import builders
from cadenza_operator.local.nats_server import NatsServer
from cadenza_operator.models import Agent
from cadenza_operator.security.nats_auth import AuthKeys

from ..kube.emulator import KubeEmulator
from ..kube.fixtures import wait_for
from ..security.test_nats_tls import make_certs
from .harness import AGENTS, DEPLOYMENTS, manifest, running_operator
from .harness import get as get_object

pytestmark = pytest.mark.timeout(120)

SPEC = {"image": "registry.example/agents:1", "command": ["python", "agents.py"]}


async def test_each_agents_secret_carries_the_ca_and_its_pods_trust_it(
    kube_emulator: KubeEmulator, cadenza_crds: Any, fresh_nats: NatsServer, tmp_path: Path
) -> None:
    seed = tmp_path / "account.nk"
    seed.write_text(AuthKeys.generate().account_seed)
    ca = make_certs(tmp_path).ca  # what the chart mounts from the TLS Secret, ca.crt alone
    settings = {"nats_account_seed_file": str(seed), "nats_ca": str(ca)}
    async with running_operator(kube_emulator, fresh_nats.url, **settings):
        kube_emulator.create_object(AGENTS, manifest("Agent", "alpha", SPEC))
        secret = await wait_for(lambda: get_object(kube_emulator, "v1/secrets", "alpha-nats"), timeout=60)
        assert base64.b64decode(secret["data"]["ca.crt"]).decode() == ca.read_text()
        assert "nats.creds" in secret["data"]
        deployment = await wait_for(lambda: get_object(kube_emulator, DEPLOYMENTS, "alpha-agent"), timeout=60)
    pod = deployment["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if "secret" in v]
    assert volume["secret"]["secretName"] == "alpha-nats"
    assert sorted(i["key"] for i in volume["secret"]["items"]) == ["ca.crt", "nats.creds"]
    (container,) = pod["containers"]
    mount = next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == volume["name"])
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["CADENZA_NATS_CA"] == f"{mount}/ca.crt"
    assert env["CADENZA_NATS_CREDS"] == f"{mount}/nats.creds"


def test_without_a_credential_secret_there_is_no_ca_to_mount() -> None:
    agent = Agent.model_validate({"metadata": {"name": "alpha", "namespace": "default"}, "spec": SPEC})
    deployment = builders.build_deployment(agent, nats_url="tls://nats:4222", replicas=1, nats_ca="ca.crt")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert "CADENZA_NATS_CA" not in {e["name"] for e in container["env"]}
