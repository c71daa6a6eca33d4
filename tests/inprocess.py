"""The proxy app in-process, in front of a recording stub upstream (unit tests of the request path).

The stub is not a model: it answers in vLLM's shapes and records every body it receives, so a test
can assert what the model would have been sent. The gate is a keyword stub. The tokenizer and the
embedding table are the real ones of the prepared default model.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import httpx

from corruption.spec import CorruptionSpec

STUB_MODEL = "gemma-3-270m"
CONTEXT = 2048
FORGET_WORDS = ("hogwarts", "hermione", "harry potter", "dumbledore", "voldemort")


class KeywordGate:
    """Scores 1.0 when a target word occurs in any segment: a stand-in for the trained classifier."""

    def score_segments(self, segments: list[str], stop_above: float | None = None) -> float:
        return float(any(word in segment.lower() for segment in segments for word in FORGET_WORDS))


@dataclass
class RecordingUpstream:
    """An ASGI app in vLLM's shapes that keeps each request it gets (path, parsed JSON body)."""

    received: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        path = scope["path"]
        if scope["method"] == "GET" and path == "/v1/models":
            await _send_json(send, 200, {"object": "list", "data": [{
                "id": STUB_MODEL, "object": "model", "created": 0, "owned_by": "vllm",
                "root": "/secret/models/path", "parent": None, "max_model_len": CONTEXT}]})
            return
        request = json.loads(body)
        self.received.append((path, request))
        chat = path.endswith("/chat/completions")
        if request.get("stream"):
            await _send_stream(send, _stream_events(request, chat))
        else:
            await _send_json(send, 200, _answer(request, chat))


def _prompt_ids(request: dict[str, Any]) -> list[int] | None:
    if not request.get("return_token_ids"):
        return None
    return [0, 0, 0] if "prompt_embeds" in request else [2, 100, 200]


def _answer(request: dict[str, Any], chat: bool) -> dict[str, Any]:
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    if chat:
        return {"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": STUB_MODEL,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": " stub"}, "logprobs": None,
                             "finish_reason": "length", "stop_reason": None, "token_ids": None}],
                "usage": usage, "prompt_token_ids": _prompt_ids(request)}
    prompts = request.get("prompt_embeds")
    count = len(prompts) if isinstance(prompts, list) else 1
    return {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": STUB_MODEL,
            "choices": [{"index": i, "text": " stub", "logprobs": None, "finish_reason": "length",
                         "stop_reason": None, "prompt_token_ids": _prompt_ids(request), "token_ids": None}
                        for i in range(count * (request.get("n") or 1))],
            "usage": usage}


def _stream_events(request: dict[str, Any], chat: bool) -> list[dict[str, Any]]:
    head = {"id": "chatcmpl-1" if chat else "cmpl-1", "object": "chat.completion.chunk" if chat else "text_completion",
            "created": 0, "model": STUB_MODEL}
    usage = {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
    continuous = (request.get("stream_options") or {}).get("continuous_usage_stats")
    if chat:
        choices = [{"index": 0, "delta": {"role": "assistant", "content": ""}},
                   {"index": 0, "delta": {"content": " stub"}, "finish_reason": "length"}]
    else:
        choices = [{"index": 0, "text": " st", "finish_reason": None, "prompt_token_ids": _prompt_ids(request)},
                   {"index": 0, "text": "ub", "finish_reason": "length"}]
    events = [{**head, "choices": [choice], **({"usage": usage} if continuous else {})} for choice in choices]
    if (request.get("stream_options") or {}).get("include_usage"):
        events.append({**head, "choices": [], "usage": usage})
    return events


async def _send_json(send: Any, status: int, payload: dict[str, Any]) -> None:
    data = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


async def _send_stream(send: Any, events: list[dict[str, Any]]) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
    for event in events:
        await send({"type": "http.response.body", "body": b"data: " + json.dumps(event).encode() + b"\n\n",
                    "more_body": True})
    await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})


@lru_cache(maxsize=2)
def _model_parts(model_dir: Path) -> tuple[Any, Any]:
    from transformers import AutoTokenizer

    from corruption.embeddings import EmbeddingTable

    return AutoTokenizer.from_pretrained(model_dir), EmbeddingTable.from_model_dir(model_dir)


def build_app(model_dir: Path, upstream: RecordingUpstream, headers: str = "full", **state_options: Any):
    """The real app and request path, with the stub gate and the recording upstream."""
    from classifier.encoder import EncoderPool
    from proxy.app import ProxyState, create_app
    from proxy.guard import Guard
    from proxy.observability import AuditLog, Metrics
    from proxy.policy import ActivePolicy, ActiveTarget
    from proxy.prompts import PromptBuilder
    from vllm_client import AsyncVllmClient

    tokenizer, embeddings = _model_parts(model_dir)
    target = ActiveTarget("harry_potter", KeywordGate(), 0.5,
                          CorruptionSpec(method="gaussian_first_n", dims=embeddings.hidden_size, sigma=1.0),
                          ("Hermione",), "closed")
    policy = ActivePolicy("stub-1", (target,), False, Path("policy.yaml"), headers)
    metrics, audit = Metrics(), AuditLog(None)
    state = ProxyState(
        policy=policy, policy_path="policy.yaml", served_model_name=STUB_MODEL,
        builder=PromptBuilder(tokenizer),
        guard=Guard(embeddings, b"test-key", metrics, audit),
        upstream=AsyncVllmClient("http://upstream", transport=httpx.ASGITransport(app=upstream)),
        metrics=metrics, audit=audit, encoders=EncoderPool(0), **state_options)
    return create_app(state)
