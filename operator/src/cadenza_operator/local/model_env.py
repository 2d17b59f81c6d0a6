"""What an agent process learns of its Models (`spec.models`): CADENZA_MODELS, their specs
as JSON without secret values, and each Model's API key in the variable the SDK reads it
from, CADENZA_SECRET_<NAME>_<KEY> (resolved like an Agent's own secretKeyRef: from the
CLI's environment or --env-file). The operator renders the same variables into the
Deployment, the key as a Secret reference (kube/builders.py)."""

from __future__ import annotations

import json
from collections.abc import Mapping

from ..models import Agent, Model
from .secrets import MissingReference, secret_variable

MODELS_VARIABLE = "CADENZA_MODELS"


def models_json(agent: Agent, models: Mapping[str, Model]) -> str:
    """CADENZA_MODELS for `agent`: {name: spec} of the Models it names (no secret values)."""
    specs = {
        name: models[name].spec.model_dump(mode="json", exclude_none=True)
        for name in agent.spec.models
        if name in models
    }
    return json.dumps(specs, separators=(",", ":"), sort_keys=True)


def model_environment(
    agent: Agent, models: Mapping[str, Model], environ: Mapping[str, str]
) -> dict[str, str]:
    """CADENZA_MODELS and the Models' API keys for a local agent process. Raises
    MissingReference naming the Model, the Agent and the variable when a key is not set."""
    if not agent.spec.models:
        return {}
    env = {MODELS_VARIABLE: models_json(agent, models)}
    for name in agent.spec.models:
        model = models.get(name)
        if model is None or model.spec.apiKey is None:
            continue
        ref = model.spec.apiKey.secretKeyRef
        variable = secret_variable(ref.name, ref.key)
        if variable not in environ:
            raise MissingReference(
                f"Model/{name} (of Agent/{agent.metadata.name}): spec.apiKey.secretKeyRef "
                f"{{name: {ref.name}, key: {ref.key}}}: set {variable} (in the environment or --env-file)"
            )
        env[variable] = environ[variable]
    return env
