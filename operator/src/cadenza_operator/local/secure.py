"""`cadenza run --secure` / `cadenza dev --secure`: the embedded nats-server in operator
mode (security/nats_auth.py), as the chart runs it, with one credential per identity.

Keys and .creds files are written owner-only into the stack's work folder and removed
with it: nothing is left on disk once the command stops, and a new stack never trusts
the credentials of an old one.
"""

from __future__ import annotations

import getpass
import re
from pathlib import Path

from ..security.nats_auth import (
    AuthKeys,
    Permissions,
    agent_permissions,
    client_permissions,
    engine_permissions,
    mint_user,
    server_config,
    write_creds,
)


class LocalCredentials:
    """The keys of one local stack and the credentials minted from them."""

    def __init__(self, folder: Path, namespace: str) -> None:
        self.folder = folder
        self.namespace = namespace
        self.keys = AuthKeys.load_or_generate(folder / "nats-keys.json")

    def server_config(self) -> str:
        return server_config(self.keys)

    def engine(self) -> str:
        return self._mint("engine.creds", "cadenza-engine", engine_permissions())

    def agent(self, name: str) -> str:
        """Agent `name`'s own credential: its queue, its event subject, nothing of others."""
        return self._mint(
            f"agent-{name}.creds", f"agent-{self.namespace}-{name}", agent_permissions(self.namespace, name)
        )

    def client(self, user: str | None = None) -> str:
        """The CLI user's credential: control requests in this namespace as `user`."""
        # one subject token: the engine reads the user from cadenza.control.<ns>.<user>
        user = re.sub(r"[^A-Za-z0-9_-]", "-", user or _login())
        return self._mint(f"client-{user}.creds", user, client_permissions(self.namespace, user))

    def _mint(self, file: str, name: str, permissions: Permissions) -> str:
        return str(write_creds(self.folder / file, mint_user(self.keys, name, permissions)))


def _login() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no user name in this environment (a container without one)
        return "cli"
