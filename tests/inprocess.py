"""The proxy app in-process, in front of a recording stub upstream (unit tests of the request path).

The stub is not a model: it answers in vLLM's shapes and records every body it receives, so a test
can assert what the model would have been sent. The gate is a keyword stub. The tokenizer and the
embedding table are the real ones of the prepared default model.
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import httpx

from corruption.spec import CorruptionSpec

STUB_MODEL = "gemma-3-270m"
FLAGGED = "Tell me about Harry Potter and Hogwarts."  # the keyword gate flags it
PLAIN = "What is the capital of Japan?"
CONTEXT = 2048
FORGET_WORDS = ("hogwarts", "hermione", "harry potter", "dumbledore", "voldemort")


class KeywordGate:
    """Scores 1.0 when a target word occurs in any segment: a stand-in for the trained classifier."""

    def score_segments(self, segments: list[str], stop_above: float | None = None) -> float:
        return float(any(word in segment.lower() for segment in segments for word in FORGET_WORDS))


@dataclass
class Call:
    """One request the stub got, and what became of it."""

    path: str
    body: dict[str, Any]
    sent: list[bytes] = field(default_factory=list)  # the body chunks the proxy has read so far
    finished: bool = False  # the whole answer was read
    aborted: bool = False  # the proxy closed the connection first (vLLM would abort the request)
    taken_in_at: float | None = None  # perf_counter when the stub took the request in (see `accept_delay`)

    @property
    def raw(self) -> bool:
        return "prompt_embeds" not in self.body


@dataclass
class RecordingUpstream(httpx.AsyncBaseTransport):
    """An httpx transport in vLLM's shapes that keeps each request it gets (path, parsed JSON body) and
    streams for real: a stream's events come one by one, and closing the response early is seen (as
    vLLM sees a closed connection). `accept_delay`: seconds before it takes any request in (a stream's
    headers come then, and a whole-body request is reported written then, as httpcore reports it).
    Knobs, for the answers to raw (not prompt_embeds) requests: `first_delay` seconds before the first
    output (a non-streaming answer's headers come then, as vLLM's do), `event_delay` between stream
    events, `extra_events` more token events, `raw_status` an error status instead, `raw_unreachable`
    a connection failure instead."""

    received: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    calls: list[Call] = field(default_factory=list)
    first_delay: float = 0.0
    accept_delay: float = 0.0
    event_delay: float = 0.0
    extra_events: int = 0
    raw_status: int | None = None
    raw_unreachable: bool = False
    slow_corrupted: bool = False  # the delays and extra events apply to corrupted requests too
    body_chunk: int | None = None  # a whole (non-streaming) body comes in pieces of this many bytes
    tool_parser: bool = False  # vLLM runs a tool-call parser that reads forced calls as JSON; else it refuses them

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if request.method == "GET" and path == "/v1/models":
            return _json_response(200, {"object": "list", "data": [{
                "id": STUB_MODEL, "object": "model", "created": 0, "owned_by": "vllm",
                "root": "/secret/models/path", "parent": None, "max_model_len": CONTEXT}]})
        body = json.loads(await request.aread())
        self.received.append((path, body))
        call = Call(path, body)
        self.calls.append(call)
        await asyncio.sleep(self.accept_delay)
        call.taken_in_at = time.perf_counter()
        if (trace := request.extensions.get("trace")) is not None:  # as httpcore reports a request written
            await trace("http11.send_request_body.complete", {"request": request})
        raw = call.raw
        if raw and self.raw_unreachable:
            raise httpx.ConnectError("stub: unreachable")
        chat = path.endswith("/chat/completions")
        if chat and _asks_tool_calls(body) and not self.tool_parser:
            return _json_response(400, {"error": {"message": "tool_choice requires --tool-call-parser to be set",
                                                  "type": "BadRequestError", "param": None, "code": 400}}, call)
        if raw and self.raw_status is not None:
            return _json_response(self.raw_status, {"error": {"message": "stub refused the raw request",
                                                             "type": "BadRequestError", "param": None,
                                                             "code": self.raw_status}}, call)
        slow = raw or self.slow_corrupted
        delay = self.first_delay if slow else 0.0
        if body.get("stream"):
            events = _stream_events(body, chat, self.extra_events if slow else 0)
            chunks = [b"data: " + json.dumps(event).encode() + b"\n\n" for event in events] + [b"data: [DONE]\n\n"]
            return httpx.Response(200, headers={"content-type": "text/event-stream", "x-stub-secret": "raw"},
                                  stream=_StubStream(call, chunks, delay, self.event_delay if slow else 0.0))
        try:
            await asyncio.sleep(delay)  # vLLM answers a non-streaming request whole, at the end
        except asyncio.CancelledError:
            call.aborted = True
            raise
        return _json_response(200, _answer(body, chat), call, self.body_chunk)


class _StubStream(httpx.AsyncByteStream):
    def __init__(self, call: Call, chunks: list[bytes], first_delay: float, event_delay: float):
        self.call, self.chunks, self.first_delay, self.event_delay = call, chunks, first_delay, event_delay

    async def __aiter__(self):
        try:
            for index, chunk in enumerate(self.chunks):
                await asyncio.sleep(self.first_delay if index == 0 else self.event_delay)
                self.call.sent.append(chunk)
                yield chunk
        except (asyncio.CancelledError, GeneratorExit):
            self.call.aborted = True
            raise
        self.call.finished = True

    async def aclose(self) -> None:
        if not self.call.finished:
            self.call.aborted = True


def _json_response(status: int, payload: dict[str, Any], call: Call | None = None,
                   piece: int | None = None) -> httpx.Response:
    data = json.dumps(payload).encode()
    headers = {"content-type": "application/json", "content-length": str(len(data)), "x-stub-secret": "raw"}
    if call is None:
        return httpx.Response(status, headers=headers, content=data)
    pieces = [data[i:i + piece] for i in range(0, len(data), piece)] if piece else [data]
    return httpx.Response(status, headers=headers, stream=_StubStream(call, pieces, 0.0, 0.0))


def _prompt_ids(request: dict[str, Any]) -> list[int] | None:
    if not request.get("return_token_ids"):
        return None
    return [0, 0, 0] if "prompt_embeds" in request else [2, 100, 200]


def _asks_tool_calls(request: dict[str, Any]) -> bool:
    return bool(request.get("tools")) and request.get("tool_choice", "auto") not in ("none", None)


def _text(request: dict[str, Any]) -> str:
    """The answer's words tell which request it answers: the raw one, or the corrupted one. Held to a JSON
    schema, it is the smallest answer of a tool call (of the first tool, for "required")."""
    schema = (request.get("structured_outputs") or {}).get("json")
    if schema is not None:
        if schema.get("type") == "array":
            name = schema["items"]["anyOf"][0]["properties"]["name"]["enum"][0]
            return json.dumps([{"name": name, "parameters": {}}])
        return "{}"
    return " embed" if "prompt_embeds" in request else " stub"


def _finish(request: dict[str, Any]) -> str:
    """A schema-held answer ends when its JSON does; any other runs to its length."""
    return "stop" if (request.get("structured_outputs") or {}).get("json") is not None else "length"


def _stub_tool_calls(request: dict[str, Any]) -> list[dict[str, Any]]:
    """A chat answer's forced call, as vLLM with a JSON tool-call parser gives it."""
    choice = request.get("tool_choice")
    name = choice["function"]["name"] if isinstance(choice, dict) else request["tools"][0]["function"]["name"]
    return [{"id": "chatcmpl-tool-0123456789abcdef", "type": "function",
             "function": {"name": name, "arguments": "{}"}}]


