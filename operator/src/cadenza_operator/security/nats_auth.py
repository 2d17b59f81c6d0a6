"""The authenticated bus: NATS decentralized auth (operator mode, JWT + nkeys).

One operator key signs two accounts: CADENZA (JetStream enabled; every Cadenza identity
is a user of it) and SYS (the system account nats-server wants). Both account JWTs are
preloaded into the server's config (`resolver: MEMORY`), so the server never changes when
an identity is added: whoever holds the CADENZA account seed (the operator, or `cadenza
dev --secure`) mints a user JWT with that identity's own publish/subscribe allow-lists,
and hands it over as a .creds file. Agents come and go as CRs; each gets its own scoped
credential without re-rendering and reloading the server config, which users and
permissions written into nats-server.conf would need.

The JWTs are the NATS v2 claim format, minted here rather than by `nsc`
(https://docs.nats.io/running-a-nats-service/configuration/securing_nats/jwt and
https://github.com/nats-io/jwt): a header `{"typ": "JWT", "alg": "ed25519-nkey"}`, claims
`{jti, iat, iss, sub, name, nats: {..., type, version: 2}}` where `iss` is the signer's
public nkey and `sub` the subject's, and an ed25519 signature by the issuer's seed over
`base64url(header) + "." + base64url(claims)` (unpadded base64url throughout).

Roles (the allow-lists below; anything not allowed is refused by the server):
- engine: everything Cadenza needs, i.e. the whole CADENZA account.
- agent: pull and ack only its own Agent's task consumer, publish attempt events only on
  its own agent subject, the context, claims, limits and payload operations the SDK makes.
- client (CLI, console): control requests on `cadenza.control.<ns>.<user>`, so the engine
  learns who asks from the subject (nats-server does not tell a responder who sent a
  request), and reads of run records, outputs and definitions.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nkeys
from cadenza.models import LIMITS_BUCKET
from cadenza.nats import INBOX_PREFIX
from cadenza.wire import (
    CLAIMS_BUCKET,
    CONTEXT_BUCKET,
    DEFINITIONS_BUCKET,
    LOGS_STREAM,
    OUTPUTS_BUCKET,
    RUN_STATUS_BUCKET,
    RUNS_BUCKET,
    TASKS_STREAM,
    consumer_name,
    payloads_store,
)

ACCOUNT_NAME = "CADENZA"
SYSTEM_ACCOUNT_NAME = "SYS"
CONTROL_PREFIX = "cadenza.control"  # engine.control.CONTROL_PREFIX (security sits below the engine)

_UNLIMITED = -1


@dataclass(frozen=True)
class Permissions:
    """A user's allow-lists: subjects it may publish on and subscribe to (wildcards allowed)."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]


@dataclass(frozen=True)
class AuthKeys:
    """The three seeds everything else derives from. The account seed mints credentials:
    it is the one secret to guard (rotate it by generating new keys and re-minting)."""

    operator_seed: str
    account_seed: str
    system_account_seed: str

    @classmethod
    def generate(cls) -> AuthKeys:
        return cls(
            operator_seed=_new_seed(nkeys.PREFIX_BYTE_OPERATOR),
            account_seed=_new_seed(nkeys.PREFIX_BYTE_ACCOUNT),
            system_account_seed=_new_seed(nkeys.PREFIX_BYTE_ACCOUNT),
        )

    @classmethod
    def load(cls, path: Path) -> AuthKeys:
        data = json.loads(path.read_text())
        return cls(
            operator_seed=data["operator"],
            account_seed=data["account"],
            system_account_seed=data["systemAccount"],
        )

    def store(self, path: Path) -> None:
        """Written owner-only (0600) from the start: the seeds never sit readable by others."""
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(
            {
                "operator": self.operator_seed,
                "account": self.account_seed,
                "systemAccount": self.system_account_seed,
            }
        )
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)

    @classmethod
    def load_or_generate(cls, path: Path) -> AuthKeys:
        if path.exists():
            return cls.load(path)
        keys = cls.generate()
        keys.store(path)
        return keys

    @property
    def account_public_key(self) -> str:
        return _public(self.account_seed)

    @property
    def operator_public_key(self) -> str:
        return _public(self.operator_seed)

    @property
    def system_account_public_key(self) -> str:
        return _public(self.system_account_seed)


