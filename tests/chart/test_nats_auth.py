"""The chart's authenticated NATS (issue 13): the keys hook and its least-privilege RBAC,
who mounts what from the keys Secret, and the real nats-server started with the config
the chart renders plus the include `cadenza nats-auth init` writes."""

from __future__ import annotations

import asyncio
import json
import posixpath
from pathlib import Path
from typing import Any

import nats
import pytest
from cadenza.nats import inbox_prefix
from cadenza.wire import TASKS_STREAM, consumer_name, task_subject
from cadenza_operator.engine.infra import ensure_agent_consumer, ensure_infrastructure
from cadenza_operator.kube import nats_credentials
from cadenza_operator.security.nats_auth import AuthKeys

from .nats import local_config, statefulset_server
from .rbac import allows, rules_of
from .render import NAMESPACE, of_kind, one, render, scenario_values

KEYS_SECRET = "cadenza-nats-auth"
HOOK = "cadenza-nats-auth-init"


def _hook(obj: dict[str, Any]) -> str | None:
    return (obj["metadata"].get("annotations") or {}).get("helm.sh/hook")


def _pod(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    return dict(one(objects, kind)["spec"]["template"]["spec"])


def _secret_volumes(pod: dict[str, Any]) -> dict[str, tuple[str, list[str]]]:
    """volume name -> (Secret, keys mounted)."""
    return {
        v["name"]: (v["secret"]["secretName"], [i["key"] for i in v["secret"]["items"]])
        for v in pod["volumes"]
        if "secret" in v
    }


def _mounts(container: dict[str, Any]) -> dict[str, str]:
    return {m["name"]: m["mountPath"] for m in container["volumeMounts"]}


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def test_the_hook_job_creates_the_keys_secret_before_install_and_upgrade() -> None:
    objects = render()
    job = one(objects, "Job", HOOK)
    assert _hook(job) == "pre-install,pre-upgrade"
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["command"] == [
        "cadenza", "nats-auth", "init", "--namespace", NAMESPACE, "--secret", KEYS_SECRET,
    ]  # fmt: skip
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    # Its RBAC exists before it runs (lower weight), and goes with it.
    for kind in ("ServiceAccount", "Role", "RoleBinding"):
        obj = one(objects, kind, HOOK)
        assert _hook(obj) == "pre-install,pre-upgrade"
        assert int(obj["metadata"]["annotations"]["helm.sh/hook-weight"]) < int(
            job["metadata"]["annotations"]["helm.sh/hook-weight"]
        )


def test_the_hook_may_only_create_secrets_in_the_release_namespace() -> None:
    objects = render()
    job_objects = [o for o in objects if o["metadata"]["name"] == HOOK]
    (binding,) = of_kind(job_objects, "RoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": HOOK, "namespace": NAMESPACE}]
    assert _pod(job_objects, "Job")["serviceAccountName"] == HOOK
    # rules_of reads the Deployment's ServiceAccount: show it the Job's pod as one.
    as_deployment = {"kind": "Deployment", "metadata": {"namespace": NAMESPACE, "name": HOOK}, "spec": {
        "template": {"spec": {"serviceAccountName": HOOK}}}}  # fmt: skip
    rules = rules_of([as_deployment, *[o for o in objects if o["kind"] in {"Role", "RoleBinding"}]])
    assert {(r.api_group, r.resource, r.verb, r.namespace) for r in rules} == {
        ("", "secrets", "create", NAMESPACE)
    }
    assert not allows(rules, "get", "", "secrets", namespace=NAMESPACE)
    assert not allows(rules, "create", "", "secrets", namespace="elsewhere")
    assert not [o for o in of_kind(objects, "ClusterRoleBinding") if o["subjects"][0]["name"] == HOOK]


def test_the_operator_mounts_the_engine_credential_and_the_account_seed_only() -> None:
    objects = render()
    pod = _pod(objects, "Deployment")
    (container,) = pod["containers"]
    volumes, mounts, env = _secret_volumes(pod), _mounts(container), _env(container)
    assert volumes == {
        "nats-creds": (KEYS_SECRET, ["engine.creds"]),
        "nats-account": (KEYS_SECRET, ["account.nk"]),
    }
    assert env["CADENZA_NATS_CREDS"] == f"{mounts['nats-creds']}/engine.creds"
    assert env["CADENZA_NATS_ACCOUNT_SEED_FILE"] == f"{mounts['nats-account']}/account.nk"
    # Agents get their own credential from the operator, not a shared Secret.
    assert "CADENZA_AGENT_NATS_CREDS_SECRET" not in env
    # The operator may write the Agents' credential Secrets, never read one.
    rules = rules_of(objects)
    assert allows(rules, "create", "", "secrets", namespace="team") and allows(
        rules, "patch", "", "secrets", namespace="team"
    )
    assert not any(allows(rules, verb, "", "secrets", namespace="team") for verb in ("get", "list", "watch"))
    # The helm test pod connects as the engine; it gets no seed.
    test_pod = next(p for p in of_kind(objects, "Pod") if _hook(p) == "test")
    assert _secret_volumes(test_pod["spec"]) == {"nats-creds": (KEYS_SECRET, ["engine.creds"])}


