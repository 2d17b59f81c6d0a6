"""JetStream streams, buckets and consumers the engine and agents use; created idempotently."""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import AsyncGenerator
from typing import Any

from cadenza.models import LIMITS_BUCKET
from cadenza.nats import SERVER_DELIVERY_SLACK, agent_consumer_config
from cadenza.wire import (
    AUDIT_STREAM,
    AUDIT_SUBJECTS,
    CLAIM_MAX_AGE,
    CLAIMS_BUCKET,
    CONTEXT_BUCKET,
    DEAD_LETTER_STREAM,
    DEAD_LETTER_SUBJECTS,
    DEFINITIONS_BUCKET,
    EVENT_SUBJECTS,
    EVENTS_STREAM,
    LOG_SUBJECTS,
    LOGS_STREAM,
    OUTPUTS_BUCKET,
    PAYLOADS_STORE,
    RUN_STATUS_BUCKET,
    RUNS_BUCKET,
    TASK_SUBJECTS,
    TASKS_STREAM,
    payloads_store,
)
from nats.js.errors import NotFoundError

TIMERS_BUCKET = "cadenza_timers"  # run -> armed timers, watched by every engine
TRIGGERS_BUCKET = "cadenza_triggers"  # trigger de-duplication keys and schedule cursors
ENGINE_CONSUMER = "engine"
AUDIT_MAX_AGE = 30 * 86400.0
DEAD_LETTER_MAX_AGE = 30 * 86400.0
ENGINE_MAX_DELIVERIES = 20
"""Deliveries of one event before the engine dead-letters it. Higher than an agent's: an
event also comes back when its engine dies or NATS restarts mid-batch, and a nak after a
failed batch waits longer each time (see runtime), so 20 spans minutes of outage."""
DUPLICATE_WINDOW = 600.0  # seconds JetStream remembers a Nats-Msg-Id
LOGS_MAX_AGE = 72 * 3600.0
"""Seconds the run logs (LOGS_STREAM) are kept by default (CADENZA_LOGS_MAX_AGE)."""
LOGS_MAX_BYTES = 512 * 1024 * 1024
"""Bytes the run logs may take by default (CADENZA_LOGS_MAX_BYTES); the oldest go first."""
LOGS_MAX_MSG_BYTES = 64 * 1024
"""The largest log record the stream stores: above what an agent sends (cadenza._runlog
cuts a record at 16 KiB), so only a client bypassing the SDK meets it."""
RUNS_HISTORY = 8
"""Revisions the runs bucket keeps per run (the audit trail no longer reads them)."""


def nats_options() -> dict[str, Any]:
    """Connection options every client of ours shares: CADENZA_NATS_CREDS, when set, is
    the credentials file of a NATS server that authenticates its clients; CADENZA_NATS_CA
    the CA of one that offers TLS (as EngineSettings.connect_options reads them)."""
    from cadenza.nats import inbox_prefix, tls_context

    creds, ca = os.environ.get("CADENZA_NATS_CREDS"), os.environ.get("CADENZA_NATS_CA")
    options: dict[str, Any] = {"user_credentials": creds} if creds else {}
    if creds and (prefix := inbox_prefix(creds)):
        options["inbox_prefix"] = prefix  # a client credential reads only its own inboxes
    if ca:
        options["tls"] = tls_context(ca)  # ValueError naming CADENZA_NATS_CA (the CLI checks it first)
    return options


