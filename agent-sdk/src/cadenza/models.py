"""Model calls from agents: an OpenAI-compatible chat completions client whose limits hold
across every agent process and replica.

    m = task.model("fast")
    r = await m.chat([{"role": "user", "content": "hi"}], temperature=0)
    r.text, r.usage.input_tokens, r.usage.output_tokens, r.usage.cost, r.raw
    async for chunk in m.stream(messages): ...
    m.chat_sync(messages) / for chunk in m.stream_sync(messages): ...   # sync handlers

An agent learns its Models' specs from CADENZA_MODELS (JSON: name -> the Model's spec,
without secret values: `cadenza run`/`dev` and the operator write it). An `apiKey`
`secretKeyRef {name, key}` is read from the variable `secret_env_var(name, key)`
(CADENZA_SECRET_<NAME>_<KEY>), which `cadenza run` takes from its own environment and the
operator fills from the Secret with `valueFrom`, so no key is ever written in a manifest.

Limits (`requests` and `tokens` per `per`, `concurrency`) are shared through one JetStream
KV key per Model (bucket LIMITS_BUCKET, key `<namespace>.<model>`), changed only by
compare-and-swap: a process reads the key, decides, and writes back against the revision
it read; a conflict means another process won, and it decides again on the new value.
The value is a sliding window of calls rather than a token bucket, because a window can
say how many requests and tokens were spent in the last `per`, which is what a provider's
limit counts, and because a crashed process's calls age out by themselves (`Window`):

* acquiring adds a lease `[now + LEASE_SECONDS, estimated tokens]` (a concurrency slot;
  an HTTP attempt is bounded by the client timeout, so a lease outlives its call only
  when the process died);
* releasing ends the call at the *end* of the call with the tokens the provider counted,
  summed into the slot of `per / WINDOW_SLOTS` seconds it ended in. Stamping the end, not
  the start, keeps the guarantee at the provider's side: the next call allowed by that
  slot's expiry starts `per` after the provider saw this one, so at most `requests`
  arrive in any window however latencies vary;
* a call counts against the window while in flight, then until its slot's end plus
  `per`; a lease that expired (a crashed caller) ends at its expiry, then ages out. The
  value stays a few kilobytes however many calls a window holds.

A caller that does not fit sleeps until the oldest entry leaves the window (at most
MAX_POLL_SECONDS between looks, for leases released by others). Clocks are the callers'
wall clocks: replicas on hosts whose clocks disagree by more than a small fraction of
`per` are less exact. Every HTTP attempt (retries included) takes a slot: a 429 is a
request the provider counted too. 429 and 5xx are retried at most `max_retries` times,
honouring `Retry-After` (capped at MAX_RETRY_AFTER); then RetryableError hands the
decision to the step's retry policy. Other 4xx raise FatalError.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp

from . import _tracing
from ._errors import FatalError, RetryableError

__all__ = [
    "LIMITS_BUCKET",
    "ChatResponse",
    "Model",
    "ModelLimiter",
    "ModelRegistry",
    "ModelSpec",
    "Usage",
    "Window",
    "load_model_specs",
    "secret_env_var",
]

LIMITS_BUCKET = "cadenza_limits"
"""JetStream KV bucket holding one sliding-window log per Model."""
MODELS_ENV = "CADENZA_MODELS"
LEASE_SECONDS = 120.0
"""How long a concurrency slot is held without a release: longer than any HTTP attempt
(DEFAULT_TIMEOUT), so only a crashed caller's slot ever expires."""
DEFAULT_TIMEOUT = 90.0
MAX_POLL_SECONDS = 0.25
MAX_RETRY_AFTER = 60.0
MAX_CAS_ATTEMPTS = 200
WINDOW_SLOTS = 256
"""Finished calls are summed per `per / WINDOW_SLOTS` seconds (see Window)."""


def secret_env_var(name: str, key: str) -> str:
    """The variable holding Secret `name`'s `key`: CADENZA_SECRET_<NAME>_<KEY>, upper-cased,
    '-' and '.' as '_'."""
    return "CADENZA_SECRET_" + re.sub(r"[-.]", "_", f"{name}_{key}").upper()


