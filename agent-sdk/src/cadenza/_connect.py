"""Connecting to NATS: attempts that end, one log line each, and a stop that is always heard.

Left to itself, nats-py retries a first connection inside `connect()`: for ever with
`max_reconnect_attempts=-1` (a process then never reaches the code that would notice
SIGTERM), otherwise 60 times two seconds (a command hangs for two minutes), and its
default error callback logs a traceback for every try. Here an attempt ends at the first
error nats-py reports, and the caller decides what comes next: a command gives up at once
(`connect_once`), a long-running process waits a growing, capped delay and tries again
until it connects or is told to stop (`connect_until_stopped`). Once connected, nats-py
reconnects for ever, with one log line per error instead of a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import ssl
from typing import Any

import structlog

ATTEMPT_TIMEOUT = 5.0
"""Seconds nats-py may spend on each stage of one attempt (TCP connect, INFO, PONG)."""
COMMAND_TIMEOUT = 3.0
"""A command's single attempt: long enough for a slow network, short enough to not hang."""
FIRST_RETRY = 0.5
"""Seconds before a long-running process tries again after its first failed attempt."""
MAX_RETRY = 15.0
"""The cap of the doubling delay between attempts: a process comes up at most this long
after NATS does, and a down NATS costs one log line per attempt, not one per second."""
RECONNECT_WAIT = 2.0
"""Once connected: seconds between nats-py's reconnection attempts (its default)."""

_log = structlog.get_logger("cadenza.nats")


