"""An engine's settings: one object, read from the environment (the Helm chart fills it).

Every process that hosts an engine (`cadenza operator`, `cadenza engine`, `cadenza
run`/`dev`) builds its `EngineHost` from this object. Each field names its environment
variable first and says why it exists. Tests and callers set fields by name
(`EngineSettings(name="local", ack_wait=2)`); what they do not set comes from the
environment, else the default. A malformed variable is a `SettingsError` naming it.
"""

from __future__ import annotations

from typing import Any

from cadenza.wire import MAX_VALUE_BYTES
from pydantic import AliasChoices, Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from .infra import ENGINE_MAX_DELIVERIES, LOGS_MAX_AGE, LOGS_MAX_BYTES


class SettingsError(ValueError):
    """A malformed setting; the message names its environment variable."""


def _env(field: str, var: str) -> Any:
    return AliasChoices(field, var)


class EngineSettings(BaseSettings):
    """Settings of one engine and of its connection to NATS."""

    model_config = SettingsConfigDict(populate_by_name=True, extra="ignore", frozen=False)

    nats_url: str = Field("nats://127.0.0.1:4222", validation_alias=_env("nats_url", "CADENZA_NATS_URL"))
    """CADENZA_NATS_URL: the NATS server (JetStream) holding run state, tasks and events."""

    nats_creds: str | None = Field(None, validation_alias=_env("nats_creds", "CADENZA_NATS_CREDS"))
    """CADENZA_NATS_CREDS: path to a NATS credentials file, for servers that authenticate
    clients (the chart mounts it from a Secret). The one way credentials reach an engine."""

    nats_ca: str | None = Field(None, validation_alias=_env("nats_ca", "CADENZA_NATS_CA"))
    """CADENZA_NATS_CA: a CA certificate (PEM file) the server's TLS certificate must chain
    to, for a server that requires TLS or a tls:// URL (the chart mounts it with `nats.tls`)."""

    require_provenance: bool | None = Field(
        None, validation_alias=_env("require_provenance", "CADENZA_REQUIRE_PROVENANCE")
    )
    """CADENZA_REQUIRE_PROVENANCE: accept an attempt's events (result, failed, started,
    heartbeat, context, usage) only on the subject of the agent its step names
    (`cadenza.event.<ns>.<run>.agent.<agent>`), which an agent credential alone may publish
    on. Unset: required when the engine connects with credentials (`nats_creds`), since
    only then can a subject prove anything. Off, an agent from before per-agent subjects
    (publishing on the run's own subject) still works, and so can anyone who can publish
    there; an event on another agent's subject is rejected either way."""

    name: str = Field("engine", min_length=1, validation_alias=_env("name", "CADENZA_ENGINE_NAME"))
    """CADENZA_ENGINE_NAME: identifies this engine in logs and as the actor of its own
    decisions (`cadenza engine` defaults it to engine-HOST-PID, the operator to its pod)."""

    concurrency: int = Field(1024, gt=0, validation_alias=_env("concurrency", "CADENZA_ENGINE_CONCURRENCY"))
    """CADENZA_ENGINE_CONCURRENCY: events in flight at once across all runs; bounds the
    memory a burst of events can take."""

    cache_size: int = Field(10_000, gt=0, validation_alias=_env("cache_size", "CADENZA_ENGINE_CACHE_SIZE"))
    """CADENZA_ENGINE_CACHE_SIZE: run records kept in memory between events (a cache hit
    skips one KV read)."""

    ack_wait: float = Field(30.0, gt=0, validation_alias=_env("ack_wait", "CADENZA_ENGINE_ACK_WAIT"))
    """CADENZA_ENGINE_ACK_WAIT: seconds before the events held by an engine that died go to
    another engine. Short means fast take-over; it must exceed the time one batch takes."""

    max_deliveries: int = Field(
        ENGINE_MAX_DELIVERIES, gt=0, validation_alias=_env("max_deliveries", "CADENZA_ENGINE_MAX_DELIVER")
    )
    """CADENZA_ENGINE_MAX_DELIVER: deliveries of one event before it is dead-lettered
    instead of retried again (an event that fails every time must not wedge the engines)."""

    sweep_interval: float = Field(
        30.0, gt=0, validation_alias=_env("sweep_interval", "CADENZA_ENGINE_SWEEP_INTERVAL")
    )
    """CADENZA_ENGINE_SWEEP_INTERVAL: seconds between two sweeps of the committed run
    records for timers that are due and did not fire (an engine killed between writing a
    record and announcing its timers). One engine sweeps per interval; a timer missed that
    way fires at most about two intervals late."""

    max_value_bytes: int = Field(
        MAX_VALUE_BYTES, gt=0, validation_alias=_env("max_value_bytes", "CADENZA_MAX_VALUE_BYTES")
    )
    """CADENZA_MAX_VALUE_BYTES: the largest value (run input, step input, run output) as
    JSON. A larger input is rejected at start, a larger rendered step input or run output
    fails its step or run: the engine holds such a value in memory a few times over."""

    logs_max_age: float = Field(
        LOGS_MAX_AGE, gt=0, validation_alias=_env("logs_max_age", "CADENZA_LOGS_MAX_AGE")
    )
    """CADENZA_LOGS_MAX_AGE: seconds the run logs (`cadenza logs`, what handlers log through
    task.log) are kept; older records are removed. Applied to the stream at start."""

    logs_max_bytes: int = Field(
        LOGS_MAX_BYTES, gt=0, validation_alias=_env("logs_max_bytes", "CADENZA_LOGS_MAX_BYTES")
    )
    """CADENZA_LOGS_MAX_BYTES: the disk the run logs may take; past it the oldest records go
    first, so a chatty agent can never fill the server's JetStream storage."""

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise SettingsError(_describe(exc, values)) from None

    @property
    def provenance_required(self) -> bool:
        """Whether attempt events must come on their agent's subject (require_provenance)."""
        return self.require_provenance if self.require_provenance is not None else bool(self.nats_creds)

    def connect_options(self) -> dict[str, Any]:
        """nats-py connection options these settings imply (credentials, TLS, when set).
        A CA file that cannot be read is a SettingsError naming CADENZA_NATS_CA."""
        from cadenza.nats import tls_context

        options: dict[str, Any] = {"user_credentials": self.nats_creds} if self.nats_creds else {}
        if self.nats_ca:
            try:
                options["tls"] = tls_context(self.nats_ca)
            except ValueError as exc:
                raise SettingsError(str(exc)) from None
        return options


def _describe(exc: ValidationError, given: dict[str, Any]) -> str:
    """The first error, naming the environment variable (or the field, when passed in)."""
    import os

    err = exc.errors()[0]
    field = str(err["loc"][0]) if err["loc"] else ""
    info = EngineSettings.model_fields.get(field)
    alias = info.validation_alias if info is not None else None
    var = next((c for c in getattr(alias, "choices", ()) if isinstance(c, str) and c.isupper()), field)
    if field in given:
        return f"{field}={given[field]!r}: {err['msg']}"
    raw = next((v for k, v in os.environ.items() if k.upper() == var), err.get("input"))
    return f"{var}={raw!r}: {err['msg']}"
