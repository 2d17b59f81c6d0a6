"""Makes the Kubernetes emulator fixtures available to the tests in this folder.

Self-sufficient on purpose: it relies on no top-level ``tests/conftest.py``. pytest finds
fixtures by name in a conftest's namespace, so importing them is enough.
"""

from .fixtures import cadenza_crds, kube_api_client, kube_emulator, kubeconfig

__all__ = ["cadenza_crds", "kube_api_client", "kube_emulator", "kubeconfig"]