async def ensure_infrastructure(
    js: Any,
    replicas: int = 1,
    engine_ack_wait: float = 30.0,
    engine_max_deliveries: int = ENGINE_MAX_DELIVERIES,
    logs_max_age: float = LOGS_MAX_AGE,
    logs_max_bytes: int = LOGS_MAX_BYTES,
) -> None:
    """Create (or bring up to date) every stream, bucket and the engine's consumer."""
    from nats.js.api import (
        DiscardPolicy,
        KeyValueConfig,
        ObjectStoreConfig,
        RetentionPolicy,
        StorageType,
        StreamConfig,
    )

    # Every stream is on disk, on `replicas` servers, and drops a message whose Nats-Msg-Id
    # it saw in the last DUPLICATE_WINDOW; each below says only what is its own.
    stream = functools.partial(
        StreamConfig, storage=StorageType.FILE, duplicate_window=DUPLICATE_WINDOW, num_replicas=replicas
    )
    streams = [
        stream(name=TASKS_STREAM, subjects=[TASK_SUBJECTS], retention=RetentionPolicy.WORK_QUEUE),
        stream(name=EVENTS_STREAM, subjects=[EVENT_SUBJECTS], retention=RetentionPolicy.WORK_QUEUE),
        stream(
            name=DEAD_LETTER_STREAM,
            subjects=[DEAD_LETTER_SUBJECTS],
            retention=RetentionPolicy.LIMITS,
            max_age=DEAD_LETTER_MAX_AGE,
        ),
        # The audit trail: the engine publishes each committed decision's audit records
        # here (cadenza.audit.<namespace>.<run>), from the run record's outbox, so a record
        # reaches it however long the server was away. It used to source the runs bucket,
        # whose few revisions per run were superseded before a stalled source copied them
        # (records lost), and stored whole run records for AUDIT_MAX_AGE.
        stream(
            name=AUDIT_STREAM,
            subjects=[AUDIT_SUBJECTS],
            retention=RetentionPolicy.LIMITS,
            max_age=AUDIT_MAX_AGE,
        ),
        # What handlers log through task.log, per attempt (cadenza._runlog): bounded by
        # age and size, the oldest dropped first, so a chatty agent costs disk, not an outage.
        stream(
            name=LOGS_STREAM,
            subjects=[LOG_SUBJECTS],
            retention=RetentionPolicy.LIMITS,
            max_age=logs_max_age,
            max_bytes=logs_max_bytes,
            max_msg_size=LOGS_MAX_MSG_BYTES,
            discard=DiscardPolicy.OLD,
            duplicate_window=min(DUPLICATE_WINDOW, logs_max_age),
        ),
    ]
    for cfg in streams:
        # Only create what is missing: updating a stream or consumer that is in use makes
        # the server drop the pull requests other processes have waiting on it.
        try:
            info = await js.stream_info(cfg.name)
        except NotFoundError:
            await js.add_stream(cfg)
            continue
        if cfg.name == LOGS_STREAM and (info.config.max_age, info.config.max_bytes) != (
            cfg.max_age,
            cfg.max_bytes,
        ):  # its limits changed (settings): nobody holds a pull request on it to lose
            info.config.max_age, info.config.max_bytes = cfg.max_age, cfg.max_bytes
            info.config.duplicate_window = cfg.duplicate_window
            await js.update_stream(info.config)
        if cfg.name == AUDIT_STREAM and info.config.sources:  # the sourcing trail of an earlier version
            info.config.sources = None
            info.config.subjects = [AUDIT_SUBJECTS]
            await js.update_stream(info.config)
    for bucket, history, ttl in (
        (RUNS_BUCKET, RUNS_HISTORY, None),
        (OUTPUTS_BUCKET, 1, None),
        (CONTEXT_BUCKET, 1, None),
        (DEFINITIONS_BUCKET, 1, None),
        (TIMERS_BUCKET, 1, None),
        (TRIGGERS_BUCKET, 1, None),
        # What agents may know of a run (engine/run_status.py): kept as long as run records.
        (RUN_STATUS_BUCKET, 1, None),
        # The Models' shared rate windows (cadenza.models): created here, as an agent with
        # a credential may create no bucket.
        (LIMITS_BUCKET, 1, None),
        # Claims of attempts with a queueTimeout (cadenza._claims): only needed while the
        # attempt can still be started or timed out, so they expire instead of growing.
        (CLAIMS_BUCKET, 1, CLAIM_MAX_AGE),
    ):
        # Direct gets: a read is answered by the stream itself, not queued behind every
        # other JetStream API request (0.35 ms instead of 0.8 ms, and concurrent reads no
        # longer serialise). Agents read a run record before each task (is the attempt
        # still current?), engines on every cache miss.
        try:
            info = await js.stream_info(f"KV_{bucket}")
        except NotFoundError:
            with contextlib.suppress(Exception):  # another process created it meanwhile
                await js.create_key_value(
                    KeyValueConfig(
                        bucket=bucket,
                        history=history,
                        storage=StorageType.FILE,
                        replicas=replicas,
                        direct=True,
                        ttl=ttl,
                    )
                )
            continue
        if not info.config.allow_direct:  # a bucket an earlier version created
            info.config.allow_direct = True
            await js.update_stream(info.config)
    with contextlib.suppress(Exception):
        await js.create_object_store(
            PAYLOADS_STORE, config=ObjectStoreConfig(bucket=PAYLOADS_STORE, storage=StorageType.FILE)
        )
    await _ensure_consumer(js, EVENTS_STREAM, engine_consumer_config(engine_ack_wait, engine_max_deliveries))