def server_config(keys: AuthKeys, *, now: int | None = None) -> str:
    """The operator-mode block of a nats-server config: the operator JWT, the system
    account, and both account JWTs preloaded (`resolver: MEMORY`). JetStream itself is
    switched on by the rest of the config (or `-js`); the CADENZA account's limits allow it."""
    iat = int(time.time()) if now is None else now
    operator = _sign(
        keys.operator_seed,
        keys.operator_public_key,
        "cadenza",
        {"type": "operator", "version": 2, "system_account": keys.system_account_public_key},
        iat,
    )
    account = _sign(
        keys.operator_seed, keys.account_public_key, ACCOUNT_NAME, _account_claims(jetstream=True), iat
    )
    system = _sign(
        keys.operator_seed,
        keys.system_account_public_key,
        SYSTEM_ACCOUNT_NAME,
        _account_claims(jetstream=False),
        iat,
    )
    return (
        f"operator: {operator}\n"
        f"system_account: {keys.system_account_public_key}\n"
        "resolver: MEMORY\n"
        "resolver_preload: {\n"
        f"  {keys.account_public_key}: {account}\n"
        f"  {keys.system_account_public_key}: {system}\n"
        "}\n"
    )


def mint_user(keys: AuthKeys, name: str, permissions: Permissions, *, now: int | None = None) -> str:
    """A .creds file (user JWT signed by the CADENZA account, then the user's own new seed),
    as nats-py's `user_credentials=` and the nats CLI read it. `name` is the identity the
    engine records (the JWT's `name`)."""
    seed = _new_seed(nkeys.PREFIX_BYTE_USER)
    # `_INBOX.>` in a role's list means "its own replies": the inboxes named after this
    # user's key (cadenza.nats.inbox_prefix), never everyone's.
    own_inbox = f"{INBOX_PREFIX}{_public(seed)}.>"
    subscribe = [own_inbox if subject == "_INBOX.>" else subject for subject in permissions.subscribe]
    claims = {
        "pub": {"allow": list(permissions.publish)},
        "sub": {"allow": subscribe},
        "subs": _UNLIMITED,
        "data": _UNLIMITED,
        "payload": _UNLIMITED,
        "type": "user",
        "version": 2,
    }
    iat = int(time.time()) if now is None else now
    token = _sign(keys.account_seed, _public(seed), name, claims, iat)
    return (
        "-----BEGIN NATS USER JWT-----\n"
        f"{token}\n"
        "------END NATS USER JWT------\n\n"
        "************************* IMPORTANT *************************\n"
        "NKEY Seed printed below can be used to sign and prove identity.\n"
        "NKEYs are sensitive and should be treated as secrets.\n\n"
        "-----BEGIN USER NKEY SEED-----\n"
        f"{seed}\n"
        "------END USER NKEY SEED------\n\n"
        "*************************************************************\n"
    )