def test_nats_mounts_only_the_server_include_and_includes_it() -> None:
    objects = render()
    pod = _pod(objects, "StatefulSet")
    (container,) = pod["containers"]
    mounts = _mounts(container)
    assert _secret_volumes(pod) == {"auth": (KEYS_SECRET, ["auth.conf"])}
    config = one(objects, "ConfigMap", "cadenza-nats-config")["data"]["nats.conf"]
    (include,) = [line.split()[1] for line in config.splitlines() if line.strip().startswith("include ")]
    # nats-server resolves an include against the including file's folder
    assert posixpath.normpath(posixpath.join(mounts["config"], include)) == f"{mounts['auth']}/auth.conf"


def test_an_existing_keys_secret_replaces_the_hook() -> None:
    objects = render({"nats": {"auth": {"existingSecret": "my-keys"}}})
    assert not [o for o in objects if o["metadata"]["name"] == HOOK]
    assert _secret_volumes(_pod(objects, "Deployment")) == {
        "nats-creds": ("my-keys", ["engine.creds"]),
        "nats-account": ("my-keys", ["account.nk"]),
    }
    assert _secret_volumes(_pod(objects, "StatefulSet")) == {"auth": ("my-keys", ["auth.conf"])}


@pytest.mark.parametrize(
    "values",
    [{"nats": {"auth": {"enabled": False}}}, scenario_values("external-nats")],
    ids=["auth-off", "external-nats"],
)
def test_without_the_bundled_authenticated_nats_there_are_no_keys(values: dict[str, Any]) -> None:
    objects = render(values)
    assert not [o for o in objects if o["metadata"]["name"] == HOOK]
    assert "CADENZA_NATS_ACCOUNT_SEED_FILE" not in _env(_pod(objects, "Deployment")["containers"][0])
    assert not [r for r in rules_of(objects) if r.resource == "secrets"]
    for config in of_kind(objects, "ConfigMap"):
        assert "include" not in config.get("data", {}).get("nats.conf", "")


# --------------------------------------------------------------------------- the real server


class _Refusals:
    """The server's permissions violations on a connection (nats-py hands them to
    error_cb, not to the publish that caused them)."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.changed = asyncio.Event()

    async def record(self, exc: Exception) -> None:
        self.errors.append(str(exc).lower())
        self.changed.set()

    async def wait_for(self, subject: str) -> None:
        async with asyncio.timeout(10):  # the violation arrives before the flush's PONG
            while not any(f'"{subject.lower()}"' in e for e in self.errors):
                self.changed.clear()
                await self.changed.wait()


async def _connect(url: str, creds: Path | None = None, refusals: _Refusals | None = None) -> Any:
    options: dict[str, Any] = {"user_credentials": str(creds)} if creds else {}
    if creds and (prefix := inbox_prefix(str(creds))):
        options["inbox_prefix"] = prefix  # as every client of ours connects
    if refusals is not None:
        options["error_cb"] = refusals.record
    return await nats.connect(url, allow_reconnect=False, max_reconnect_attempts=0, **options)


async def test_the_rendered_config_with_the_init_keys_authenticates_every_client(
    tmp_path: Path,
) -> None:
    # What `cadenza nats-auth init` puts in the keys Secret, mounted as the chart mounts it.
    data = nats_credentials.auth_secret_data(AuthKeys.generate())
    (tmp_path / "nats-auth").mkdir()
    (tmp_path / "nats-auth" / "auth.conf").write_text(data["auth.conf"])
    seed_file = tmp_path / "account.nk"
    seed_file.write_text(data["account.nk"])
    engine_creds = tmp_path / "engine.creds"
    engine_creds.write_text(data["engine.creds"])

    objects = render()
    config, port = local_config(
        one(objects, "ConfigMap", "cadenza-nats-config")["data"]["nats.conf"], tmp_path
    )
    conf = tmp_path / "nats" / "nats.conf"  # so that the include ../nats-auth/auth.conf resolves
    conf.parent.mkdir()
    conf.write_text(config)
    url = f"nats://127.0.0.1:{port}"
    async with statefulset_server(objects, conf):
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await _connect(url)

        engine = await _connect(url, engine_creds)
        try:
            js = engine.jetstream()
            await ensure_infrastructure(js)
            for agent in ("a", "b"):
                await ensure_agent_consumer(js, "team", agent)
                await js.publish(task_subject("team", agent), json.dumps({"for": agent}).encode())

            # Agent a's credential, minted as the operator mints it (kube/agents.py).
            keys = nats_credentials.account_keys(seed_file)
            agent_creds = tmp_path / "a.creds"
            agent_creds.write_text(nats_credentials.mint_agent_creds(keys, "team", "a"))
            refusals = _Refusals()
            agent = await _connect(url, agent_creds, refusals)
            try:
                pull = json.dumps({"batch": 1, "expires": 5_000_000_000}).encode()
                inbox = agent.new_inbox()
                sub = await agent.subscribe(inbox)
                own = f"$JS.API.CONSUMER.MSG.NEXT.{TASKS_STREAM}.{consumer_name('team', 'a')}"
                await agent.publish(own, pull, reply=inbox)
                assert json.loads((await sub.next_msg(timeout=10)).data) == {"for": "a"}

                theirs = f"$JS.API.CONSUMER.MSG.NEXT.{TASKS_STREAM}.{consumer_name('team', 'b')}"
                await agent.publish(theirs, pull, reply=inbox)
                await agent.flush()
                await refusals.wait_for(theirs)
                info = await js.consumer_info(TASKS_STREAM, consumer_name("team", "b"))
                assert info.num_pending == 1  # b's task is still there
            finally:
                await agent.close()
        finally:
            await engine.close()
