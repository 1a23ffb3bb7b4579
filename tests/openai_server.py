"""A real OpenAI-protocol HTTP server on 127.0.0.1 for tests: chat completions plus scripted faults.

The openai client talks to it over real HTTP (``base_url=server.base_url``), so retries, timeouts
and response parsing are the client's own. Tests script faults per request number (1-based, in
arrival order) or per content (a substring of the request's text parts), and assert on
``server.requests`` (every request's parsed JSON body and headers) and ``server.max_in_flight``.

    from openai_server import FakeOpenAIServer, Fault, Reply, openai_server  # the fixture too
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Iterator, Literal

import pytest

FaultKind = Literal["status", "delay", "malformed_body", "content"]


@dataclass(frozen=True)
class Fault:
    """One scripted misbehaviour.

    status: reply HTTP ``status`` with ``headers`` (e.g. {"retry-after-ms": "20"}) and an error body;
    delay: sleep ``seconds`` before answering normally (longer than the client timeout = a timeout);
    malformed_body: 200 with a Content-Type of JSON and a body that is not JSON;
    content: a valid chat completion whose message content is ``content``.
    """

    kind: FaultKind
    status: int = 500
    headers: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    content: str = "I would rate this response quite highly overall."


@dataclass(frozen=True)
class Reply:
    """One choice of a good answer; ``tokens`` (token, logprob) fill ``logprobs.content``, and
    ``top_logprobs[j]`` (token, logprob) pairs that position's ``top_logprobs`` (cut to the request's)."""

    content: str
    tokens: list[tuple[str, float]] | None = None
    finish_reason: str = "stop"
    top_logprobs: list[list[tuple[str, float]]] | None = None


@dataclass(frozen=True)
class RecordedRequest:
    number: int  # 1-based, in arrival order
    path: str
    headers: dict[str, str]  # lower-cased names
    body: dict | None  # parsed JSON, None if it was not JSON

    @property
    def text(self) -> str:
        """All text parts of the messages, joined: what per-content faults match against."""
        return request_text(self.body or {})

    @property
    def image_urls(self) -> list[str]:
        return [part["image_url"]["url"] for message in (self.body or {}).get("messages", [])
                if isinstance(message.get("content"), list)
                for part in message["content"] if part.get("type") == "image_url"]


def request_text(body: dict) -> str:
    parts: list[str] = []
    for message in body.get("messages", []):
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts += [p.get("text", "") for p in content if p.get("type") == "text"]
    return "\n".join(parts)


Responder = Callable[[dict], list[Reply]]


def echo_responder(body: dict) -> list[Reply]:
    """Default: n replies echoing the last text part."""
    return [Reply(content=request_text(body)[-50:])] * int(body.get("n") or 1)


class FakeOpenAIServer:
    def __init__(self, responder: Responder = echo_responder) -> None:
        self.responder = responder
        self.requests: list[RecordedRequest] = []
        self.max_in_flight = 0
        self.latency = 0.0  # added to every answer (to make concurrency observable)
        self.adapters: dict[str, str] = {}  # LoRA adapters loaded at run time: name -> path
        self._faults_by_number: dict[int, Fault] = {}
        self._faults_by_content: list[list] = []  # [substring, fault, times left or None]
        self._in_flight = 0
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = True  # a handler sleeping through a "timeout" must not block shutdown
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02},
                                        daemon=True)  # a short poll: shutdown() waits up to one interval

    # ------------------------------------------------------------------ scripting
    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def fail_request(self, number: int, fault: Fault) -> None:
        """The ``number``-th request (1-based, over the server's life) gets ``fault``."""
        self._faults_by_number[number] = fault

    def fail_when(self, substring: str, fault: Fault, times: int | None = None) -> None:
        """Requests whose text contains ``substring`` get ``fault``: the first ``times`` of them, or all."""
        self._faults_by_content.append([substring, fault, times])

    def heal(self) -> None:
        """Forget every scripted fault: the service has recovered."""
        with self._lock:
            self._faults_by_number.clear()
            self._faults_by_content.clear()

    def requests_containing(self, substring: str) -> list[RecordedRequest]:
        return [r for r in self.requests if substring in r.text]

    # ------------------------------------------------------------------ serving
    def start(self) -> "FakeOpenAIServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def _pick_fault(self, number: int, text: str) -> Fault | None:
        with self._lock:
            if number in self._faults_by_number:
                return self._faults_by_number[number]
            for rule in self._faults_by_content:
                substring, fault, times = rule
                if substring in text and (times is None or times > 0):
                    if times is not None:
                        rule[2] = times - 1
                    return fault
        return None

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        raw = handler.rfile.read(int(handler.headers.get("content-length") or 0))
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        with self._lock:
            number = len(self.requests) + 1
            record = RecordedRequest(number, handler.path, {k.lower(): v for k, v in handler.headers.items()}, body)
            self.requests.append(record)
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
        try:
            self._answer(handler, record)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (its timeout): nothing to answer
        finally:
            with self._lock:
                self._in_flight -= 1

    def _answer(self, handler: BaseHTTPRequestHandler, record: RecordedRequest) -> None:
        if record.path.rstrip("/") == "/v1/load_lora_adapter" and record.body is not None:
            return self._load_lora_adapter(handler, record.body)
        if record.path.rstrip("/") != "/v1/chat/completions" or record.body is None:
            return _send(handler, 404, {"error": {"message": "not found", "type": "invalid_request_error"}})
        fault = self._pick_fault(record.number, record.text)
        if self.latency:
            time.sleep(self.latency)
        if fault is not None and fault.kind == "status":
            error = {"error": {"message": f"scripted {fault.status}", "type": "server_error", "code": None}}
            return _send(handler, fault.status, error, fault.headers)
        if fault is not None and fault.kind == "delay":
            time.sleep(fault.seconds)
        if fault is not None and fault.kind == "malformed_body":
            return _send_raw(handler, 200, b'{"id": "chatcmpl-broken", "choices": [', {})
        if fault is not None and fault.kind == "content":
            replies = [Reply(content=fault.content)] * int(record.body.get("n") or 1)
        else:
            replies = self.responder(record.body)
        _send(handler, 200, completion_json(record.body, replies, record.number))

    def _load_lora_adapter(self, handler: BaseHTTPRequestHandler, body: dict) -> None:
        """vLLM's runtime LoRA endpoint (VLLM_ALLOW_RUNTIME_LORA_UPDATING=True): plain-text 200, or a
        400 error object when the name is taken."""
        name = body.get("lora_name")
        with self._lock:
            if name in self.adapters:
                return _send(handler, 400, {"object": "error", "message": f"The lora adapter '{name}' has already "
                                            "been loaded.", "type": "InvalidUserInput", "param": None, "code": 400})
            self.adapters[name] = body.get("lora_path")
        _send_raw(handler, 200, f"Success: LoRA adapter '{name}' added successfully.".encode(), {},
                  content_type="text/plain; charset=utf-8")

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real servers do

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                server._handle(self)

            def log_message(self, *args) -> None:  # keep pytest output clean
                pass

        return Handler


def completion_json(request: dict, replies: list[Reply], number: int) -> dict:
    """A chat.completion object as the OpenAI API (and vLLM) return it."""
    choices = []
    for index, reply in enumerate(replies):
        logprobs = None
        if reply.tokens is not None:
            top = reply.top_logprobs or [[] for _ in reply.tokens]
            k = int(request.get("top_logprobs") or 0)
            logprobs = {"content": [{"token": t, "logprob": lp, "bytes": list(t.encode()),
                                     "top_logprobs": [{"token": u, "logprob": v, "bytes": list(u.encode())}
                                                      for u, v in alternatives[:k]]}
                                    for (t, lp), alternatives in zip(reply.tokens, top)], "refusal": None}
        choices.append({"index": index, "message": {"role": "assistant", "content": reply.content, "refusal": None},
                        "logprobs": logprobs, "finish_reason": reply.finish_reason})
    prompt_tokens = 100 + len(request_text(request).split())
    completion_tokens = sum(len(r.tokens) if r.tokens is not None else len(r.content.split()) for r in replies)
    return {
        "id": f"chatcmpl-{number}", "object": "chat.completion", "created": int(time.time()),
        "model": request.get("model", "unknown"), "choices": choices, "system_fingerprint": None,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }


def _send(handler: BaseHTTPRequestHandler, status: int, payload: dict, headers: dict[str, str] | None = None) -> None:
    _send_raw(handler, status, json.dumps(payload).encode(), headers or {})


def _send_raw(handler: BaseHTTPRequestHandler, status: int, data: bytes, headers: dict[str, str],
              content_type: str = "application/json") -> None:
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(data)))
    for name, value in headers.items():
        handler.send_header(name, value)
    handler.end_headers()
    handler.wfile.write(data)
    handler.wfile.flush()


@pytest.fixture
def openai_server() -> Iterator[FakeOpenAIServer]:
    """A started server answering with ``echo_responder``; set ``.responder`` to change the answers."""
    server = FakeOpenAIServer().start()
    yield server
    server.stop()
