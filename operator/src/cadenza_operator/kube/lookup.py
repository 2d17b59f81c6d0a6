"""A WorkflowRun's engine run id, for the CLI: `cadenza get my-run` where `my-run` is the
name of a WorkflowRun rather than a run id.

The operator writes the id into the WorkflowRun's status (`status.runId`) and its
`cadenza.dev/run-id` annotation when it starts the run (kube/runs.py); this reads them
back with the user's kubeconfig, the one kubectl uses.
"""

from __future__ import annotations

import os
from pathlib import Path

from .api import KubeApi, workflowrun_path
from .runs import RUN_ID_ANNOTATION


class LookupFailed(Exception):
    """The Kubernetes API could not be asked (no such kubeconfig, the server unreachable)."""


def configured_kubeconfig(option: str | None = None) -> str | None:
    """The kubeconfig the CLI should use, if one is configured: --kubeconfig, else
    $KUBECONFIG (its first file), else ~/.kube/config when it exists."""
    if option:
        return option
    env = os.environ.get("KUBECONFIG")
    if env:
        return env.split(os.pathsep)[0] or None
    default = Path.home() / ".kube" / "config"
    return str(default) if default.is_file() else None


async def workflowrun_run_id(kubeconfig: str, namespace: str, name: str) -> str | None:
    """The run id of WorkflowRun `name` in `namespace`, or None when there is no such
    WorkflowRun or it has not been started yet. LookupFailed when the API cannot be asked."""
    from kubernetes import client, config

    configuration = client.Configuration()
    try:
        config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    except (OSError, config.ConfigException, ValueError) as exc:
        raise LookupFailed(f"kubeconfig {kubeconfig}: {exc}") from None
    api = KubeApi(configuration)
    try:
        body = await api.get(workflowrun_path(namespace, name))
    except Exception as exc:  # aiohttp's and the API's errors alike: say what failed
        raise LookupFailed(f"WorkflowRun {namespace}/{name}: {exc}") from None
    finally:
        await api.close()
    if body is None:
        return None
    run_id = (body.get("status") or {}).get("runId") or (
        body.get("metadata", {}).get("annotations") or {}
    ).get(RUN_ID_ANNOTATION)
    return str(run_id) if run_id else None
