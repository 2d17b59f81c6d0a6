"""The Kubernetes API emulator fixtures for the operator tests (nats_server and
fresh_nats come from tests/conftest.py)."""

from ..kube.fixtures import cadenza_crds, kube_emulator, kubeconfig

__all__ = ["cadenza_crds", "kube_emulator", "kubeconfig"]
