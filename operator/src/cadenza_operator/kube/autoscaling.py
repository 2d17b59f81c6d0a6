"""Autoscaling an Agent on the depth of its task queue, built in (no KEDA, no HPA).

The signal is the agent's JetStream consumer: tasks waiting (`num_pending`) plus tasks
delivered and not yet finished (`num_ack_pending`). In-flight tasks count as load on
purpose: replicas pull tasks as soon as they can, so the waiting count alone drops to
zero while the work is still being done, and scaling on it would kill busy replicas.
Each replica is expected to absorb `targetPendingPerReplica` tasks, so the wanted count
is ceil(load / target), kept within [minReplicas, maxReplicas]. Scale to zero is
allowed when minReplicas is 0: tasks wait durably in JetStream and the first one
brings a replica back.

Scaling up is immediate; scaling down follows the highest wish of the last
`SCALE_DOWN_WINDOW` seconds, so a queue that empties between two bursts does not make
the Deployment flap (what the HPA's stabilization window does).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ..models import AutoscalingSpec

SCALE_DOWN_WINDOW = 60.0
"""Seconds a lower replica count must be wanted before the Deployment shrinks."""


def desired_replicas(load: int, autoscaling: AutoscalingSpec) -> int:
    """Replicas for this many unfinished tasks: clamp(ceil(load / target), min, max)."""
    wanted = math.ceil(max(0, load) / autoscaling.targetPendingPerReplica)
    return max(autoscaling.minReplicas, min(autoscaling.maxReplicas, wanted))


def stabilized(history: Sequence[tuple[float, int]], now: float, window: float = SCALE_DOWN_WINDOW) -> int:
    """The replica count to run: the highest wish in the window (history: (time, wish))."""
    recent = [wish for at, wish in history if now - at <= window]
    if not recent:
        raise ValueError("no recent scaling wish")
    return max(recent)


def prune(history: list[tuple[float, int]], now: float, window: float = SCALE_DOWN_WINDOW) -> None:
    """Forget wishes older than the window (keeps the per-Agent history bounded)."""
    history[:] = [(at, wish) for at, wish in history if now - at <= window]
