"""The minted NATS JWTs: decoded, and checked for issuer, subject, permissions and signature."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import nkeys
import pytest
from cadenza.nats import inbox_prefix
from cadenza_operator.security.nats_auth import (
    AuthKeys,
    Permissions,
    agent_permissions,
    client_permissions,
    creds_jwt,
    decode_jwt,
    engine_permissions,
    mint_user,
    server_config,
    verify_jwt,
    write_creds,
)


@pytest.fixture(scope="module")
def keys() -> AuthKeys:
    return AuthKeys.generate()


def test_user_jwt_is_signed_by_the_account_for_the_creds_seed(keys: AuthKeys) -> None:
    creds = mint_user(keys, "agent-a", agent_permissions("default", "a"))
    token = creds_jwt(creds)
    header, _ = decode_jwt(token)
    assert header == {"typ": "JWT", "alg": "ed25519-nkey"}
    claims = verify_jwt(token)
    assert claims["iss"] == keys.account_public_key
    assert claims["name"] == "agent-a"
    assert claims["nats"]["type"] == "user" and claims["nats"]["version"] == 2
    seed = creds.split("-----BEGIN USER NKEY SEED-----\n")[1].split("\n")[0]
    user = nkeys.from_seed(seed.encode())
    assert claims["sub"] == user.public_key.decode()
    assert claims["sub"].startswith("U") and claims["iss"].startswith("A")


def test_a_tampered_jwt_does_not_verify(keys: AuthKeys) -> None:
    token = creds_jwt(mint_user(keys, "c", client_permissions("default", "alice")))
    header, claims, signature = token.split(".")
    _, decoded = decode_jwt(token)
    decoded["nats"]["pub"] = {"allow": [">"]}  # a user widening its own permissions
    widened = base64.urlsafe_b64encode(json.dumps(decoded).encode()).decode().rstrip("=")
    with pytest.raises(nkeys.ErrInvalidSignature):
        verify_jwt(f"{header}.{widened}.{signature}")
    assert verify_jwt(f"{header}.{claims}.{signature}")["name"] == "c"


def test_permissions_are_written_as_allow_lists(keys: AuthKeys) -> None:
    perms = Permissions(publish=("a.b", "c.>"), subscribe=("_INBOX.>", "d.*"))
    creds = mint_user(keys, "x", perms)
    claims = verify_jwt(creds_jwt(creds))
    assert claims["nats"]["pub"] == {"allow": ["a.b", "c.>"]}
    # A role's replies are minted as the credential's own inboxes, never everyone's.
    assert claims["nats"]["sub"] == {"allow": [f"_INBOX_{claims['sub']}.>", "d.*"]}


def test_a_connection_makes_its_inboxes_where_its_credential_may_read_them(
    keys: AuthKeys, tmp_path: Path
) -> None:
    creds = write_creds(
        tmp_path / "x.creds", mint_user(keys, "x", Permissions(publish=(), subscribe=("_INBOX.>",)))
    )
    claims = verify_jwt(creds_jwt(creds.read_text()))
    assert inbox_prefix(str(creds)) == f"_INBOX_{claims['sub']}"
    assert claims["nats"]["sub"]["allow"] == [f"{inbox_prefix(str(creds))}.>"]
    (tmp_path / "junk.creds").write_text("not a creds file")
    assert inbox_prefix(str(tmp_path / "junk.creds")) is None and inbox_prefix(str(tmp_path / "none")) is None


def test_agent_role_is_scoped_to_its_own_agent_and_namespace() -> None:
    perms = agent_permissions("team", "writer")
    assert "$JS.API.CONSUMER.MSG.NEXT.CADENZA_TASKS.agent_team_writer" in perms.publish
    assert "cadenza.event.team.*.agent.writer" in perms.publish
    assert "cadenza.cancel.team.*" in perms.subscribe
    everything = " ".join(perms.publish + perms.subscribe)
    for forbidden in ("cadenza.control", "cadenza.task.", "KV_cadenza_runs", "STREAM.DELETE", "STREAM.PURGE"):
        assert forbidden not in everything
    assert ">" not in perms.publish and ">" not in perms.subscribe


def test_client_role_controls_only_its_namespace_as_its_user() -> None:
    perms = client_permissions("team", "alice")
    assert [s for s in perms.publish if s.startswith("cadenza.")] == ["cadenza.control.team.alice"]
    assert engine_permissions().publish == (">",)


def test_server_config_preloads_both_accounts_signed_by_the_operator(keys: AuthKeys) -> None:
    config = server_config(keys)
    lines = dict(line.strip().split(": ", 1) for line in config.splitlines() if ": " in line)
    operator = verify_jwt(lines["operator"])
    assert operator["iss"] == operator["sub"] == keys.operator_public_key
    assert operator["nats"]["system_account"] == keys.system_account_public_key
    assert lines["system_account"] == keys.system_account_public_key
    assert lines["resolver"] == "MEMORY"
    account = verify_jwt(lines[keys.account_public_key])
    assert account["iss"] == keys.operator_public_key and account["name"] == "CADENZA"
    assert account["nats"]["limits"]["disk_storage"] == -1  # JetStream enabled
    system = verify_jwt(lines[keys.system_account_public_key])
    assert system["nats"]["limits"]["disk_storage"] == 0


def test_keys_round_trip_owner_only(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "keys.json"
    keys = AuthKeys.load_or_generate(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert AuthKeys.load_or_generate(path) == keys
