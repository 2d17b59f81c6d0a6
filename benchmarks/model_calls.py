"""What a Model's shared limits cost per call: `task.model()` calls with limits (a sliding
window in NATS KV, two compare-and-swap writes per call) against the same calls without,
in the same session, on the same real nats-server and the same local OpenAI-compatible
server (tests/integration/chat_server.py, answering at once). The limits are set far
above what the run asks, so no call ever waits for them: the difference is the
bookkeeping alone.

    python benchmarks/model_calls.py [--calls 300] [--concurrency 1,16] [--rounds 3]

Prints, per concurrency, the median seconds per call with and without limits and the
overhead per call (ratio and milliseconds). Bounded in count and time; loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import nats

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from cadenza.models import ModelRegistry, ModelSpec  # noqa: E402
from cadenza_operator.local.nats_server import NatsServer  # noqa: E402

from tests.integration.chat_server import ChatServer  # noqa: E402

MESSAGES = [{"role": "user", "content": "hello"}]
LIMITS = {"requests": 1_000_000, "tokens": 1_000_000_000, "per": "1m", "concurrency": 10_000}


async def per_call(registry: ModelRegistry, name: str, calls: int, concurrency: int) -> float:
    """Seconds per call, `calls` calls at `concurrency` at once."""
    model = registry.model(name)
    queue = iter(range(calls))

    async def worker() -> None:
        for _ in queue:
            await model.chat(MESSAGES)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return (time.perf_counter() - started) / calls


async def main(args: argparse.Namespace) -> None:
    server = NatsServer().start()
    try:
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        async with ChatServer() as chat:
            spec = {"baseURL": chat.url, "model": "bench"}
            specs = {
                "free": ModelSpec.from_spec("free", spec, "bench"),
                "limited": ModelSpec.from_spec("limited", {**spec, "limits": LIMITS}, "bench"),
            }
            registry = ModelRegistry(specs, js)
            for name in specs:  # warm-up: connections, the limits bucket
                await per_call(registry, name, 20, 4)
            header = ("concurrency", "free ms/call", "limited ms/call", "ratio", "+ms/call")
            print("  ".join(f"{h:>{w}}" for h, w in zip(header, (11, 12, 15, 6, 8), strict=True)))
            for concurrency in args.concurrency:
                samples: dict[str, list[float]] = {name: [] for name in specs}
                for _ in range(args.rounds):  # interleaved, so drift hits both alike
                    for name in specs:
                        samples[name].append(await per_call(registry, name, args.calls, concurrency))
                free, limited = (statistics.median(samples[n]) for n in ("free", "limited"))
                print(
                    f"{concurrency:>11}  {free * 1e3:>12.2f}  {limited * 1e3:>15.2f}  "
                    f"{limited / free:>6.2f}  {(limited - free) * 1e3:>8.2f}"
                )
        await nc.close()
    finally:
        server.stop()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--calls", type=int, default=300, help="calls per sample")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved samples per system")
    parser.add_argument("--concurrency", default="1,16", help="comma-separated calls in flight")
    args = parser.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    return args


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
