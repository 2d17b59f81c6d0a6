"""A Model's shared window (cadenza.models.Window): bounded in size whatever the traffic,
never more permissive than an exact log of every call, and late by at most one slot."""

from __future__ import annotations

import json
import random

import pytest
from cadenza.models import WINDOW_SLOTS, ModelSpec, Window


def spec(**limits: object) -> ModelSpec:
    return ModelSpec.from_spec("fast", {"baseURL": "http://x/v1", "model": "m", "limits": limits})


def exact_wait(
    ended: list[tuple[float, int]],
    live: list[int],
    per: float,
    limit: int,
    need: float,
    now: float,
    column: int,
) -> float:
    """The same question asked of a log of every call: (end, tokens) of the finished ones."""
    poll = 0.25
    parts = sorted(
        [(end + per, 1, tok) for end, tok in ended if end + per > now] + [(now + poll, 1, t) for t in live]
    )
    spent = sum(p[column] for p in parts)
    waits = [0.0]
    for part in parts:
        if spent + min(need, limit) <= limit:
            break
        spent -= part[column]
        waits.append(part[0] - now)
    return max(waits)


def test_a_minute_of_100_000_small_calls_stays_a_small_value() -> None:
    window = Window.load({}, spec(tokens=2_000_000, per="1m"))
    for i in range(100_000):
        now = 1_000.0 + i * 60.0 / 100_000
        window.live["x"] = [now + 120, 10]
        assert window.release("x", now, 10)
        if i % 1000 == 0:
            window.prune(now)
    size = len(json.dumps(window.dump()))
    assert len(window.done) <= WINDOW_SLOTS + 1 and size < 16 * 1024, size
    assert sum(tokens for _, tokens in window.done.values()) == 1_000_000  # nothing lost


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("kind", ["tokens", "requests"])
def test_the_window_is_never_more_permissive_than_an_exact_log_and_late_by_at_most_a_slot(
    seed: int, kind: str
) -> None:
    rng = random.Random(seed)
    per, limit = 10.0, (500 if kind == "tokens" else 20)
    window = Window.load({}, spec(**{kind: limit, "per": "10s"}))
    ended: list[tuple[float, int]] = []
    now, column = 0.0, (2 if kind == "tokens" else 1)
    for _ in range(400):
        now += rng.expovariate(4.0)
        tokens = rng.randint(1, 60)
        need = float(tokens) if kind == "tokens" else 1.0
        got = window.wait(now, tokens)
        want = exact_wait(ended, [], per, limit, need, now, column)
        assert got >= want - 1e-9, (now, got, want)  # never lets through what a log would not
        assert got <= want + per / WINDOW_SLOTS + 1e-9, (now, got, want)  # late by a slot at most
        if got <= 0:
            window.live["c"] = [now + 120, tokens]
            window.release("c", now, tokens)
            ended.append((now, tokens))


def test_a_crashed_callers_lease_ends_at_its_expiry_then_ages_out() -> None:
    window = Window.load({}, spec(requests=1, per="10s", concurrency=5))
    window.live["lost"] = [100.0, 7]
    assert window.wait(50.0, 1) > 0  # in flight: counts
    assert window.wait(105.0, 1) > 0  # expired at 100: counts as ended then, for `per`
    assert window.wait(110.0 + 10 / WINDOW_SLOTS + 1e-6, 1) <= 0
    assert window.live == {} and window.done == {}
