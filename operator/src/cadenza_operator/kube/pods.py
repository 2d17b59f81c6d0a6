"""What an Agent's pods say about it: is its container crash-looping, and what did it print
last? Pure: the pod objects come in (a list by the Deployment's label selector), a
`CrashLoop` or None comes out.

The last log lines come from Kubernetes itself: the agent container has
`terminationMessagePolicy: FallbackToLogsOnError` (see `builders.build_deployment`), so
when it exits non-zero without writing a termination message the kubelet copies the tail
of its log (at most 80 lines, 2048 bytes) into `lastState.terminated.message`. The
operator needs no `pods/log` permission and makes no request per restart.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

CRASH_LOOP_REASON = "CrashLoopBackOff"

SETTLE_SECONDS = 60.0
"""A container restarted after a non-zero exit still counts as crash-looping until it has
stayed up this long. Between two crashes it runs (and is ready: agents have no readiness
probe) for a few seconds; without this, each observation would flip the Agent's condition
and write it, and post an Event, once per restart."""

Json = dict[str, Any]


@dataclass(frozen=True)
class CrashLoop:
    """The worst crash-looping container among an Agent's pods (most restarts)."""

    pod: str
    container: str
    restarts: int
    exit_code: int | None
    reason: str  # the kubelet's reason for the last exit: Error, OOMKilled, ...
    logs: str  # the tail of its log, as the kubelet kept it ("" if it kept none)
    pods: int  # how many of the Agent's pods crash-loop

    @property
    def last_line(self) -> str:
        """The last non-blank log line: usually the exception a traceback ends with."""
        lines = [line.strip() for line in self.logs.splitlines() if line.strip()]
        return lines[-1] if lines else ""

    def exit_text(self) -> str:
        code = f"exit code {self.exit_code}" if self.exit_code is not None else "an unknown exit code"
        return f"{code} ({self.reason})" if self.reason else code

    def message(self, limit: int = 512) -> str:
        """For the Agent's Degraded condition: which pod, how it exits, its last log lines,
        the newest kept when they do not all fit in `limit` characters."""
        others = f" (and {self.pods - 1} more pods)" if self.pods > 1 else ""
        head = (
            f"container {self.container} of pod {self.pod}{others} is crash-looping: "
            f"{self.restarts} restarts, last {self.exit_text()}"
        )
        if not self.logs.strip():
            return head + "; it left no log lines"
        return head + "; last log lines:\n" + log_tail(self.logs, max(80, limit - len(head) - 18))


def log_tail(text: str, limit: int) -> str:
    """The last whole lines of `text` that fit in `limit` characters (at least the end of
    the last line: the end of a traceback says what went wrong)."""
    lines = [line.rstrip() for line in text.rstrip().splitlines()]
    kept: list[str] = []
    size = 0
    for line in reversed(lines):
        if size + len(line) + 1 > limit:
            break
        kept.append(line)
        size += len(line) + 1
    if not kept and lines:
        return "…" + lines[-1][-max(1, limit - 1) :]
    return "\n".join(reversed(kept))


def _timestamp(value: Any) -> float | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _failed_exit(terminated: Mapping[str, Any] | None) -> bool:
    return bool(terminated) and int((terminated or {}).get("exitCode") or 0) != 0


def container_crash_loop(status: Mapping[str, Any], now: float) -> bool:
    """Whether one containerStatus says crash loop: waiting in CrashLoopBackOff; exited
    non-zero after restarts (the kubelet is about to restart it); or restarted after a
    non-zero exit and up for less than SETTLE_SECONDS."""
    state = status.get("state") or {}
    last = (status.get("lastState") or {}).get("terminated")
    restarts = int(status.get("restartCount") or 0)
    if (state.get("waiting") or {}).get("reason") == CRASH_LOOP_REASON:
        return True
    if restarts and _failed_exit(state.get("terminated")):
        return True
    running = state.get("running")
    if running is not None and restarts and _failed_exit(last):
        started = _timestamp(running.get("startedAt"))
        return started is None or now - started < SETTLE_SECONDS
    return False


def crash_loop(pods: Iterable[Mapping[str, Any]], now: float) -> CrashLoop | None:
    """The crash loop among these pods (the container with the most restarts), or None.

    Pods being deleted are left out: during a rollout that deploys a fix, the old pods'
    crashes are no longer the Agent's state."""
    found: list[tuple[int, str, str, Mapping[str, Any]]] = []
    crashing_pods = set()
    for pod in pods:
        meta = pod.get("metadata") or {}
        if meta.get("deletionTimestamp"):
            continue
        statuses = (pod.get("status") or {}).get("containerStatuses") or []
        for status in statuses:
            if container_crash_loop(status, now):
                name = str(meta.get("name") or "")
                crashing_pods.add(name)
                found.append(
                    (int(status.get("restartCount") or 0), name, str(status.get("name") or ""), status)
                )
    if not found:
        return None
    restarts, pod_name, container, status = max(found, key=lambda f: (f[0], f[1]))
    state = status.get("state") or {}
    # The exit being waited out (lastState), or the one that just happened (state).
    terminated = state.get("terminated") or (status.get("lastState") or {}).get("terminated") or {}
    code = terminated.get("exitCode")
    return CrashLoop(
        pod=pod_name,
        container=container,
        restarts=restarts,
        exit_code=int(code) if code is not None else None,
        reason=str(terminated.get("reason") or ""),
        logs=str(terminated.get("message") or ""),
        pods=len(crashing_pods),
    )


__all__ = ["CRASH_LOOP_REASON", "CrashLoop", "container_crash_loop", "crash_loop", "log_tail"]
