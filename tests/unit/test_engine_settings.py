"""EngineSettings: one object from the environment; a bad variable is named, `cadenza engine` exits 2."""

from __future__ import annotations

import pytest
from cadenza._protocol import MAX_VALUE_BYTES
from cadenza_operator.cli import main
from cadenza_operator.engine.infra import ENGINE_MAX_DELIVERIES
from cadenza_operator.engine.settings import EngineSettings, SettingsError

VARS = (
    "CADENZA_NATS_URL",
    "CADENZA_NATS_CREDS",
    "CADENZA_ENGINE_NAME",
    "CADENZA_ENGINE_CONCURRENCY",
    "CADENZA_ENGINE_CACHE_SIZE",
    "CADENZA_ENGINE_ACK_WAIT",
    "CADENZA_ENGINE_MAX_DELIVER",
    "CADENZA_ENGINE_SWEEP_INTERVAL",
    "CADENZA_MAX_VALUE_BYTES",
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in VARS:
        monkeypatch.delenv(var, raising=False)


def test_defaults_without_environment() -> None:
    s = EngineSettings()
    assert (s.nats_url, s.nats_creds, s.name) == ("nats://127.0.0.1:4222", None, "engine")
    assert (s.ack_wait, s.max_deliveries, s.sweep_interval) == (30.0, ENGINE_MAX_DELIVERIES, 30.0)
    assert (s.concurrency, s.cache_size, s.max_value_bytes) == (1024, 10_000, MAX_VALUE_BYTES)
    assert s.connect_options() == {}


def test_every_variable_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    values = dict(
        zip(VARS, ["nats://n:1", "/c.creds", "e1", "8", "9", "2.5", "4", "0.5", "2048"], strict=True)
    )
    for var, value in values.items():
        monkeypatch.setenv(var, value)
    s = EngineSettings()
    assert (s.nats_url, s.nats_creds, s.name, s.concurrency, s.cache_size) == (
        "nats://n:1",
        "/c.creds",
        "e1",
        8,
        9,
    )
    assert (s.ack_wait, s.max_deliveries, s.sweep_interval, s.max_value_bytes) == (2.5, 4, 0.5, 2048)
    assert s.connect_options() == {"user_credentials": "/c.creds"}


def test_fields_given_by_name_win_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CADENZA_ENGINE_ACK_WAIT", "7")
    monkeypatch.setenv("CADENZA_ENGINE_MAX_DELIVER", "6")
    s = EngineSettings(name="local", ack_wait=2)
    assert (s.name, s.ack_wait, s.max_deliveries) == ("local", 2.0, 6)


@pytest.mark.parametrize(
    ("var", "value", "says"),
    [
        ("CADENZA_ENGINE_ACK_WAIT", "soon", "valid number"),
        ("CADENZA_ENGINE_ACK_WAIT", "0", "greater than 0"),
        ("CADENZA_ENGINE_MAX_DELIVER", "2.5", "valid integer"),
        ("CADENZA_MAX_VALUE_BYTES", "-1", "greater than 0"),
        ("CADENZA_ENGINE_SWEEP_INTERVAL", "x", "valid number"),
    ],
)
def test_a_bad_variable_is_named(monkeypatch: pytest.MonkeyPatch, var: str, value: str, says: str) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(SettingsError) as err:
        EngineSettings()
    assert str(err.value).startswith(f"{var}={value!r}: ")
    assert says in str(err.value)


def test_a_bad_field_given_by_name_is_named() -> None:
    with pytest.raises(SettingsError, match=r"^ack_wait=-1: "):
        EngineSettings(ack_wait=-1)


def test_cadenza_engine_exits_2_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CADENZA_ENGINE_ACK_WAIT", "soon")
    code = main(["engine", "--nats", "nats://127.0.0.1:1"])
    err = capsys.readouterr().err
    assert code == 2
    assert "CADENZA_ENGINE_ACK_WAIT='soon'" in err
    assert "Traceback" not in err