class NatsUnreachable(Exception):
    """A connection to NATS could not be made; `str()` is the message for a person."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"cannot reach NATS at {url}: {reason}")
        self.url = url
        self.reason = reason


def describe(exc: BaseException) -> str:
    """Why a connection failed, in a few words (never a traceback)."""
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, TimeoutError):  # nats.errors.TimeoutError is one too
        return "timed out"
    if isinstance(exc, socket.gaierror):
        return f"unknown host ({exc.strerror})"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    text = str(exc).strip() or type(exc).__name__
    return text.removeprefix("nats: ")


def tls_context(ca_file: str) -> ssl.SSLContext:
    """The client side of a NATS server that offers TLS (the chart's `nats.tls`): the
    server's certificate must chain to the CA in `ca_file` (CADENZA_NATS_CA, a PEM file)
    and name the host connected to. nats-py takes it as `tls=` and speaks TLS with a
    `tls://` URL or a server that requires it (a plaintext server is not upgraded: the
    server's `tls {}` block is what enforces TLS). A missing or malformed file is a
    `ValueError` naming it."""
    try:
        return ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not a PEM CA certificate"
        raise ValueError(f"CADENZA_NATS_CA={ca_file}: {reason}") from None


async def connect_once(url: str, *, timeout: float = COMMAND_TIMEOUT, log: Any = None, **options: Any) -> Any:
    """One attempt, for a command: the connected client, or `NatsUnreachable`."""
    return await _attempt(url, timeout, log or _log, options)


async def connect_until_stopped(
    url: str,
    stop: asyncio.Event,
    *,
    log: Any = None,
    timeout: float = ATTEMPT_TIMEOUT,
    first_retry: float = FIRST_RETRY,
    max_retry: float = MAX_RETRY,
    **options: Any,
) -> Any | None:
    """For a long-running process: try until connected (the client), or until `stop` is
    set (None), whether it is set during an attempt or between two."""
    log = log or _log
    attempt = 0
    while not stop.is_set():
        attempt += 1
        job = asyncio.ensure_future(_attempt(url, timeout, log, options))
        halt = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({job, halt}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            halt.cancel()
        if not job.done():
            job.cancel()  # stopped mid-attempt: _attempt closes what it opened
            with contextlib.suppress(asyncio.CancelledError, NatsUnreachable):
                await job
            return None
        try:
            return job.result()
        except NatsUnreachable as exc:
            # Jitter spreads the replicas that all lost NATS at once over the delay.
            delay = min(max_retry, first_retry * 2 ** min(attempt - 1, 30)) * random.uniform(0.75, 1)
            log.warning(
                "cannot reach NATS, retrying",
                nats=url,
                attempt=attempt,
                error=exc.reason,
                retry_in=round(delay, 2),
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
    return None


async def _attempt(url: str, timeout: float, log: Any, options: dict[str, Any]) -> Any:
    from nats.aio.client import Client

    nc = Client()
    loop = asyncio.get_running_loop()
    first_error: asyncio.Future[BaseException] = loop.create_future()
    connected = False

    async def on_error(exc: Exception) -> None:
        if not connected:
            if not first_error.done():
                first_error.set_result(exc)
        else:
            log.warning("NATS error", nats=url, error=describe(exc))

    async def on_disconnected() -> None:
        if connected and not nc.is_closed:  # not for a failed attempt, nor a close()
            log.warning("disconnected from NATS", nats=url)

    async def on_reconnected() -> None:
        log.info("reconnected to NATS", nats=url)

    # The reconnection settings only matter once connected: before that, the attempt
    # ends at the first error, cancelling nats-py's own retry loop.
    connecting = loop.create_task(
        nc.connect(
            url,
            connect_timeout=timeout,  # type: ignore[arg-type]  # seconds; floats work
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            reconnect_time_wait=RECONNECT_WAIT,  # type: ignore[arg-type]
            error_cb=on_error,
            disconnected_cb=on_disconnected,
            reconnected_cb=on_reconnected,
            **options,
        )
    )
    try:
        # Each stage of the handshake has its own timeout: three of them bound the whole.
        either: set[asyncio.Future[Any]] = {connecting, first_error}
        await asyncio.wait(either, timeout=3 * timeout, return_when=asyncio.FIRST_COMPLETED)
        if connecting.done() and not connecting.cancelled() and connecting.exception() is None:
            connected = True
            return nc
        if first_error.done():
            reason = describe(first_error.result())
        elif connecting.done() and not connecting.cancelled():
            reason = describe(connecting.exception() or TimeoutError())
        else:
            reason = "timed out"
        raise NatsUnreachable(url, reason)
    finally:
        if not connected:
            connecting.cancel()
            with contextlib.suppress(BaseException):
                await connecting
            with contextlib.suppress(Exception):
                await nc.close()


def credential_claims(creds_path: str) -> dict[str, Any] | None:
    """The claims of the user JWT in a .creds file (its `sub`, the user's public key, its
    `name`, its permissions), read, not verified: the server verifies it. None when the
    file holds no JWT we can read."""
    import base64
    import json

    try:
        with open(creds_path) as f:
            lines = f.read().splitlines()
        token = lines[lines.index("-----BEGIN NATS USER JWT-----") + 1].strip()
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (OSError, ValueError, IndexError):
        return None
    return claims if isinstance(claims, dict) else None


def inbox_prefix(creds_path: str) -> str | None:
    """The reply-subject prefix a credential may subscribe to: `_INBOX_<its user key>`.

    Every request's reply (a pulled task, a publish ack, a KV read, an object chunk) goes
    to an inbox subject; a credential allowed `_INBOX.>` would receive everyone's. A
    credential minted by Cadenza may subscribe only to the inboxes named after its own
    user public key (security/nats_auth.mint_user), so a connection with it must make its
    inboxes there (nats-py's `inbox_prefix`). None when the file holds no user JWT we can
    read: the connection keeps nats-py's `_INBOX`."""
    subject = (credential_claims(creds_path) or {}).get("sub")
    return f"{INBOX_PREFIX}{subject}" if isinstance(subject, str) and subject.isalnum() else None


INBOX_PREFIX = "_INBOX_"
"""Followed by a credential's user public key: the inboxes only that credential may read."""
