"""The chart's NATS over TLS (`nats.tls`): the server's tls block and its Secret, tls://
URLs, and ca.crt (alone) mounted wherever a client connects; the real nats-server started
with the config the chart renders serves TLS only."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import nats
import pytest
from cadenza_operator.engine.settings import EngineSettings
from cadenza_operator.local.nats_server import NatsServer

from ..security.test_nats_tls import make_certs
from .render import NAMESPACE, one, render

TLS = {"nats": {"tls": {"enabled": True, "secretName": "nats-tls"}}}
URL = f"tls://cadenza-nats.{NAMESPACE}.svc.cluster.local:4222"


def _pod(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    return dict(one(objects, kind)["spec"]["template"]["spec"])


def _secret_volume(pod: dict[str, Any], name: str) -> dict[str, Any]:
    return next(v["secret"] for v in pod["volumes"] if v["name"] == name)


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value") for e in container["env"]}


def _mounts(container: dict[str, Any]) -> dict[str, str]:
    return {m["name"]: m["mountPath"] for m in container["volumeMounts"]}


def test_nats_serves_tls_from_the_secret() -> None:
    objects = render(TLS)
    config = one(objects, "ConfigMap", "cadenza-nats-config")["data"]["nats.conf"]
    assert "tls {" in config
    for line in (
        "cert_file: /etc/nats-tls/tls.crt",
        "key_file: /etc/nats-tls/tls.key",
        "ca_file: /etc/nats-tls/ca.crt",
    ):
        assert line in config
    pod = _pod(objects, "StatefulSet")
    secret = _secret_volume(pod, "tls")
    assert secret["secretName"] == "nats-tls"
    assert sorted(i["key"] for i in secret["items"]) == ["ca.crt", "tls.crt", "tls.key"]
    assert _mounts(pod["containers"][0])["tls"] == "/etc/nats-tls"


def test_clients_get_tls_urls_and_the_ca_alone() -> None:
    objects = render(TLS)
    operator = _pod(objects, "Deployment")
    test_pod = one(objects, "Pod")["spec"]
    for pod in (operator, test_pod):
        container = pod["containers"][0]
        env = _env(container)
        assert env["CADENZA_NATS_URL"] == URL
        assert env["CADENZA_NATS_CA"] == "/etc/cadenza/nats-ca/ca.crt"
        assert _mounts(container)["nats-ca"] == "/etc/cadenza/nats-ca"
        ca = _secret_volume(pod, "nats-ca")
        # the server's key never leaves the NATS pods
        assert ca["secretName"] == "nats-tls" and [i["key"] for i in ca["items"]] == ["ca.crt"]
    assert _env(operator["containers"][0])["CADENZA_AGENT_NATS_URL"] == URL


@pytest.mark.parametrize("values", [{}, {"nats": {"tls": {"enabled": False, "secretName": "nats-tls"}}}])
def test_without_tls_nothing_changes(values: dict[str, Any]) -> None:
    objects = render(values)
    assert "tls {" not in one(objects, "ConfigMap", "cadenza-nats-config")["data"]["nats.conf"]
    operator = _pod(objects, "Deployment")
    env = _env(operator["containers"][0])
    assert env["CADENZA_NATS_URL"].startswith("nats://") and "CADENZA_NATS_CA" not in env
    assert "nats-ca" not in {v["name"] for v in operator["volumes"]}


def test_tls_without_a_secret_or_without_auth_is_refused_naming_the_value() -> None:
    with pytest.raises(Exception, match=r"nats\.tls\.secretName is required"):
        render({"nats": {"tls": {"enabled": True}}})
    with pytest.raises(Exception, match=r"nats\.tls\.enabled needs nats\.auth\.enabled"):
        render({"nats": {"auth": {"enabled": False}, "tls": {"enabled": True, "secretName": "nats-tls"}}})


async def test_the_rendered_tls_config_serves_tls_only(tmp_path: Path) -> None:
    """The bundled config's tls block (alone, so that TLS is what is shown) with the
    Secret's files where the StatefulSet mounts them, rewritten to a temporary folder."""
    objects = render(TLS)
    config = one(objects, "ConfigMap", "cadenza-nats-config")["data"]["nats.conf"]
    certs = make_certs(tmp_path)
    start = config.index("tls {")
    block = config[start : config.index("}", start) + 1]
    for name in ("tls.crt", "tls.key", "ca.crt"):
        assert f"/etc/nats-tls/{name}" in block
        block = block.replace(f"/etc/nats-tls/{name}", f'"{tmp_path / name}"')
    with NatsServer(config=block) as server:
        url = f"tls://127.0.0.1:{server.port}"
        options = EngineSettings(nats_ca=str(certs.ca)).connect_options()
        nc = await nats.connect(url, allow_reconnect=False, **options)
        try:
            assert nc.is_connected
        finally:
            await nc.close()

        def plaintext_pong() -> bool:
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
                reader = sock.makefile("rb")
                reader.readline()  # INFO
                sock.sendall(b"CONNECT {}\r\nPING\r\n")
                try:
                    return b"PONG" in reader.read()
                except ConnectionResetError:
                    return False

        assert not await asyncio.to_thread(plaintext_pong)