def write_creds(path: Path, creds: str) -> Path:
    """A creds file, owner-only (0600) from the start."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(creds)
    return path


def engine_permissions() -> Permissions:
    """The engine creates the streams, buckets and consumers, dispatches tasks, reads every
    event and answers control requests: the whole account."""
    return Permissions(publish=(">",), subscribe=(">",))


def agent_permissions(namespace: str, agent: str) -> Permissions:
    """What the SDK (cadenza._agent and the modules it uses) does for one Agent, and no more.

    No stream or consumer create/delete on the task stream (the engine creates the Agent's
    consumer), no other Agent's consumer, no `cadenza.task.>` subscription, no
    `cadenza.control.>`, no run record, no other namespace's shared context. Listing a
    context scope creates an ephemeral consumer filtered on its own namespace's keys."""
    durable = consumer_name(namespace, agent)
    payloads = payloads_store(namespace)
    api = "$JS.API"
    publish = [
        # its own task consumer: pull, ack/nak/in-progress, and look it up
        f"{api}.CONSUMER.MSG.NEXT.{TASKS_STREAM}.{durable}",
        f"{api}.CONSUMER.INFO.{TASKS_STREAM}.{durable}",
        f"$JS.ACK.{TASKS_STREAM}.{durable}.>",
        # its attempt events (result, failed, heartbeat, started, usage, context writes)
        f"cadenza.event.{namespace}.*.agent.{agent}",
        # what its handlers log through task.log (cadenza._runlog), under its own name,
        # which a reader trusts as the agent that wrote the line
        f"cadenza.log.{namespace}.{agent}.>",
        # a task it cannot handle, copied to the dead letters (cadenza._deadletter)
        f"cadenza.dead.task.{namespace}.{agent}",
        # shared context, keyed <namespace>.<scope>.<key> (cadenza._context.KVContext): its
        # namespace's only. Read by direct get, written on the key's subject, listed by an
        # ephemeral consumer created on a subject that names its filter; no stream info
        # (its subjects_filter lists every key), no STREAM.MSG.GET or unnamed consumer
        # create (they take the subject in the body), no consumer delete.
        f"{api}.DIRECT.GET.KV_{CONTEXT_BUCKET}.$KV.{CONTEXT_BUCKET}.{namespace}.>",
        f"$KV.{CONTEXT_BUCKET}.{namespace}.>",
        f"{api}.CONSUMER.CREATE.KV_{CONTEXT_BUCKET}.*.$KV.{CONTEXT_BUCKET}.{namespace}.>",
        # The claims, run status and limits buckets are bound without their stream info
        # (cadenza._kvbind): asked with a subjects filter, it lists every namespace's keys.
        # claims: one per attempt, created before the handler starts, keyed
        # <namespace>.<agent>.<task id> (cadenza.wire.claim_key): its own Agent's only
        f"{api}.DIRECT.GET.KV_{CLAIMS_BUCKET}.$KV.{CLAIMS_BUCKET}.{namespace}.{agent}.>",
        f"$KV.{CLAIMS_BUCKET}.{namespace}.{agent}.>",
        # what an agent may know of a run (phase, budget), keyed <namespace>.<run>: its
        # namespace's only; the run records themselves (RUNS_BUCKET) stay the engine's
        f"{api}.DIRECT.GET.KV_{RUN_STATUS_BUCKET}.$KV.{RUN_STATUS_BUCKET}.{namespace}.>",
        # model rate windows, keyed <namespace>.<model>
        f"{api}.DIRECT.GET.KV_{LIMITS_BUCKET}.$KV.{LIMITS_BUCKET}.{namespace}.>",
        f"$KV.{LIMITS_BUCKET}.{namespace}.>",
        # large inputs and outputs by reference: read and write objects of its namespace's
        # object store (an object's subjects cannot be scoped by name; the bucket can)
        f"{api}.STREAM.INFO.OBJ_{payloads}",
        f"{api}.DIRECT.GET.OBJ_{payloads}.>",
        f"{api}.STREAM.MSG.GET.OBJ_{payloads}",
        f"{api}.CONSUMER.CREATE.OBJ_{payloads}",
        f"{api}.CONSUMER.CREATE.OBJ_{payloads}.>",
        f"{api}.CONSUMER.DELETE.OBJ_{payloads}.>",
        f"$O.{payloads}.>",
        # nats-py reads an object's chunks through a subscription that looks its stream up
        # by subject (ObjectStore.get names no stream): stream names, not their content
        f"{api}.STREAM.NAMES",
    ]
    subscribe = [
        "_INBOX.>",  # replies (pulled tasks, publish acks, KV reads): minted as its own inboxes only
        f"cadenza.cancel.{namespace}.*",
    ]
    return Permissions(publish=tuple(publish), subscribe=tuple(subscribe))


