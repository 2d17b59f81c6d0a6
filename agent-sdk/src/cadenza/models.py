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
The value is a sliding-window log of calls rather than a token bucket, because a log can
say exactly how many requests and tokens were spent in the last `per`, which is what a
provider's limit counts, and because a crashed process's entries age out by themselves:

* acquiring appends an entry `{until: now + LEASE_SECONDS, live: true}` (a concurrency
  lease; an HTTP attempt is bounded by the client timeout, so a lease outlives its call
  only when the process died) with the tokens estimated from the prompt;
* releasing marks it done at the *end* of the call with the tokens the provider counted.
  Stamping the end, not the start, keeps the guarantee at the provider's side: the next
  call allowed by that entry's expiry starts `per` after the provider saw this one, so at
  most `requests` arrive in any window however latencies vary;
* an entry counts against the window while live or until `until + per`; a live entry whose
  lease expired (a crashed caller) counts as done at its expiry, then ages out.

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

from ._errors import FatalError, RetryableError

__all__ = [
    "LIMITS_BUCKET",
    "ChatResponse",
    "Model",
    "ModelLimiter",
    "ModelRegistry",
    "ModelSpec",
    "Usage",
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


class ModelLimiter:
    """A Model's limits as a sliding-window log in one JetStream KV key (see the module)."""

    def __init__(self, kv: Any, spec: ModelSpec) -> None:
        self._kv = kv
        self._spec = spec
        self._key = f"{spec.namespace}.{spec.name}"

    @classmethod
    async def open(cls, js: Any, spec: ModelSpec) -> ModelLimiter:
        from nats.js.errors import BucketNotFoundError

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
            entries, revision = await self._read()
            now = time.time()
            wait = self._wait_for(entries, now, estimate)
            if wait <= 0:
                entries[lease] = {"until": now + LEASE_SECONDS, "live": True, "tok": estimate}
                if await self._write(entries, revision):
                    return lease, time.monotonic() - began
                continue  # another process wrote first: decide again on its value
            await asyncio.sleep(min(wait, MAX_POLL_SECONDS) * random.uniform(0.8, 1.0) + 0.005)

    async def release(self, lease: str, tokens: int | None) -> None:
        """Mark the call done now, with the tokens the provider counted (None: keep the estimate)."""
        for _ in range(MAX_CAS_ATTEMPTS):
            entries, revision = await self._read()
            entry = entries.get(lease)
            if entry is None:
                return
            entry.update(until=time.time(), live=False)
            if tokens is not None:
                entry["tok"] = tokens
            if await self._write(entries, revision):
                return

    def _wait_for(self, entries: dict[str, Any], now: float, estimate: int) -> float:
        spec = self._spec
        # Only the window limits need finished calls; with concurrency alone, keeping them
        # for `per` would only grow the value (a KV value is a NATS message: 1 MiB at most).
        keep = spec.per if spec.requests is not None or spec.tokens is not None else 0.0
        for lease, e in list(entries.items()):
            if e["until"] + keep <= now and not (e["live"] and e["until"] > now):
                del entries[lease]  # out of the window: pruned on the next write
        live = [e for e in entries.values() if e["live"] and e["until"] > now]
        waits = [0.0]
        if spec.concurrency is not None and len(live) >= spec.concurrency:
            waits.append(MAX_POLL_SECONDS)  # a slot frees when its holder releases it
        # When each entry leaves the window, soonest first: a done one `per` after it ended
        # (a crashed caller's, `per` after its lease expired); a live one not before its
        # release, so look again soon.
        leaving = sorted(
            (
                now + MAX_POLL_SECONDS if e["live"] and e["until"] > now else e["until"] + spec.per,
                int(e["tok"]),
            )
            for e in entries.values()
        )
        if spec.requests is not None and len(leaving) >= spec.requests:
            waits.append(leaving[len(leaving) - spec.requests][0] - now)
        if spec.tokens is not None:
            spent = sum(tok for _, tok in leaving)
            need = min(estimate, spec.tokens)  # a prompt larger than the limit waits for an empty window
            for until, tok in leaving:
                if spent + need <= spec.tokens:
                    break
                spent -= tok
                waits.append(until - now)
        return max(waits)

    async def _read(self) -> tuple[dict[str, Any], int | None]:
        from nats.js.errors import KeyNotFoundError

        try:
            entry = await self._kv.get(self._key)
        except KeyNotFoundError:
            return {}, None
        if not entry.value:
            return {}, entry.revision
        return json.loads(entry.value), entry.revision

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
    ) -> None:
        self.specs = specs
        self._js = js
        self._loop = loop
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
            self._limiters[spec.name] = await ModelLimiter.open(self._js, spec)
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
        await self._send(body, read, call)
        message = (raw.get("choices") or [{}])[0].get("message") or {}
        usage = self._usage(raw.get("usage"), call)
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

        caller = asyncio.create_task(call())
        try:
            while (piece := await queue.get()) is not None:
                yield piece
            await caller  # raises the call's error, if any
        finally:
            if not caller.done():
                caller.cancel()
        self._record(self._usage(last_usage, measure))

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
