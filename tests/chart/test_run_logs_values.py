"""The chart's `operator.runLogs` values reach the engine's settings for the run-log stream
(CADENZA_LOGS_MAX_AGE, CADENZA_LOGS_MAX_BYTES), and the schema refuses limits below 1."""

from __future__ import annotations

from typing import Any

import helm_python as helm
import pytest
from cadenza_operator.engine.infra import LOGS_MAX_AGE, LOGS_MAX_BYTES
from cadenza_operator.engine.settings import EngineSettings

from .render import CHART, render
from .test_chart import env_of, operator_container


def settings_from(values: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> EngineSettings:
    env = env_of(operator_container(render(values)))
    for name in ("CADENZA_LOGS_MAX_AGE", "CADENZA_LOGS_MAX_BYTES"):
        monkeypatch.setenv(name, env[name])
    return EngineSettings()


def test_the_defaults_are_the_engines(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_from({}, monkeypatch)
    assert (settings.logs_max_age, settings.logs_max_bytes) == (LOGS_MAX_AGE, LOGS_MAX_BYTES)


def test_set_limits_reach_the_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    values = {"operator": {"runLogs": {"maxAgeSeconds": 3600, "maxBytes": 1_073_741_824}}}
    settings = settings_from(values, monkeypatch)
    assert (settings.logs_max_age, settings.logs_max_bytes) == (3600.0, 1_073_741_824)


@pytest.mark.parametrize("bad", [{"maxAgeSeconds": 0}, {"maxBytes": "lots"}, {"maxLines": 5}])
def test_the_schema_refuses_bad_limits(bad: dict[str, Any]) -> None:
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmValuesError):
        chart.validate_schema({"operator": {"runLogs": bad}})
