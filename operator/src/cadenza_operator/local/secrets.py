"""Secret and ConfigMap references resolved for local agent processes.

In a cluster an Agent's `secretKeyRef`, `configMapKeyRef` and `envFrom` stay references in
its Deployment. `cadenza run`/`dev` have no cluster to ask: a reference is read from a
variable of the CLI's own environment (or of `--env-file`), named after the reference:
`CADENZA_SECRET_<NAME>_<KEY>` and `CADENZA_CONFIGMAP_<NAME>_<KEY>`. Those variables are
not passed on wholesale: an agent sees only the values its manifest references.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

from dotenv import dotenv_values

from ..models import Agent

SECRET_PREFIX = "CADENZA_SECRET_"
CONFIGMAP_PREFIX = "CADENZA_CONFIGMAP_"
_NOT_A_NAME = re.compile(r"[-.]")


class MissingReference(ValueError):
    """A reference with no variable to resolve it; the message names the Agent and the variable."""


def _token(text: str) -> str:
    return _NOT_A_NAME.sub("_", text).upper()


def secret_variable(name: str, key: str) -> str:
    """The variable holding key `key` of Secret `name` ('llm-keys', 'openai' ->
    CADENZA_SECRET_LLM_KEYS_OPENAI)."""
    return f"{SECRET_PREFIX}{_token(name)}_{_token(key)}"


def configmap_variable(name: str, key: str) -> str:
    return f"{CONFIGMAP_PREFIX}{_token(name)}_{_token(key)}"


def referenced_environment(agent: Agent, environ: Mapping[str, str]) -> dict[str, str]:
    """The agent's `envFrom` then `env`, references resolved from `environ` (the order a
    kubelet applies them: `env` wins). Raises MissingReference for an unresolved one."""
    where = f"Agent/{agent.metadata.name}"
    resolved: dict[str, str] = {}
    for i, source in enumerate(agent.spec.envFrom):
        if source.secretRef is not None:
            prefix, what = f"{SECRET_PREFIX}{_token(source.secretRef.name)}_", "secretRef"
        elif source.configMapRef is not None:
            prefix, what = f"{CONFIGMAP_PREFIX}{_token(source.configMapRef.name)}_", "configMapRef"
        else:  # the model holds exactly one
            continue
        found = {k.removeprefix(prefix): v for k, v in environ.items() if k.startswith(prefix)}
        found.pop("", None)  # the bare prefix names no key
        if not found:
            raise MissingReference(
                f"{where}: spec.envFrom[{i}].{what}: no variable {prefix}<KEY> is set "
                "(in the environment or --env-file)"
            )
        resolved.update({f"{source.prefix}{k}": v for k, v in found.items()})
    for i, var in enumerate(agent.spec.env):
        if var.valueFrom is None:
            resolved[var.name] = var.value
            continue
        secret, configmap = var.valueFrom.secretKeyRef, var.valueFrom.configMapKeyRef
        if secret is not None:
            name, key, what = secret.name, secret.key, "secretKeyRef"
            variable = secret_variable(name, key)
        elif configmap is not None:
            name, key, what = configmap.name, configmap.key, "configMapKeyRef"
            variable = configmap_variable(name, key)
        else:  # the model holds exactly one
            continue
        if variable not in environ:
            raise MissingReference(
                f"{where}: spec.env[{i}] ({var.name}) valueFrom.{what} {{name: {name}, key: {key}}}: "
                f"set {variable} (in the environment or --env-file)"
            )
        resolved[var.name] = environ[variable]
    return resolved


def unreferenced(environ: Mapping[str, str]) -> dict[str, str]:
    """`environ` without the reference variables: an agent gets only what it references."""
    return {k: v for k, v in environ.items() if not k.startswith((SECRET_PREFIX, CONFIGMAP_PREFIX))}


def load_env_file(path: str) -> dict[str, str]:
    """Variables of a dotenv file. Raises ValueError naming the file when it cannot be read."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"--env-file {path}: no such file")
    try:
        values = dotenv_values(file)
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"--env-file {path}: cannot be read ({exc})") from None
    return {k: v for k, v in values.items() if v is not None}


def add_env_file(path: str | None) -> None:
    """Make the variables of `--env-file` visible to the CLI's reference lookups; a variable
    already set in the environment wins over the file, as with docker compose."""
    if path is None:
        return
    for key, value in load_env_file(path).items():
        os.environ.setdefault(key, value)
