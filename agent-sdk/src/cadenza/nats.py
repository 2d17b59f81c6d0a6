"""How Cadenza uses NATS JetStream, for the engine, the operator and tools built on them.

Agent authors need none of this (`Agent` does it for them). It is public so that the
engine and the operator use the very code agents use, rather than a copy that drifts:

- connecting: `connect_once` (a command: fail fast, `NatsUnreachable` naming the URL)
  and `connect_until_stopped` (a long-running process: retry until connected or stopped);
  `tls_context` for a server that offers TLS (CADENZA_NATS_CA);
- publishing and consuming: `Publisher` (JetStream publishes whose acks are awaited
  without a request each), `PullConsumer` (continuous pulls from a durable consumer) and
  the configuration of an Agent's consumer;
- deliveries: how often a message was delivered and when it was stored, and the
  dead-letter stream for messages given up on (with the reason in its headers);
- large values: what does not fit in a message travels through the object store as a
  reference (`offload_payload`, `resolve_payload`);
- claims: one per attempt, deciding whether an agent starts it or the engine has given
  it up (`claim_attempt`, `give_up_attempt`, `send_give_up_attempt`, `Claim`).

The implementation lives in the SDK's private modules; this module is its public face.
The names these use (streams, buckets, subjects) and the JSON encoding are in
`cadenza.wire`, which does no I/O; the typed events are in `cadenza.protocol`.
"""

from __future__ import annotations

from ._ackinfo import deliveries, stored_at
from ._claims import Claim
from ._claims import claim as claim_attempt
from ._claims import give_up as give_up_attempt
from ._claims import send_give_up as send_give_up_attempt
from ._connect import (
    INBOX_PREFIX,
    NatsUnreachable,
    connect_once,
    connect_until_stopped,
    credential_claims,
    inbox_prefix,
    tls_context,
)
from ._deadletter import DELIVERIES as DEAD_LETTER_DELIVERIES_HEADER
from ._deadletter import MAX_DELIVERIES, dead_letter
from ._deadletter import REASON as DEAD_LETTER_REASON_HEADER
from ._deadletter import SOURCE as DEAD_LETTER_SOURCE_HEADER
from ._deadletter import SUBJECT as DEAD_LETTER_SUBJECT_HEADER
from ._payloads import ValueTooLarge
from ._payloads import offload as offload_payload
from ._payloads import resolve as resolve_payload
from ._payloads import store as store_payload
from ._publish import Publisher
from ._pull import SERVER_DELIVERY_SLACK, PullConsumer, agent_consumer_config

__all__ = [
    "DEAD_LETTER_DELIVERIES_HEADER",
    "DEAD_LETTER_REASON_HEADER",
    "DEAD_LETTER_SOURCE_HEADER",
    "DEAD_LETTER_SUBJECT_HEADER",
    "INBOX_PREFIX",
    "MAX_DELIVERIES",
    "SERVER_DELIVERY_SLACK",
    "Claim",
    "NatsUnreachable",
    "Publisher",
    "PullConsumer",
    "ValueTooLarge",
    "agent_consumer_config",
    "claim_attempt",
    "connect_once",
    "connect_until_stopped",
    "credential_claims",
    "dead_letter",
    "deliveries",
    "give_up_attempt",
    "inbox_prefix",
    "offload_payload",
    "resolve_payload",
    "send_give_up_attempt",
    "store_payload",
    "stored_at",
    "tls_context",
]
