"""The Kubernetes API emulator fixtures for the operator tests (nats_server and
fresh_nats come from tests/conftest.py), and a running operator."""

from collections.abc import AsyncIterator
from typing import Any

import pytest
from cadenza_operator.local.nats_server import NatsServer

from ..kube.emulator import KubeEmulator
from ..kube.fixtures import cadenza_crds, kube_emulator, kubeconfig
from .harness import RunningOperator, running_operator

__all__ = ["cadenza_crds", "kube_emulator", "kubeconfig", "operator"]


@pytest.fixture
async def operator(
    kube_emulator: KubeEmulator, cadenza_crds: Any, fresh_nats: NatsServer
) -> AsyncIterator[RunningOperator]:
    """The real operator (kopf and an engine) against the emulator. A nats-server per test:
    agent processes stopped at the end of one test may leave pull requests behind that
    would swallow the next test's tasks for an ack wait."""
    async with running_operator(kube_emulator, fresh_nats.url) as op:
        yield op