def client_permissions(namespace: str, user: str) -> Permissions:
    """The CLI or console of one namespace, as `user`: control requests on its own
    subject (the engine reads the user from it) and reads of run records, step outputs
    and definitions by key, and of its namespace's run logs; no task, event or stream
    operation, no other consumer."""
    api = "$JS.API"
    publish = [f"{CONTROL_PREFIX}.{namespace}.{user}"]
    for bucket in (RUNS_BUCKET, OUTPUTS_BUCKET, DEFINITIONS_BUCKET):
        publish += [f"{api}.STREAM.INFO.KV_{bucket}", f"{api}.DIRECT.GET.KV_{bucket}.$KV.{bucket}.>"]
    # `cadenza logs` (observe/runlogs.py): an ephemeral named consumer delivering to its own
    # inbox, created on a subject that names its filter, which the server holds the body's
    # filter to: its namespace's logs only. Never deleted (the server removes it once its
    # inbox is gone), so no delete, which could not be limited to its own consumers.
    publish.append(f"{api}.CONSUMER.CREATE.{LOGS_STREAM}.*.cadenza.log.{namespace}.>")
    return Permissions(publish=tuple(publish), subscribe=("_INBOX.>",))


def decode_jwt(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(header, claims) of a JWT, unverified; `verify_jwt` checks the signature."""
    header, claims, _ = token.split(".")
    return json.loads(_b64decode(header)), json.loads(_b64decode(claims))


def verify_jwt(token: str) -> dict[str, Any]:
    """The claims of a JWT whose signature verifies against its own `iss` public key."""
    header, claims, signature = token.split(".")
    payload = json.loads(_b64decode(claims))
    # nkeys' KeyPair verifies only with a seed: check with the raw ed25519 key (pynacl,
    # which nkeys depends on). A public nkey is base32(prefix byte, 32-byte key, crc16).
    from nacl.exceptions import BadSignatureError
    from nacl.signing import VerifyKey

    issuer = payload["iss"]
    raw = base64.b32decode(issuer + "=" * (-len(issuer) % 8))
    try:
        VerifyKey(raw[1:-2]).verify(f"{header}.{claims}".encode(), _b64decode(signature))
    except BadSignatureError as exc:
        raise nkeys.ErrInvalidSignature() from exc
    return dict(payload)


def creds_jwt(creds: str) -> str:
    """The JWT of a .creds file."""
    lines = creds.splitlines()
    return lines[lines.index("-----BEGIN NATS USER JWT-----") + 1].strip()


def _account_claims(*, jetstream: bool) -> dict[str, Any]:
    storage = _UNLIMITED if jetstream else 0
    return {
        "limits": {
            "subs": _UNLIMITED,
            "data": _UNLIMITED,
            "payload": _UNLIMITED,
            "imports": _UNLIMITED,
            "exports": _UNLIMITED,
            "wildcards": True,
            "conn": _UNLIMITED,
            "leaf": _UNLIMITED,
            "mem_storage": storage,
            "disk_storage": storage,
            "streams": _UNLIMITED if jetstream else 0,
            "consumer": _UNLIMITED if jetstream else 0,
            "max_ack_pending": _UNLIMITED if jetstream else 0,
        },
        "default_permissions": {"pub": {}, "sub": {}},
        "type": "account",
        "version": 2,
    }


def _sign(issuer_seed: str, subject: str, name: str, nats: dict[str, Any], iat: int) -> str:
    issuer = nkeys.from_seed(issuer_seed.encode())
    claims: dict[str, Any] = {
        "iat": iat,
        "iss": issuer.public_key.decode(),
        "name": name,
        "sub": subject,
        "nats": nats,
    }
    # jti: a hash of the claims, as nats-io/jwt makes it; the server only logs it
    claims["jti"] = (
        base64.b32encode(hashlib.sha256(json.dumps(claims, sort_keys=True).encode()).digest())
        .decode()
        .rstrip("=")
    )
    header = _b64encode(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}, separators=(",", ":")).encode())
    body = _b64encode(json.dumps(claims, separators=(",", ":")).encode())
    signature = _b64encode(issuer.sign(f"{header}.{body}".encode()))
    return f"{header}.{body}.{signature}"


def _new_seed(prefix: int) -> str:
    return str(nkeys.encode_seed(os.urandom(32), prefix).decode())


def _public(seed: str) -> str:
    return str(nkeys.from_seed(seed.encode()).public_key.decode())


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