_PER = re.compile(r"^([0-9]+(?:\.[0-9]+)?)([kKmM]?)$")
_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d)")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def _seconds(text: str) -> float:
    return sum(float(n) * _UNIT[u] for n, u in _DURATION.findall(text))


def _token_count(text: str | int) -> float:
    """'1M' -> 1e6, '1K' -> 1e3, '100' -> 100."""
    match = _PER.match(str(text))
    if not match:
        raise ValueError(f"pricing.per: {text!r} is not a token count such as 1M, 1K or 1000")
    return float(match.group(1)) * {"": 1, "k": 1e3, "m": 1e6}[match.group(2).lower()]


@dataclass(frozen=True)
class ModelSpec:
    """What an agent knows of one Model (no secret values)."""

    name: str
    base_url: str
    model: str
    namespace: str = "default"
    api_key_ref: tuple[str, str] | None = None  # (secret name, key)
    requests: int | None = None
    tokens: int | None = None
    per: float = 60.0
    concurrency: int | None = None
    price_input: float = 0.0
    price_output: float = 0.0
    price_per: float = 1e6

    @classmethod
    def from_spec(cls, name: str, spec: dict[str, Any], namespace: str = "default") -> ModelSpec:
        limits = spec.get("limits") or {}
        pricing = spec.get("pricing") or {}
        ref = (spec.get("apiKey") or {}).get("secretKeyRef")
        return cls(
            name=name,
            base_url=str(spec["baseURL"]).rstrip("/"),
            model=str(spec["model"]),
            namespace=namespace,
            api_key_ref=(ref["name"], ref["key"]) if ref else None,
            requests=limits.get("requests"),
            tokens=limits.get("tokens"),
            per=_seconds(limits.get("per") or "1m"),
            concurrency=limits.get("concurrency"),
            price_input=float(pricing.get("input", 0.0)),
            price_output=float(pricing.get("output", 0.0)),
            price_per=_token_count(pricing.get("per", "1M")),
        )

    @property
    def limited(self) -> bool:
        return any(x is not None for x in (self.requests, self.tokens, self.concurrency))

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        return (input_tokens * self.price_input + output_tokens * self.price_output) / self.price_per


