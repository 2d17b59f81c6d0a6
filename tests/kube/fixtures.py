"""pytest fixtures and helpers for tests that run against the Kubernetes API emulator.

Import the fixtures into a ``conftest.py`` (``tests/kube/conftest.py`` does) and use:

* ``kube_emulator`` -- a :class:`~.emulator.KubeEmulator` serving on 127.0.0.1 with the
  built-in resources of a recent Kubernetes (ConfigMaps, Events, Deployments, CRDs, ...);
  the test fails at teardown if the emulator itself crashed on a request (a 500 that an
  operator's retries could otherwise hide).
* ``kubeconfig`` -- a kubeconfig file for it, also made the default for the process
  (``$KUBECONFIG`` and the ``kubernetes`` package's cached default location), so that
  kopf's and the client's own kubeconfig loading find the emulator.
* ``kube_api_client`` -- a ``kubernetes.client.ApiClient`` for it, loaded through that
  default location (not the client's process-wide default configuration, which would leak
  the emulator's port into later tests).
* ``cadenza_crds`` -- the project's CRDs from ``crds/*.yaml``, registered.

and the helpers :func:`wait_for` and :func:`obj`.
"""

from __future__ import annotations

import asyncio
import pathlib
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, TypeVar

import kmock
import kubernetes.client
import kubernetes.config
import kubernetes.config.kube_config
import pytest
import pytest_asyncio
import yaml

from .emulator import KubeEmulator, ResourceRef

__all__ = [
    "CRDS_DIR",
    "cadenza_crds",
    "kube_api_client",
    "kube_emulator",
    "kubeconfig",
    "obj",
    "wait_for",
]

CRDS_DIR = pathlib.Path(__file__).resolve().parents[2] / "crds"
"""The project's generated CustomResourceDefinitions (``cadenza crds`` writes them)."""

T = TypeVar("T")


@pytest_asyncio.fixture
async def kube_emulator() -> AsyncIterator[KubeEmulator]:
    """A fresh emulator per test: no state, events or request log leak between tests."""
    emulator = KubeEmulator()
    # kopf waits until v1/namespaces and the CRD resource are discoverable, and posts
    # v1/events: the bundled list (a recent K3s's built-in resources) has them all.
    emulator.resources.load_bundled()
    for namespace in ("default", "kube-system", "kube-public"):  # as in every new cluster
        emulator.create_object("v1/namespaces", {"metadata": {"name": namespace}})
    async with emulator.serving():
        yield emulator
        crashes = list(emulator.errors)
    if crashes:
        details = "\n".join(f"  {type(exc).__name__}: {exc}" for exc in crashes)
        pytest.fail(f"the Kubernetes API emulator failed on {len(crashes)} request(s):\n{details}")


@pytest.fixture
def kubeconfig(
    kube_emulator: KubeEmulator, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> pathlib.Path:
    """A kubeconfig for the emulator, made the process's default for this test."""
    server = str(kube_emulator.url).rstrip("/")
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "emulator", "cluster": {"server": server}}],
        # Any token: the emulator authenticates nobody, but clients want some credentials.
        "users": [{"name": "emulator", "user": {"token": "emulator-token"}}],
        "contexts": [
            {
                "name": "emulator",
                "context": {"cluster": "emulator", "user": "emulator", "namespace": "default"},
            }
        ],
        "current-context": "emulator",
    }
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    monkeypatch.setenv("KUBECONFIG", str(path))
    # The client reads $KUBECONFIG once, at import, into this module global.
    monkeypatch.setattr(kubernetes.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(path))
    return path


@pytest.fixture
def kube_api_client(kubeconfig: pathlib.Path) -> Iterator[kubernetes.client.ApiClient]:
    """The official (blocking) client for the emulator: call it via ``asyncio.to_thread``."""
    client = kubernetes.config.new_client_from_config()  # type: ignore[no-untyped-call]  # default location
    with client:
        yield client


@pytest.fixture
def cadenza_crds(kube_emulator: KubeEmulator) -> list[kmock.resource]:
    """Register the project's CRDs; fail (not skip) if there are none to register."""
    resources = kube_emulator.load_crds(CRDS_DIR) if CRDS_DIR.is_dir() else []
    if not resources:
        pytest.fail(f"no CustomResourceDefinitions in {CRDS_DIR}: run `cadenza crds` to generate them")
    return resources


async def wait_for(
    predicate: Callable[[], T | None],
    timeout: float = 30.0,
    *,
    interval: float = 0.02,
) -> T:
    """Poll ``predicate`` until it returns something truthy, and return that.

    Raises AssertionError after ``timeout`` seconds. The timeout bounds a wait for
    something that must happen; it is not a performance assertion.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if loop.time() >= deadline:
            raise AssertionError(f"not true within {timeout} s: {getattr(predicate, '__name__', predicate)}")
        await asyncio.sleep(interval)


def obj(
    emulator: KubeEmulator, resource: ResourceRef, namespace: str | None, name: str
) -> dict[str, Any] | None:
    """The stored object (a copy), or None: ``obj(kube_emulator, 'apps/v1/deployments', ns, name)``."""
    return emulator.get_object(resource, namespace, name)
