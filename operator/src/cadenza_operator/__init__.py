"""Cadenza's control layer, local runner and Kubernetes operator.

Entry points: the `cadenza` command (`cadenza_operator.cli`), the engine
(`cadenza_operator.engine`), the kopf operator (`cadenza_operator.kube`). Agents are
written with the separate `cadenza` SDK, which never imports this package.
"""

__version__ = "0.1.0"
