"""An optional model call for agents: an OpenAI-compatible chat endpoint, stdlib only.

`chat()` returns None unless CADENZA_LLM_BASE_URL is set, so an agent can keep a
deterministic offline path and use a model where one is configured:

    from cadenza.llm import chat

    answer = chat("You classify support tickets.", ticket) or rule_based(ticket)

Settings: CADENZA_LLM_BASE_URL (e.g. http://127.0.0.1:11434/v1), CADENZA_LLM_MODEL
(default gpt-4o-mini), CADENZA_LLM_API_KEY. Failures map onto the step's retry policy:
network errors, 429 and 5xx raise RetryableError; other HTTP errors raise FatalError.
Written with urllib rather than an SDK so that agent images stay small and nothing is
installed for agents that never call a model.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from typing import Any

from ._errors import FatalError, RetryableError


def chat(system: str, user: str, *, as_json: bool = False, timeout: float = 30.0) -> str | None:
    """The model's reply to one system + user message, or None when no endpoint is set."""
    base = os.environ.get("CADENZA_LLM_BASE_URL", "").rstrip("/")
    if not base:
        return None
    body: dict[str, Any] = {
        "model": os.environ.get("CADENZA_LLM_MODEL", "gpt-4o-mini"),
        "temperature": 0,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
    }
    if as_json:
        body["response_format"] = {"type": "json_object"}
    headers = {"Content-Type": "application/json"}
    if os.environ.get("CADENZA_LLM_API_KEY"):
        headers["Authorization"] = f"Bearer {os.environ['CADENZA_LLM_API_KEY']}"
    request = urllib.request.Request(
        f"{base}/chat/completions", data=json.dumps(body).encode(), headers=headers, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            reply = json.load(response)
    except urllib.error.HTTPError as exc:
        if exc.code == 429 or exc.code >= 500:
            raise RetryableError(f"LLM endpoint answered {exc.code}") from None
        raise FatalError(f"LLM endpoint answered {exc.code}: {exc.reason}") from None
    except (urllib.error.URLError, TimeoutError) as exc:
        raise RetryableError(f"LLM endpoint unreachable: {exc}") from None
    return str(reply["choices"][0]["message"]["content"]).strip()
