"""Per-Agent NATS credentials in a cluster (issue 13): with the account seed mounted (the
chart's authenticated NATS), the operator mints each Agent a user JWT with exactly
`agent_permissions(namespace, agent)`, writes it to the Secret `<agent>-nats` the Agent
owns, and mounts it into the Agent's Deployment. It only writes Secrets: it never reads
one, nor takes over one it did not make. (Kubernetes API emulator, real nats-server, the
real operator in-process.)"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from cadenza_operator.cli import main
from cadenza_operator.local.nats_server import NatsServer
from cadenza_operator.security.nats_auth import AuthKeys, agent_permissions, creds_jwt, decode_jwt, verify_jwt

from ..kube.emulator import KubeEmulator
from ..kube.fixtures import wait_for
from .harness import AGENTS, DEPLOYMENTS, NAMESPACE, RunningOperator, get, manifest, running_operator

pytestmark = pytest.mark.timeout(120)

SECRETS = "v1/secrets"
SPEC = {"image": "registry.example/agents:1", "command": ["python", "agents.py"]}


@pytest.fixture
def keys() -> AuthKeys:
    return AuthKeys.generate()


@pytest.fixture
async def secure_operator(
    kube_emulator: KubeEmulator, cadenza_crds: Any, fresh_nats: NatsServer, keys: AuthKeys, tmp_path: Path
) -> AsyncIterator[RunningOperator]:
    seed = tmp_path / "account.nk"  # what the chart mounts from the keys Secret
    seed.write_text(keys.account_seed)
    async with running_operator(kube_emulator, fresh_nats.url, nats_account_seed_file=str(seed)) as op:
        yield op


def _creds(secret: dict[str, Any]) -> str:
    return base64.b64decode(secret["data"]["nats.creds"]).decode()


async def test_each_agent_gets_its_own_credential_with_exactly_its_permissions(
    kube_emulator: KubeEmulator, secure_operator: RunningOperator, keys: AuthKeys
) -> None:
    for name in ("alpha", "beta"):
        kube_emulator.create_object(AGENTS, manifest("Agent", name, SPEC))
    secrets = {}
    for name in ("alpha", "beta"):
        secrets[name] = await wait_for(lambda n=name: get(kube_emulator, SECRETS, f"{n}-nats"), timeout=60)
        agent = get(kube_emulator, AGENTS, name)
        assert agent is not None
        # owned by its Agent: it goes with it
        assert [r["uid"] for r in secrets[name]["metadata"]["ownerReferences"]] == [agent["metadata"]["uid"]]

        claims = verify_jwt(creds_jwt(_creds(secrets[name])))
        assert claims["iss"] == keys.account_public_key  # signed by the CADENZA account
        assert claims["nats"]["type"] == "user"
        wanted = agent_permissions(NAMESPACE, name)
        assert claims["nats"]["pub"]["allow"] == list(wanted.publish)
        # its replies: only the inboxes named after its own key (cadenza.nats.inbox_prefix)
        own = [f"_INBOX_{claims['sub']}.>" if sub == "_INBOX.>" else sub for sub in wanted.subscribe]
        assert claims["nats"]["sub"]["allow"] == own

        deployment = await wait_for(lambda n=name: get(kube_emulator, DEPLOYMENTS, f"{n}-agent"), timeout=60)
        pod = deployment["spec"]["template"]["spec"]
        (volume,) = [v for v in pod["volumes"] if "secret" in v]
        assert volume["secret"]["secretName"] == f"{name}-nats"
        (container,) = pod["containers"]
        mount = next(m for m in container["volumeMounts"] if m["name"] == volume["name"])
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["CADENZA_NATS_CREDS"] == f"{mount['mountPath']}/nats.creds"
        assert _creds(secrets[name]) not in str(deployment)  # a reference, never the value

    alpha, beta = (decode_jwt(creds_jwt(_creds(secrets[n])))[1] for n in ("alpha", "beta"))
    assert alpha["sub"] != beta["sub"]  # two identities, two keys
    # The operator wrote Secrets and never read, listed or watched one.
    verbs = {call.verb for call in kube_emulator.request_log if call.resource == "secrets"}
    assert verbs and verbs <= {"create", "patch"}


async def test_a_secret_of_that_name_it_did_not_make_is_left_alone(
    kube_emulator: KubeEmulator, secure_operator: RunningOperator
) -> None:
    theirs = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "gamma-nats", "namespace": NAMESPACE},
        "data": {"nats.creds": base64.b64encode(b"someone else's").decode()},
    }
    kube_emulator.create_object(SECRETS, theirs)
    kube_emulator.create_object(AGENTS, manifest("Agent", "gamma", SPEC))
    kube_emulator.create_object(AGENTS, manifest("Agent", "delta", SPEC))
    await wait_for(lambda: get(kube_emulator, SECRETS, "delta-nats"), timeout=60)
    await wait_for(
        lambda: (
            [c for c in kube_emulator.request_log if c.verb == "patch" and c.resource == "secrets"] or None
        ),
        timeout=60,
    )
    secret = get(kube_emulator, SECRETS, "gamma-nats")
    assert secret is not None and secret["data"] == theirs["data"]
    assert not secret["metadata"].get("ownerReferences")
    assert get(kube_emulator, DEPLOYMENTS, "gamma-agent") is None  # not mounted: not given


async def test_nats_auth_init_creates_the_keys_secret_once_and_only_creates(
    kube_emulator: KubeEmulator, kubeconfig: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The chart's hook command: keys, the server include and the engine's credential, all
    from one set of keys; run again (every upgrade) it keeps them; it only creates (its
    Role allows nothing else)."""
    argv = ["nats-auth", "init", "--namespace", NAMESPACE, "--secret", "cadenza-nats-auth"]
    assert await asyncio.to_thread(main, argv) == 0
    secret = get(kube_emulator, SECRETS, "cadenza-nats-auth")
    assert secret is not None
    files = {key: base64.b64decode(value).decode() for key, value in secret["data"].items()}
    assert set(files) == {"keys.json", "account.nk", "auth.conf", "engine.creds"}
    keys_file = Path(kubeconfig.parent / "keys.json")
    keys_file.write_text(files["keys.json"])
    keys = AuthKeys.load(keys_file)
    assert files["account.nk"] == keys.account_seed
    assert "operator: " in files["auth.conf"] and f"  {keys.account_public_key}: " in files["auth.conf"]
    engine = verify_jwt(creds_jwt(files["engine.creds"]))
    assert engine["iss"] == keys.account_public_key and engine["nats"]["pub"]["allow"] == [">"]

    assert await asyncio.to_thread(main, argv) == 0
    again = get(kube_emulator, SECRETS, "cadenza-nats-auth")
    assert again is not None and again["data"] == secret["data"]  # the keys are kept
    assert "created" in capsys.readouterr().out.splitlines()[0]
    assert {call.verb for call in kube_emulator.request_log if call.resource == "secrets"} == {"create"}


def test_nats_auth_init_without_kubernetes_credentials_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert main(["nats-auth", "init", "--namespace", NAMESPACE, "--secret", "keys"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no Kubernetes credentials") and "Traceback" not in err