def engine_consumer_config(ack_wait: float, max_deliveries: int) -> Any:
    """The durable pull consumer every engine shares."""
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    return ConsumerConfig(
        durable_name=ENGINE_CONSUMER,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=ack_wait,
        max_deliver=max_deliveries + SERVER_DELIVERY_SLACK,
        max_ack_pending=-1,
        max_waiting=512,
    )


async def ensure_agent_consumer(js: Any, namespace: str, agent: str, ack_wait: float = 30.0) -> None:
    """The durable pull consumer an Agent's replicas share (competing consumers), and its
    namespace's payload store, which an Agent's credential may use but not create."""
    await _ensure_consumer(js, TASKS_STREAM, agent_consumer_config(namespace, agent, ack_wait))
    await ensure_payloads_store(js, namespace)


async def ensure_payloads_store(js: Any, namespace: str) -> None:
    """The object store of a namespace's large values (cadenza.wire.payloads_store)."""
    from nats.js.api import ObjectStoreConfig, StorageType

    bucket = payloads_store(namespace)
    try:
        await js.stream_info(f"OBJ_{bucket}")
    except NotFoundError:
        with contextlib.suppress(Exception):  # another process created it meanwhile
            await js.create_object_store(
                bucket, config=ObjectStoreConfig(bucket=bucket, storage=StorageType.FILE)
            )


async def _ensure_consumer(js: Any, stream: str, config: Any) -> None:
    """Create the consumer, or update it when what we set differs from what it has.

    Only then: updating a consumer in use makes the server drop the pull requests its
    clients have waiting (they ask again; see PullConsumer._renew).
    """
    try:
        info = await js.consumer_info(stream, config.durable_name)
    except NotFoundError:
        await js.add_consumer(stream, config)
        return
    have = info.config
    if abs((have.ack_wait or 0) - config.ack_wait) > 1e-3 or have.max_deliver != config.max_deliver:
        await js.add_consumer(stream, config)


SCAN_IDLE = 0.5
"""Seconds `current_entries` waits for its watcher before asking again where the scan ends."""


async def current_entries(
    js: Any, bucket: str, kv: Any, keys: str = ">", *, deletes: bool = False
) -> AsyncGenerator[Any, None]:
    """Each current entry of the bucket `bucket` (`kv`, opened on it) whose key matches
    `keys`, one per key, in revision order; then the iteration ends. With `deletes`, the
    delete and purge markers of keys too.

    Written here, not as nats-py's `watch(...)` read up to its first None: that None comes
    from consumer info and from each message's pending count, and under load it comes too
    early (nats.py issue 842: values already sent when the consumer is created; pull
    request 995: a pending count that drops to 0 and rises again while other keys are
    written), so a scan saw some values or none (`tests/integration/test_kv_scan.py`
    shows it). Here the end is a stream sequence: that of the last message matching `keys`
    when the scan begins (STREAM.MSG.GET last_by_subj, which takes wildcards). The watch
    delivers in sequence order, so once an entry at or past it has come, every value
    current at the start has come, except those whose key was written `history` times
    since (their revision is gone before its turn; the runs bucket keeps 8). Those keys'
    newer values come after the end: the scan goes on once more, to the last sequence when
    it got there, and takes the keys it has not yet given. If the end message has gone
    meanwhile (a bucket's max age), the end is asked again while the watcher is idle."""
    import nats.errors

    stream, subject = f"KV_{bucket}", f"$KV.{bucket}.{keys}"

    async def last() -> int | None:
        try:
            return int((await js.get_last_msg(stream, subject)).seq)
        except NotFoundError:
            return None

    end = await last()
    if end is None:
        return
    watcher = await kv.watch(keys, include_history=False)
    seen, given, rounds = 0, set(), 0
    try:
        while True:
            if seen >= end:
                rounds += 1
                then = await last() if rounds == 1 else None
                if then is None or then <= seen:
                    return
                end = then
            try:
                entry = await watcher.updates(timeout=SCAN_IDLE)
            except nats.errors.TimeoutError:
                now = await last()
                end = 0 if now is None else min(end, now)
                continue
            if entry is None:  # nats-py's marker: not trusted (see above)
                continue
            seen = max(seen, entry.revision)
            if entry.key in given:
                continue
            given.add(entry.key)
            if deletes or entry.operation not in ("DEL", "PURGE"):
                yield entry
    finally:
        with contextlib.suppress(Exception):
            await watcher.stop()
