"""ECHO UPSTREAM, NOT A MODEL: a minimal vLLM-shaped server for measuring the proxy alone.

It answers /v1/models, /v1/completions and /v1/chat/completions (plain JSON and SSE
streaming) with fixed bodies in vLLM's shape, whatever the request says; request bodies
(including `prompt_embeds`) are read and discarded. Every answer says it is an echo: the
text, the `owned_by` and `system_fingerprint` fields and an `x-echo-upstream` header.

    python benchmarks/echo_upstream.py --port 8199
"""
from __future__ import annotations

import argparse
import json
from typing import Any

import uvicorn

ECHO_TEXT = " [echo upstream: not a model]"
ECHO_MARK = "echo-upstream-not-a-model"
STREAM_CHUNKS = 4


def _json(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode()


class EchoUpstream:
    """A raw ASGI app (no framework), so that the echo costs as little CPU as possible."""

    def __init__(self, model: str, max_model_len: int):
        self.models = _json({"object": "list", "data": [{
            "id": model, "object": "model", "created": 0, "owned_by": ECHO_MARK, "root": ECHO_MARK,
            "parent": None, "max_model_len": max_model_len}]})
        usage = {"prompt_tokens": 1, "completion_tokens": STREAM_CHUNKS, "total_tokens": 1 + STREAM_CHUNKS}
        self.completion = _json({
            "id": "cmpl-echo", "object": "text_completion", "created": 0, "model": model,
            "system_fingerprint": ECHO_MARK, "usage": usage,
            "choices": [{"index": 0, "text": ECHO_TEXT, "logprobs": None, "finish_reason": "length",
                         "stop_reason": None}]})
        self.chat = _json({
            "id": "chatcmpl-echo", "object": "chat.completion", "created": 0, "model": model,
            "system_fingerprint": ECHO_MARK, "usage": usage,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": ECHO_TEXT},
                         "logprobs": None, "finish_reason": "length", "stop_reason": None}]})
        self.completion_stream = self._stream(model, chat=False)
        self.chat_stream = self._stream(model, chat=True)

    @staticmethod
    def _stream(model: str, chat: bool) -> list[bytes]:
        size = -(-len(ECHO_TEXT) // STREAM_CHUNKS)
        pieces = [ECHO_TEXT[i:i + size] for i in range(0, len(ECHO_TEXT), size)]  # joined, they read ECHO_TEXT
        events = []
        for i, piece in enumerate(pieces):
            last = i == len(pieces) - 1
            if chat:
                delta = {"role": "assistant", "content": piece} if i == 0 else {"content": piece}
                choice = {"index": 0, "delta": delta, "logprobs": None,
                          "finish_reason": "length" if last else None}
                event = {"id": "chatcmpl-echo", "object": "chat.completion.chunk", "created": 0, "model": model,
                         "system_fingerprint": ECHO_MARK, "choices": [choice]}
            else:
                choice = {"index": 0, "text": piece, "logprobs": None, "finish_reason": "length" if last else None}
                event = {"id": "cmpl-echo", "object": "text_completion", "created": 0, "model": model,
                         "system_fingerprint": ECHO_MARK, "choices": [choice]}
            events.append(b"data: " + _json(event) + b"\n\n")
        events.append(b"data: [DONE]\n\n")
        return events

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:  # read (and drop) the whole request body
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        path, method = scope["path"], scope["method"]
        if method == "GET" and path == "/v1/models":
            await self._send(send, 200, self.models)
        elif method == "POST" and path in ("/v1/completions", "/v1/chat/completions"):
            chat = path.endswith("chat/completions")
            if _wants_stream(body):
                await self._send_stream(send, self.chat_stream if chat else self.completion_stream)
            else:
                await self._send(send, 200, self.chat if chat else self.completion)
        elif method == "GET" and path == "/health":
            await self._send(send, 200, b"{}")
        else:
            await self._send(send, 404, _json({"error": {"message": f"echo upstream has no {method} {path}"}}))

    @staticmethod
    async def _send(send: Any, status: int, payload: bytes) -> None:
        await send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
            (b"x-echo-upstream", b"not-a-model")]})
        await send({"type": "http.response.body", "body": payload})

    @staticmethod
    async def _send_stream(send: Any, events: list[bytes]) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream"), (b"x-echo-upstream", b"not-a-model")]})
        for event in events:
            await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "body": b""})


def _wants_stream(body: bytes) -> bool:
    try:
        request = json.loads(body)
    except ValueError:
        return False
    return isinstance(request, dict) and bool(request.get("stream"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8199)
    parser.add_argument("--model", default="gemma-3-270m", help="the model name it claims to serve")
    parser.add_argument("--max-model-len", type=int, default=2048)
    args = parser.parse_args()
    print(f"ECHO UPSTREAM (not a model) on http://{args.host}:{args.port}", flush=True)
    uvicorn.run(EchoUpstream(args.model, args.max_model_len), host=args.host, port=args.port,
                log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