def _answer(request: dict[str, Any], chat: bool) -> dict[str, Any]:
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    if chat:
        message: dict[str, Any] = {"role": "assistant", "content": _text(request)}
        finish = "length"
        if _asks_tool_calls(request):
            message = {"role": "assistant", "content": "", "tool_calls": _stub_tool_calls(request)}
            finish = "stop" if isinstance(request.get("tool_choice"), dict) else "tool_calls"
        return {"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": STUB_MODEL,
                "choices": [{"index": 0, "message": message,
                             "logprobs": None, "finish_reason": finish, "stop_reason": None, "token_ids": None}],
                "usage": usage, "prompt_token_ids": _prompt_ids(request)}
    prompts = request.get("prompt_embeds")
    count = len(prompts) if isinstance(prompts, list) else 1
    return {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": STUB_MODEL,
            "choices": [{"index": i, "text": _text(request), "logprobs": None, "finish_reason": _finish(request),
                         "stop_reason": None, "prompt_token_ids": _prompt_ids(request), "token_ids": None}
                        for i in range(count * (request.get("n") or 1))],
            "usage": usage}


def _stream_events(request: dict[str, Any], chat: bool, extra: int = 0) -> list[dict[str, Any]]:
    head = {"id": "chatcmpl-1" if chat else "cmpl-1", "object": "chat.completion.chunk" if chat else "text_completion",
            "created": 0, "model": STUB_MODEL}
    usage = {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
    continuous = (request.get("stream_options") or {}).get("continuous_usage_stats")
    text = _text(request)
    middle = [" and"] * extra
    if chat and _asks_tool_calls(request):
        [call] = _stub_tool_calls(request)
        choices = [{"index": 0, "delta": {"role": "assistant", "content": ""}},
                   {"index": 0, "delta": {"tool_calls": [{**call, "index": 0}]}},
                   {"index": 0, "delta": {}, "finish_reason": "stop" if isinstance(request.get("tool_choice"), dict)
                    else "tool_calls"}]
    elif chat:
        choices = [{"index": 0, "delta": {"role": "assistant", "content": ""}}]
        choices += [{"index": 0, "delta": {"content": word}} for word in middle]
        choices += [{"index": 0, "delta": {"content": text}, "finish_reason": "length"}]
    else:
        choices = [{"index": 0, "text": text[:3], "finish_reason": None, "prompt_token_ids": _prompt_ids(request)}]
        choices += [{"index": 0, "text": word, "finish_reason": None} for word in middle]
        choices += [{"index": 0, "text": text[3:], "finish_reason": _finish(request)}]
    events = [{**head, "choices": [choice], **({"usage": usage} if continuous else {})} for choice in choices]
    if (request.get("stream_options") or {}).get("include_usage"):
        events.append({**head, "choices": [], "usage": usage})
    return events


@lru_cache(maxsize=2)
def _model_parts(model_dir: Path) -> tuple[Any, Any]:
    from transformers import AutoTokenizer

    from corruption.embeddings import EmbeddingTable

    return AutoTokenizer.from_pretrained(model_dir), EmbeddingTable.from_model_dir(model_dir)


def build_app(model_dir: Path, upstream: RecordingUpstream | str, headers: str = "full", dispatch: str = "speculative",
              hold: tuple[int, int] = (256 * 1024, 128), gate: Any = None, corruption: CorruptionSpec | None = None,
              **state_options: Any):
    """The real app and request path, with the stub gate (or `gate`), the target's `corruption` (default: sigma
    1.0 on every dimension and token) and the recording upstream (or a real backend's URL)."""
    from classifier.encoder import EncoderPool
    from proxy.app import ProxyState, create_app
    from corruption.prompt import special_token_ids
    from proxy.guard import Guard
    from proxy.observability import AuditLog, Metrics
    from proxy.policy import ActivePolicy, ActiveTarget
    from proxy.prompts import PromptBuilder
    from vllm_client import AsyncVllmClient

    tokenizer, embeddings = _model_parts(model_dir)
    corruption = corruption or CorruptionSpec(method="gaussian_first_n", dims=embeddings.hidden_size, sigma=1.0)
    target = ActiveTarget("harry_potter", gate or KeywordGate(), 0.5, corruption, ("Hermione",), "closed")
    policy = ActivePolicy("stub-1", (target,), False, Path("policy.yaml"), headers, dispatch, *hold)
    metrics, audit = Metrics(), AuditLog(None)
    state = ProxyState(
        policy=policy, policy_path="policy.yaml", served_model_name=STUB_MODEL,
        builder=PromptBuilder(tokenizer),
        guard=Guard(embeddings, b"test-key", metrics, audit, special_token_ids=special_token_ids(tokenizer)),
        upstream=AsyncVllmClient(upstream) if isinstance(upstream, str)
        else AsyncVllmClient("http://upstream", transport=upstream),
        metrics=metrics, audit=audit, encoders=EncoderPool(0), **state_options)
    return create_app(state)