def load_model_specs(environ: dict[str, str] | None = None) -> dict[str, ModelSpec]:
    """The Models named in CADENZA_MODELS ({name: spec}), in CADENZA_NAMESPACE."""
    env = os.environ if environ is None else environ
    raw = env.get(MODELS_ENV, "")
    if not raw:
        return {}
    namespace = env.get("CADENZA_NAMESPACE", "default")
    try:
        specs = json.loads(raw)
        return {name: ModelSpec.from_spec(name, spec, namespace) for name, spec in specs.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{MODELS_ENV}: not a JSON object of Model specs ({exc})") from None


@dataclass(frozen=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cost: float = 0.0
    # What the call measured, reported with its usage for the engine's model metrics:
    requests: dict[str, int] = field(default_factory=dict)
    """HTTP requests made, retries included, by outcome (cadenza.protocol.MODEL_OUTCOMES)."""
    waited: float = 0.0
    """Seconds spent waiting for the Model's limits and for 429 Retry-After."""
    latency: float | None = None
    """Seconds of the last HTTP exchange (the answer that decided the call)."""


@dataclass(frozen=True)
class ChatResponse:
    text: str
    usage: Usage
    raw: dict[str, Any]


class Window:
    """One Model's calls in the last `per`, as its limits count them (see the module): the
    calls in flight, each with its lease, and the finished ones summed per slot of
    `per / WINDOW_SLOTS` seconds by the time they ended.

    Summing keeps the value small whatever the traffic (100,000 calls of 10 tokens within
    a minute are at most WINDOW_SLOTS + 1 slots, where a log of every call would outgrow a
    NATS message), at the price of precision on the safe side: a finished call counts
    until the end of its slot plus `per`, at most `per / WINDOW_SLOTS` longer than exactly.
    """

    def __init__(self, spec: ModelSpec, live: dict[str, list[float]], done: dict[int, list[float]]) -> None:
        self.spec = spec
        self.slot = spec.per / WINDOW_SLOTS
        self.live = live  # lease -> [until, tokens]: a call in flight (or a crashed caller's)
        self.done = done  # slot index -> [calls, tokens] that ended in it

    @classmethod
    def load(cls, value: dict[str, Any], spec: ModelSpec) -> Window:
        live = {str(k): [float(v[0]), float(v[1])] for k, v in (value.get("live") or {}).items()}
        done = {int(k): [float(v[0]), float(v[1])] for k, v in (value.get("done") or {}).items()}
        return cls(spec, live, done)

    def dump(self) -> dict[str, Any]:
        return {"live": self.live, "done": {str(k): v for k, v in self.done.items()}}

    @property
    def windowed(self) -> bool:
        """Whether finished calls count at all (with concurrency alone they do not)."""
        return self.spec.requests is not None or self.spec.tokens is not None

    def end(self, at: float, calls: float, tokens: float) -> None:
        if self.windowed:
            entry = self.done.setdefault(int(at // self.slot), [0.0, 0.0])
            entry[0] += calls
            entry[1] += tokens

    def release(self, lease: str, now: float, tokens: int | None) -> bool:
        """Move the lease's call to the finished ones; False when there is no such lease."""
        entry = self.live.pop(lease, None)
        if entry is None:
            return False
        self.end(now, 1, entry[1] if tokens is None else tokens)
        return True

    def prune(self, now: float) -> None:
        """Drop what left the window; an expired lease (its caller crashed) ends at its expiry."""
        for lease, (until, tokens) in list(self.live.items()):
            if until <= now:
                del self.live[lease]
                self.end(until, 1, tokens)
        for index in [i for i in self.done if self._leaves(i) <= now]:
            del self.done[index]

    def _leaves(self, index: int) -> float:
        return (index + 1) * self.slot + self.spec.per

    def wait(self, now: float, estimate: int) -> float:
        """Seconds until a call estimated at `estimate` tokens fits (0: now); prunes first."""
        self.prune(now)
        spec = self.spec
        waits = [0.0]
        if spec.concurrency is not None and len(self.live) >= spec.concurrency:
            waits.append(MAX_POLL_SECONDS)  # a slot frees when its holder releases it
        # When each part leaves the window, soonest first: a finished slot `per` after its
        # end; a call in flight not before its release, so look again soon.
        leaving = sorted(
            [(self._leaves(i), calls, tokens) for i, (calls, tokens) in self.done.items()]
            + [(now + MAX_POLL_SECONDS, 1.0, tokens) for _, tokens in self.live.values()]
        )
        for limit, column, amount in ((spec.requests, 1, 1.0), (spec.tokens, 2, float(estimate))):
            if limit is None:
                continue
            need = min(amount, float(limit))  # a prompt larger than the limit waits for an empty window
            spent = sum(part[column] for part in leaving)
            for part in leaving:
                if spent + need <= limit:
                    break
                spent -= part[column]
                waits.append(part[0] - now)
        return max(waits)


class ModelLimiter:
    """A Model's limits as a sliding-window log in one JetStream KV key (see the module)."""

    def __init__(self, kv: Any, spec: ModelSpec) -> None:
        self._kv = kv
        self._spec = spec
        self._key = f"{spec.namespace}.{spec.name}"

    @classmethod
    async def open(cls, js: Any, spec: ModelSpec, bound: bool = False) -> ModelLimiter:
        """The limiter of `spec`; `bound`: the bucket exists (the engine creates it) and is
        bound without asking its stream's info, which an agent credential may not ask."""
        from nats.js.errors import BucketNotFoundError

        from ._kvbind import bind

        if bound:
            return cls(bind(js, LIMITS_BUCKET), spec)
        try:
            kv = await js.key_value(LIMITS_BUCKET)
        except BucketNotFoundError:
            kv = await js.create_key_value(bucket=LIMITS_BUCKET, history=1)
        return cls(kv, spec)

    async def acquire(self, estimate: int) -> tuple[str, float]:
        """Wait for a slot; its id and the seconds waited."""
        lease = uuid.uuid4().hex[:12]
        began = time.monotonic()
        while True:
            value, revision = await self._read()
            window = Window.load(value, self._spec)
            now = time.time()
            wait = window.wait(now, estimate)
            if wait <= 0:
                window.live[lease] = [now + LEASE_SECONDS, estimate]
                if await self._write(window.dump(), revision):
                    return lease, time.monotonic() - began
                continue  # another process wrote first: decide again on its value
            await asyncio.sleep(min(wait, MAX_POLL_SECONDS) * random.uniform(0.8, 1.0) + 0.005)

    async def release(self, lease: str, tokens: int | None) -> None:
        """Mark the call done now, with the tokens the provider counted (None: keep the estimate)."""
        for _ in range(MAX_CAS_ATTEMPTS):
            value, revision = await self._read()
            window = Window.load(value, self._spec)
            if not window.release(lease, time.time(), tokens):
                return
            if await self._write(window.dump(), revision):
                return

    async def _read(self) -> tuple[dict[str, Any], int | None]:
        from nats.js.errors import KeyNotFoundError

        try:
            entry = await self._kv.get(self._key)
        except KeyNotFoundError:
            return {}, None
        if not entry.value:
            return {}, entry.revision
        value = json.loads(entry.value)
        return value if isinstance(value, dict) else {}, entry.revision

    async def _write(self, entries: dict[str, Any], revision: int | None) -> bool:
        from nats.js.errors import KeyWrongLastSequenceError

        data = json.dumps(entries, separators=(",", ":")).encode()
        try:
            if revision is None:
                await self._kv.create(self._key, data)
            else:
                await self._kv.update(self._key, data, last=revision)
        except KeyWrongLastSequenceError:
            return False
        except Exception as exc:  # create on a key written meanwhile
            if "wrong last sequence" in str(exc).lower() or "key exists" in str(exc).lower():
                return False
            raise
        return True


class ModelRegistry:
    """The Models an agent process may call, with one limiter per Model shared by its tasks."""

    def __init__(
        self,
        specs: dict[str, ModelSpec],
        js: Any = None,
        loop: asyncio.AbstractEventLoop | None = None,
        bound: bool = False,
    ) -> None:
        self.specs = specs
        self._js = js
        self._loop = loop
        self._bound = bound  # bind the limits bucket without its stream info (cadenza._kvbind)
        self._limiters: dict[str, ModelLimiter] = {}

    @classmethod
    def from_env(cls) -> ModelRegistry:
        """Unlimited (no NATS): for handlers run under cadenza.testing."""
        return cls(load_model_specs())

    def model(
        self,
        name: str,
        on_usage: Callable[[str, Usage], Any] | None = None,
        check: Callable[[], Awaitable[None]] | None = None,
    ) -> Model:
        spec = self.specs.get(name)
        if spec is None:
            known = ", ".join(sorted(self.specs)) or "none (spec.models is empty)"
            raise FatalError(f"Model {name!r} is not one of this Agent's models: {known}")
        return Model(spec, self._js, on_usage=on_usage, check=check, loop=self._loop, _registry=self)

    async def limiter(self, spec: ModelSpec) -> ModelLimiter | None:
        if self._js is None or not spec.limited:
            return None
        if spec.name not in self._limiters:
            self._limiters[spec.name] = await ModelLimiter.open(self._js, spec, bound=self._bound)
        return self._limiters[spec.name]


@dataclass
class Model:
    """One Model, as `task.model(name)` hands it out."""

    spec: ModelSpec
    js: Any = None  # JetStream context: limits shared through it; None runs unlimited
    max_retries: int = 5
    timeout: float = DEFAULT_TIMEOUT
    on_usage: Callable[[str, Usage], Any] | None = None
    """Called with (model name, usage) after each successful call: where a Task records it."""
    check: Callable[[], Awaitable[None]] | None = None
    """Awaited before each call; raises BudgetExceeded for a run over budget (`cadenza._budget`)."""
    loop: asyncio.AbstractEventLoop | None = None
    """The loop `js` belongs to, for the sync twins called from a worker thread."""
    _registry: ModelRegistry | None = field(default=None, repr=False)

    @property
    def api_key(self) -> str | None:
        if self.spec.api_key_ref is None:
            return None
        var = secret_env_var(*self.spec.api_key_ref)
        value = os.environ.get(var)
        if value is None:
            raise FatalError(f"Model/{self.spec.name}: apiKey: the variable {var} is not set")
        return value

    async def chat(self, messages: list[dict[str, Any]], **params: Any) -> ChatResponse:
        """The model's reply to `messages`; `params` go into the request body as they are."""
        body = {"model": self.spec.model, "messages": messages, **params, "stream": False}
        raw: dict[str, Any] = {}

        async def read(response: aiohttp.ClientResponse) -> int | None:
            nonlocal raw
            raw = await response.json(content_type=None)
            return _total_tokens(raw.get("usage"))

        call = _Measure()
        with _tracing.model_call(self.spec.name, self.spec.model) as span:
            await self._send(body, read, call)
            usage = self._usage(raw.get("usage"), call)
            span.usage(usage.input_tokens, usage.output_tokens, usage.cost)
        message = (raw.get("choices") or [{}])[0].get("message") or {}
        self._record(usage)
        return ChatResponse(text=str(message.get("content") or ""), usage=usage, raw=raw)

    async def stream(self, messages: list[dict[str, Any]], **params: Any) -> AsyncIterator[str]:
        """The reply's text as the model sends it (server-sent events); usage is recorded at the end."""
        body = {
            "model": self.spec.model,
            "messages": messages,
            **params,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        queue: asyncio.Queue[str | None] = asyncio.Queue()
        last_usage: dict[str, Any] = {}

        async def read(response: aiohttp.ClientResponse) -> int | None:
            async for line in response.content:
                text = line.decode().strip()
                if not text.startswith("data:"):
                    continue
                data = text[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("usage"):
                    last_usage.update(chunk["usage"])
                for choice in chunk.get("choices") or []:
                    piece = (choice.get("delta") or {}).get("content")
                    if piece:
                        await queue.put(piece)
            return _total_tokens(last_usage)

        measure = _Measure()

        async def call() -> None:
            try:
                await self._send(body, read, measure)
            finally:
                await queue.put(None)

        with _tracing.model_call(self.spec.name, self.spec.model) as span:
            caller = asyncio.create_task(call())
            try:
                while (piece := await queue.get()) is not None:
                    yield piece
                await caller  # raises the call's error, if any
            finally:
                if not caller.done():
                    caller.cancel()
            usage = self._usage(last_usage, measure)
            span.usage(usage.input_tokens, usage.output_tokens, usage.cost)
        self._record(usage)

    def chat_sync(self, messages: list[dict[str, Any]], **params: Any) -> ChatResponse:
        """`chat` for a sync handler (which runs in a worker thread, outside the event loop)."""
        response: ChatResponse = self._run_sync(self.chat(messages, **params))
        return response

    def stream_sync(self, messages: list[dict[str, Any]], **params: Any) -> Iterator[str]:
        """`stream` for a sync handler; the whole reply is read before the first piece is returned."""

        async def collect() -> list[str]:
            return [piece async for piece in self.stream(messages, **params)]

        yield from self._run_sync(collect())

    def _usage(self, usage: dict[str, Any] | None, call: _Measure) -> Usage:
        usage = usage or {}
        inp = int(usage.get("prompt_tokens") or usage.get("input_tokens") or 0)
        out = int(usage.get("completion_tokens") or usage.get("output_tokens") or 0)
        return Usage(inp, out, self.spec.cost(inp, out), dict(call.requests), call.waited, call.latency)

    def _record(self, usage: Usage) -> None:
        if self.on_usage is not None:
            self.on_usage(self.spec.name, usage)

    def _run_sync(self, coro: Any) -> Any:
        """Run `coro` for sync code: on the agent's loop when a sync handler's worker thread
        calls (the NATS connection belongs to that loop), else on a private loop."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is not None:
            coro.close()
            raise RuntimeError("chat_sync/stream_sync block the event loop: use await m.chat in async code")
        if self.loop is not None and self.loop.is_running():
            return asyncio.run_coroutine_threadsafe(coro, self.loop).result()
        return asyncio.run(coro)

    async def _send(
        self, body: dict[str, Any], read: Callable[[aiohttp.ClientResponse], Any], call: _Measure
    ) -> None:
        """One call with its retries, each HTTP attempt inside a limiter slot; `read` reads
        a successful response and returns the tokens it used."""
        m = self
        if m.check is not None:
            await m.check()
        headers = {"Content-Type": "application/json"}
        key = m.api_key
        if key:
            headers["Authorization"] = f"Bearer {key}"
        limiter = await m._limiter_for()
        estimate = sum(len(str(x.get("content", ""))) for x in body["messages"]) // 4 + int(
            body.get("max_tokens") or 0
        )
        url = f"{m.spec.base_url}/chat/completions"
        timeout = aiohttp.ClientTimeout(total=m.timeout)
        for attempt in range(m.max_retries + 1):
            lease = await limiter.acquire(estimate) if limiter else None
            if lease is not None:
                call.waited += lease[1]
            tokens: int | None = None
            delay = 0.0
            why = ""
            began = time.monotonic()
            outcome = "unreachable"
            try:
                async with (
                    aiohttp.ClientSession(timeout=timeout) as session,
                    session.post(url, json=body, headers=headers) as response,
                ):
                    if response.status == 429 or response.status >= 500:
                        outcome = "ratelimited" if response.status == 429 else "error"
                        delay = _retry_after(response.headers.get("Retry-After"), attempt)
                        why = f"Model/{m.spec.name}: {url} answered {response.status}"
                    elif response.status >= 400:
                        outcome = "error"
                        text = (await response.text())[:300]
                        call.done(outcome, began)
                        m._record(call.failed())  # a 4xx is not retried: the call ends here
                        raise FatalError(f"Model/{m.spec.name}: {url} answered {response.status}: {text}")
                    else:
                        tokens = await read(response)
                        call.done("ok", began)
                        return
            except (aiohttp.ClientError, TimeoutError) as exc:
                delay = _retry_after(None, attempt)
                why = f"Model/{m.spec.name}: {url} unreachable: {exc!r}"
            finally:
                if lease is not None and limiter is not None:
                    await asyncio.shield(limiter.release(lease[0], tokens))
            call.done(outcome, began)
            if attempt < m.max_retries:
                if outcome == "ratelimited":
                    call.waited += delay
                await asyncio.sleep(delay)
        m._record(call.failed())
        raise RetryableError(f"{why} ({m.max_retries + 1} attempts)")

    async def _limiter_for(self) -> ModelLimiter | None:
        if self._registry is None:
            self._registry = ModelRegistry({self.spec.name: self.spec}, self.js, self.loop)
        return await self._registry.limiter(self.spec)


@dataclass
class _Measure:
    """What one call measures across its HTTP attempts (see Usage), filled by `_send`,
    which also records a call that fails after sending (with no tokens)."""

    requests: dict[str, int] = field(default_factory=dict)
    waited: float = 0.0
    latency: float | None = None

    def done(self, outcome: str, began: float) -> None:
        """Count one HTTP request and its time."""
        self.requests[outcome] = self.requests.get(outcome, 0) + 1
        self.latency = time.monotonic() - began

    def failed(self) -> Usage:
        """The usage of a call that got no answer to use: no tokens, what was measured."""
        return Usage(requests=dict(self.requests), waited=self.waited, latency=self.latency)


def _total_tokens(usage: dict[str, Any] | None) -> int | None:
    if not usage:
        return None
    inp = usage.get("prompt_tokens") or usage.get("input_tokens") or 0
    out = usage.get("completion_tokens") or usage.get("output_tokens") or 0
    return int(inp) + int(out)


def _retry_after(header: str | None, attempt: int) -> float:
    """Seconds to wait before retrying: the server's Retry-After (seconds or an HTTP date),
    capped at MAX_RETRY_AFTER, else exponential backoff with jitter."""
    if header:
        try:
            return min(MAX_RETRY_AFTER, max(0.0, float(header)))
        except ValueError:
            try:
                when = float(parsedate_to_datetime(header).timestamp())
                return min(MAX_RETRY_AFTER, max(0.0, when - time.time()))
            except (TypeError, ValueError):
                pass
    return min(MAX_RETRY_AFTER, 0.5 * 2.0**attempt) * random.uniform(0.5, 1.0)
