"""The Kubernetes operator: kopf handlers for Agent, Workflow and WorkflowRun, one module
per kind (`agents`, `workflows`, `runs`), pure builders (`builders`, `status`,
`autoscaling`), and `main.serve`, which runs kopf and the engine in one process."""

from .main import build_registry, run_operator, serve
from .settings import OperatorSettings

__all__ = ["OperatorSettings", "build_registry", "run_operator", "serve"]
