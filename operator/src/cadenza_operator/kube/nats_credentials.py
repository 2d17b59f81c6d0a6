"""The bus's credentials in a cluster: the keys Secret the chart's hook creates, and the
per-Agent credential Secrets the operator mints (security/nats_auth has the mechanism).

Two Secrets and who reads them:
- the keys Secret (`cadenza nats-auth init`, once per install): the seeds, the
  operator-mode block the NATS servers include, and the engine's credential. NATS mounts
  the include, the operator pod mounts the engine credential and the account seed (the
  only seed it needs: it signs user JWTs). Nobody reads it through the API after.
- `<agent>-nats` in each Agent's namespace: a user JWT with `agent_permissions(ns, agent)`
  and its seed, owned by the Agent (it goes with it). The operator only writes it: create,
  or a JSON patch guarded by a `test` of the owner's uid, so it never reads a value and
  never takes over a Secret of that name it did not make.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from ..security.nats_auth import AuthKeys, agent_permissions, engine_permissions, mint_user, server_config
from .api import ApiError, KubeApi, path_of

Json = dict[str, Any]

KEYS_FILE = "keys.json"
"""All three seeds (AuthKeys' format): what rotation and a re-render of the include need."""
ACCOUNT_SEED_FILE = "account.nk"
"""The CADENZA account seed alone: what the operator mounts to mint Agent credentials."""
SERVER_INCLUDE_FILE = "auth.conf"
"""The operator-mode block (server_config) the NATS config includes."""
ENGINE_CREDS_FILE = "engine.creds"
"""The engine's credential (the whole account), mounted by the operator and the test pod."""
AGENT_CREDS_KEY = "nats.creds"
"""The key of an Agent's credential in its `<agent>-nats` Secret."""
AGENT_CA_KEY = "ca.crt"
"""The key of the NATS CA (TLS) in that Secret, beside the credential."""
ENGINE_USER = "cadenza-engine"


def auth_secret_data(keys: AuthKeys) -> dict[str, str]:
    """The keys Secret's files (text), from freshly generated or supplied keys."""
    seeds = {
        "operator": keys.operator_seed,
        "account": keys.account_seed,
        "systemAccount": keys.system_account_seed,
    }
    return {
        KEYS_FILE: json.dumps(seeds),
        ACCOUNT_SEED_FILE: keys.account_seed,
        SERVER_INCLUDE_FILE: server_config(keys),
        ENGINE_CREDS_FILE: mint_user(keys, ENGINE_USER, engine_permissions()),
    }


async def init_auth_secret(api: KubeApi, namespace: str, name: str) -> bool:
    """Create the keys Secret with new keys unless it exists (True: created). Only a
    create: an existing Secret is neither read nor changed, so re-running the hook on
    every upgrade keeps the keys, and deleting the Secret first rotates them."""
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/managed-by": "cadenza", "app.kubernetes.io/component": "nats-auth"},
        },
        "data": _encoded(auth_secret_data(AuthKeys.generate())),
    }
    try:
        await api.create(path_of("v1", "secrets", namespace), secret)
    except ApiError as exc:
        if exc.status == 409:
            return False
        raise
    return True


def account_keys(seed_file: Path) -> AuthKeys:
    """Keys able to mint user credentials from the account seed alone (mint_user signs
    with the account seed only): the operator never holds the operator seed."""
    return AuthKeys(operator_seed="", account_seed=seed_file.read_text().strip(), system_account_seed="")


def agent_creds_secret_name(agent: str) -> str:
    return f"{agent}-nats"


def build_agent_creds_secret(
    namespace: str, agent: str, creds: str, labels: dict[str, str], ca: str | None = None
) -> Json:
    """The `<agent>-nats` Secret holding one Agent's credential (pure), and the CA of a
    NATS that serves TLS when there is one."""
    files = {AGENT_CREDS_KEY: creds} if ca is None else {AGENT_CREDS_KEY: creds, AGENT_CA_KEY: ca}
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {"name": agent_creds_secret_name(agent), "namespace": namespace, "labels": labels},
        "data": _encoded(files),
    }


def mint_agent_creds(keys: AuthKeys, namespace: str, agent: str) -> str:
    """An Agent's credential, named as `cadenza dev --secure` names it (local/secure.py)."""
    return mint_user(keys, f"agent-{namespace}-{agent}", agent_permissions(namespace, agent))


async def write_agent_creds(api: KubeApi, secret: Json, owner_uid: str) -> None:
    """Create the Secret, or replace its data when it exists and this Agent owns it (a
    fresh credential on every reconcile: after a rotation the operator's restart re-mints
    them all). Another's Secret of that name fails the `test` and is left alone."""
    meta = secret["metadata"]
    try:
        await api.create(path_of("v1", "secrets", meta["namespace"]), secret)
        return
    except ApiError as exc:
        if exc.status != 409:
            raise
    patch = [
        {"op": "test", "path": "/metadata/ownerReferences/0/uid", "value": owner_uid},
        {"op": "replace", "path": "/data", "value": secret["data"]},
    ]
    try:
        await api.patch(
            path_of("v1", "secrets", meta["namespace"], meta["name"]),
            patch,
            content_type="application/json-patch+json",
        )
    except ApiError as exc:
        if exc.status == 422:
            raise SecretNotOwned(meta["name"]) from None
        raise


class SecretNotOwned(RuntimeError):
    """A Secret named `<agent>-nats` exists and is not this Agent's."""

    def __init__(self, name: str) -> None:
        super().__init__(f"Secret {name} exists and is not owned by this Agent; delete or rename it")


def _encoded(files: dict[str, str]) -> dict[str, str]:
    return {key: base64.b64encode(text.encode()).decode() for key, text in files.items()}
