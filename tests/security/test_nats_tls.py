"""NATS over TLS (the chart's `nats.tls`): the real nats-server with a `tls {}` block and a
certificate for 127.0.0.1 signed by a CA made here. The engine and an agent given only
CADENZA_NATS_CA (a tls:// URL) connect and run a step; a client that does not speak TLS,
or does not trust the CA, is refused."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import pytest
from cadenza import Agent, AgentSettings
from cadenza_operator.engine.definition import compile_workflow
from cadenza_operator.engine.host import EngineHost
from cadenza_operator.engine.infra import ensure_agent_consumer, nats_options
from cadenza_operator.engine.settings import EngineSettings, SettingsError
from cadenza_operator.local.nats_server import NatsServer
from cadenza_operator.models import WorkflowSpec
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ..integration.harness import poll, unique_namespace


@dataclass
class Certs:
    ca: Path
    cert: Path
    key: Path


def _certificate(
    subject: str, key: Any, issuer: x509.Name | None, issuer_key: Any, *, ca: bool
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        usage = x509.KeyUsage(False, False, False, False, False, True, True, False, False)
        builder = builder.add_extension(usage, critical=True)
    else:
        san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
        builder = builder.add_extension(san, critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def make_certs(directory: Path) -> Certs:
    """A CA and a server certificate for 127.0.0.1 it signed (what cert-manager puts in a
    kubernetes.io/tls Secret: ca.crt, tls.crt, tls.key)."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _certificate("cadenza-test-ca", ca_key, None, ca_key, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = _certificate("nats", server_key, ca_cert.subject, ca_key, ca=False)
    certs = Certs(directory / "ca.crt", directory / "tls.crt", directory / "tls.key")
    certs.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    certs.cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    certs.key.write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return certs


def tls_block(certs: Certs) -> str:
    """As the chart's nats configmap renders it (with the Secret mounted at a path)."""
    return f'tls {{\n  cert_file: "{certs.cert}"\n  key_file: "{certs.key}"\n  ca_file: "{certs.ca}"\n}}\n'


@pytest.fixture(scope="module")
def tls_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NatsServer, Certs]]:
    certs = make_certs(tmp_path_factory.mktemp("certs"))
    with NatsServer(config=tls_block(certs)) as server:
        yield server, certs


def tls_url(server: NatsServer) -> str:
    return f"tls://127.0.0.1:{server.port}"


async def test_the_engine_and_an_agent_connect_with_the_ca_and_run_a_step(
    tls_nats: tuple[NatsServer, Certs],
) -> None:
    server, certs = tls_nats
    namespace = unique_namespace()
    env = {
        "CADENZA_NATS_URL": tls_url(server),
        "CADENZA_NATS_CA": str(certs.ca),
        "CADENZA_NAMESPACE": namespace,
    }
    agent_settings = AgentSettings.from_env(env)
    assert agent_settings.nats_ca == str(certs.ca)

    host = EngineHost(EngineSettings(name="tls", nats_url=tls_url(server), nats_ca=str(certs.ca)))
    assert await host.start()
    try:
        assert host.nc.connected_url.scheme == "tls"
        await ensure_agent_consumer(host.js, namespace, "echo")
        agent = Agent("echo")

        @agent.handler
        async def handle(task: Any) -> dict[str, Any]:
            return {"over": "tls"}

        stop = asyncio.Event()
        serving = asyncio.create_task(agent.serve(agent_settings, stop=stop))
        try:
            spec = WorkflowSpec.model_validate({"steps": [{"name": "say", "agent": "echo"}]})
            await host.client.start(compile_workflow("tls", spec, namespace), {}, run_id="tls-1")

            async def finished() -> Any:
                state = await host.client.get("tls-1")
                return state if state is not None and state.phase in ("Succeeded", "Failed") else None

            state = await poll(finished, timeout=30)
            assert state.phase == "Succeeded"
            assert state.steps["say"].output == {"over": "tls"}
        finally:
            stop.set()
            await asyncio.wait_for(serving, 30)
    finally:
        await host.stop()


async def test_the_clis_connection_takes_the_ca_from_the_environment(
    tls_nats: tuple[NatsServer, Certs], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, certs = tls_nats
    monkeypatch.setenv("CADENZA_NATS_CA", str(certs.ca))
    nc = await nats.connect(tls_url(server), allow_reconnect=False, **nats_options())
    try:
        assert nc.is_connected
    finally:
        await nc.close()


def test_a_plaintext_client_is_refused(tls_nats: tuple[NatsServer, Certs]) -> None:
    server, _ = tls_nats
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        reader = sock.makefile("rb")
        info = reader.readline()
        assert info.startswith(b"INFO ")
        assert json.loads(info[5:])["tls_required"] is True
        sock.sendall(b'CONNECT {"verbose":false}\r\nPING\r\n')
        # the server expected a TLS handshake: it closes the connection, never a PONG
        try:
            rest = reader.read()
        except ConnectionResetError:
            rest = b""
        assert b"PONG" not in rest


async def test_a_client_that_does_not_trust_the_ca_is_refused(tls_nats: tuple[NatsServer, Certs]) -> None:
    server, _ = tls_nats
    with pytest.raises(Exception, match=r"(?i)certificate verify failed"):
        await nats.connect(
            tls_url(server), allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=5
        )


def test_an_unreadable_ca_is_a_settings_error_naming_it(tmp_path: Path) -> None:
    bad = tmp_path / "ca.crt"
    bad.write_text("not a certificate")
    for path in (bad, tmp_path / "missing.crt"):
        with pytest.raises(SettingsError, match=re.escape(f"CADENZA_NATS_CA={path}")):
            EngineSettings(nats_ca=str(path)).connect_options()


def test_the_cli_with_an_unreadable_ca_exits_2_naming_it(tmp_path: Path) -> None:
    bad = tmp_path / "ca.crt"
    bad.write_text("not a certificate")
    env = {**os.environ, "CADENZA_NATS_CA": str(bad)}
    done = subprocess.run(
        [sys.executable, "-m", "cadenza_operator.cli", "audit", ">", "--nats", "tls://127.0.0.1:1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 2, done.stderr
    assert f"CADENZA_NATS_CA={bad}" in done.stderr
    assert "Traceback" not in done.stderr
