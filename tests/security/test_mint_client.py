"""`cadenza nats-auth mint-client`: a platform admin mints a user's CLI credential for one
namespace from the chart's keys.json. The credential connects to the real operator-mode
server and may send control requests only as its own user, in its own namespace."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cadenza_operator.security.nats_auth import creds_jwt, engine_permissions, verify_jwt

from ..conftest import cadenza
from .conftest import SecureBus

Connect = Callable[[str | None], Any]


def _keys_file(secure_bus: SecureBus, tmp_path: Path) -> Path:
    path = tmp_path / "keys.json"
    secure_bus.keys.store(path)  # the format `cadenza nats-auth init` puts in the Secret
    return path


async def test_the_minted_credential_requests_control_only_as_its_user(
    secure_bus: SecureBus, connect: Connect, tmp_path: Path
) -> None:
    out = tmp_path / "alice.creds"
    keys = _keys_file(secure_bus, tmp_path)
    done = cadenza(
        "nats-auth",
        "mint-client",
        "--keys",
        str(keys),
        "--namespace",
        "team-a",
        "--user",
        "alice",
        "-o",
        str(out),
    )
    assert done.returncode == 0, done.stderr
    assert out.stat().st_mode & 0o777 == 0o600
    claims = verify_jwt(creds_jwt(out.read_text()))
    assert claims["name"] == "alice"
    assert claims["iss"] == secure_bus.keys.account_public_key

    engine = await connect(secure_bus.creds("engine", engine_permissions()))
    heard: list[str] = []

    async def on_request(msg: Any) -> None:
        heard.append(msg.subject)
        await msg.respond(b'{"ok": true}')

    await engine.nc.subscribe("cadenza.control.>", cb=on_request)
    await engine.nc.flush()

    alice = await connect(str(out))
    reply = await alice.nc.request("cadenza.control.team-a.alice", b'{"op": "approve"}', timeout=10)
    assert json.loads(reply.data) == {"ok": True}
    assert heard == ["cadenza.control.team-a.alice"]

    # as another user, in another namespace: the server refuses both
    for subject in ("cadenza.control.team-a.bob", "cadenza.control.team-b.alice"):
        await alice.nc.publish(subject, b'{"op": "approve"}')
        assert "permissions violation" in (await alice.refused(subject)).lower()
    await engine.nc.flush()
    assert heard == ["cadenza.control.team-a.alice"]


def test_the_credential_goes_to_stdout_without_o(secure_bus: SecureBus, tmp_path: Path) -> None:
    keys = _keys_file(secure_bus, tmp_path)
    done = cadenza("nats-auth", "mint-client", "--keys", str(keys), "--namespace", "team-a", "--user", "bob")
    assert done.returncode == 0, done.stderr
    assert verify_jwt(creds_jwt(done.stdout))["name"] == "bob"


def test_bad_input_exits_2_naming_the_file_or_option(secure_bus: SecureBus, tmp_path: Path) -> None:
    keys = _keys_file(secure_bus, tmp_path)
    not_json = tmp_path / "auth.conf"
    not_json.write_text("operator: eyJ...\n")
    wrong_seed = tmp_path / "wrong.json"
    wrong_seed.write_text(json.dumps({"operator": "x", "account": "SUNOTANACCOUNT", "systemAccount": "y"}))
    cases = [
        (["--keys", str(tmp_path / "missing.json")], f"--keys {tmp_path / 'missing.json'}"),
        (["--keys", str(not_json)], f"--keys {not_json}"),
        (["--keys", str(wrong_seed)], f"--keys {wrong_seed}"),
        (["--keys", str(keys), "--namespace", "Team_A"], "--namespace 'Team_A'"),
        (["--keys", str(keys), "--user", "alice.smith"], "--user 'alice.smith'"),
        (["--keys", str(keys), "-o", str(keys / "alice.creds")], f"-o {keys / 'alice.creds'}"),
    ]
    for extra, named in cases:
        args = {"--namespace": "team-a", "--user": "alice"}
        for flag, value in zip(extra[::2], extra[1::2], strict=True):
            args[flag] = value
        argv = [a for pair in args.items() for a in pair]
        if "--keys" not in args:
            argv += ["--keys", str(keys)]
        done = cadenza("nats-auth", "mint-client", *argv)
        assert done.returncode == 2, (extra, done.stdout, done.stderr)
        assert named in done.stderr, (named, done.stderr)
        assert "Traceback" not in done.stderr
        assert secure_bus.keys.account_seed not in done.stderr + done.stdout
