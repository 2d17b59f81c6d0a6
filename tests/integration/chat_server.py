"""An OpenAI-compatible chat completions server for tests (aiohttp, a real HTTP server).

It answers POST /v1/chat/completions, non-streaming and `stream: true` (server-sent
events), with usage; answers the statuses queued in `failures` first (429 with a
Retry-After, 500s); and records what a test checks: each request's arrival time and
Authorization header, and the most requests it held at once.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

INPUT_TOKENS = 11
OUTPUT_TOKENS = 7


@dataclass
class ChatServer:
    delay: float = 0.0  # how long each answer takes: makes concurrent requests overlap
    failures: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)  # time.time() of each request
    authorizations: list[str | None] = field(default_factory=list)
    bodies: list[dict[str, Any]] = field(default_factory=list)
    in_flight: int = 0
    most_in_flight: int = 0
    url: str = ""
    _runner: web.AppRunner | None = None

    async def __aenter__(self) -> ChatServer:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/v1"
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        self.arrivals.append(time.time())
        self.authorizations.append(request.headers.get("Authorization"))
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            body = await request.json()
            self.bodies.append(body)
            if self.delay:
                await asyncio.sleep(self.delay)
            if self.failures:
                status, headers = self.failures.pop(0)
                return web.json_response({"error": {"message": "try later"}}, status=status, headers=headers)
            usage = {
                "prompt_tokens": INPUT_TOKENS,
                "completion_tokens": OUTPUT_TOKENS,
                "total_tokens": INPUT_TOKENS + OUTPUT_TOKENS,
            }
            last = body["messages"][-1]["content"]
            if not body.get("stream"):
                return web.json_response(
                    {
                        "id": "chatcmpl-1",
                        "object": "chat.completion",
                        "model": body["model"],
                        "choices": [
                            {"index": 0, "message": {"role": "assistant", "content": f"echo: {last}"}}
                        ],
                        "usage": usage,
                    }
                )
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            for piece in ["echo", ": ", last]:
                chunk = {"choices": [{"index": 0, "delta": {"content": piece}}]}
                await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
            await response.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode())
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            return response
        finally:
            self.in_flight -= 1
