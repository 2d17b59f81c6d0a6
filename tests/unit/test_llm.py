"""cadenza.llm against a small OpenAI-compatible stand-in on 127.0.0.1."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from cadenza import FatalError, RetryableError
from cadenza.llm import chat


class _Endpoint(BaseHTTPRequestHandler):
    status = 200
    seen: list[dict[str, object]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        reply = {"choices": [{"message": {"content": "  billing \n"}}]}
        data = json.dumps(reply).encode()
        self.send_response(type(self).status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def endpoint(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[_Endpoint]]:
    server = HTTPServer(("127.0.0.1", 0), _Endpoint)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Endpoint.status, _Endpoint.seen = 200, []
    monkeypatch.setenv("CADENZA_LLM_BASE_URL", f"http://127.0.0.1:{server.server_port}/v1/")
    monkeypatch.setenv("CADENZA_LLM_MODEL", "tiny")
    monkeypatch.setenv("CADENZA_LLM_API_KEY", "k")
    try:
        yield _Endpoint
    finally:
        server.shutdown()
        server.server_close()


def test_no_endpoint_means_no_call(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CADENZA_LLM_BASE_URL", raising=False)
    assert chat("system", "user") is None


def test_reply_and_request(endpoint: type[_Endpoint]) -> None:
    assert chat("You classify.", "refund please", as_json=True) == "billing"
    (call,) = endpoint.seen
    assert call["path"] == "/v1/chat/completions"
    assert call["auth"] == "Bearer k"
    body = call["body"]
    assert isinstance(body, dict)
    assert body["model"] == "tiny"
    assert body["response_format"] == {"type": "json_object"}
    assert [m["role"] for m in body["messages"]] == ["system", "user"]


@pytest.mark.parametrize(
    ("status", "error"), [(429, RetryableError), (503, RetryableError), (400, FatalError)]
)
def test_failures_map_to_the_retry_policy(
    endpoint: type[_Endpoint], status: int, error: type[Exception]
) -> None:
    endpoint.status = status
    with pytest.raises(error):
        chat("s", "u")
