"""Carry a chat request over the completions route, and its answer back in chat shape.

A flagged chat is rendered with the chat template by the proxy and sent to vLLM's
`/v1/completions` as `prompt_embeds` (that route reproduces the text chat exactly; vLLM's
chat content part for embeddings does not). The client still gets a `chat.completion`
(or `chat.completion.chunk` stream) with the same fields vLLM's chat endpoint returns.
"""
from __future__ import annotations

from typing import Any

from proxy.protocol import ChatCompletionRequest

# Chat parameters with no completions counterpart (spent on the prompt or on the chat shape), and the
# chat names of the output limit and log-probabilities, which completions spells otherwise.
_CHAT_ONLY_FIELDS = {
    "max_completion_tokens", "max_tokens", "logprobs", "top_logprobs", "tool_choice", "parallel_tool_calls",
    "include_reasoning", "reasoning_effort", "echo", "return_prompt_text",
}


def chat_request_as_completion(request: ChatCompletionRequest, prompt_tokens: int, max_model_len: int) -> dict[str, Any]:
    """The completions body for a flagged chat request, all but its `prompt_embeds`: its forwarded
    parameters only, as parsed (never the client's raw JSON)."""
    body = {k: v for k, v in request.upstream_fields(include_classified=False).items() if k not in _CHAT_ONLY_FIELDS}
    limit = request.output_limit
    # Chat's default is "up to the context length"; completions' would be 16 tokens.
    body["max_tokens"] = limit if limit is not None else max(max_model_len - prompt_tokens, 1)
    if request.logprobs:
        body["logprobs"] = request.top_logprobs or 0
    return body


def chat_id(completion_id: str) -> str:
    return "chatcmpl-" + completion_id.removeprefix("cmpl-")


def _chat_logprobs(logprobs: dict[str, Any] | None) -> dict[str, Any] | None:
    if not logprobs:
        return None
    content = []
    tops = logprobs.get("top_logprobs") or [None] * len(logprobs["tokens"])
    for token, logprob, top in zip(logprobs["tokens"], logprobs["token_logprobs"], tops):
        content.append({
            "token": token,
            "logprob": logprob,
            "bytes": list(token.encode("utf-8")),
            "top_logprobs": [
                {"token": t, "logprob": lp, "bytes": list(t.encode("utf-8"))} for t, lp in (top or {}).items()
            ],
        })
    return {"content": content}


def completion_as_chat(completion: dict[str, Any], echo_prefix: str = "", prompt_token_ids: list[int] | None = None,
                       prompt_text: str | None = None) -> dict[str, Any]:
    choices = [
        {
            "index": choice["index"],
            "message": {
                "role": "assistant",
                "content": echo_prefix + choice["text"],
                "refusal": None,
                "annotations": None,
                "audio": None,
                "function_call": None,
                "reasoning": None,
            },
            "logprobs": _chat_logprobs(choice.get("logprobs")),
            "finish_reason": choice.get("finish_reason"),
            "stop_reason": choice.get("stop_reason"),
            "token_ids": choice.get("token_ids"),
            "routed_experts": choice.get("routed_experts"),
        }
        for choice in completion["choices"]
    ]
    return {
        "id": chat_id(completion["id"]),
        "object": "chat.completion",
        "created": completion["created"],
        "model": completion["model"],
        "choices": choices,
        "service_tier": completion.get("service_tier"),
        "system_fingerprint": completion.get("system_fingerprint"),
        "usage": completion.get("usage"),
        "prompt_logprobs": None,
        "prompt_token_ids": prompt_token_ids,
        "prompt_text": prompt_text,
        "kv_transfer_params": completion.get("kv_transfer_params"),
        "ec_transfer_params": completion.get("ec_transfer_params"),
        "metrics": completion.get("metrics"),
    }


class ChatStreamTranslator:
    """Turns `text_completion` stream events into `chat.completion.chunk` events, as vLLM's chat
    endpoint writes them: a role chunk first (carrying the prompt's token ids and text when asked
    for, and zero usage when usage is reported on every chunk), then one chunk per event."""

    def __init__(self, echo_prefix: str = "", prompt_token_ids: list[int] | None = None,
                 prompt_text: str | None = None, continuous_usage: bool = False):
        self._started: set[int] = set()
        self._echo_prefix = echo_prefix
        self._prompt_token_ids = prompt_token_ids
        self._prompt_text = prompt_text
        self._continuous_usage = continuous_usage

    def translate(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        head = {"id": chat_id(event["id"]), "object": "chat.completion.chunk",
                "created": event["created"], "model": event["model"]}
        if not event["choices"]:  # the usage chunk
            return [{**head, "choices": [], **{k: event[k] for k in ("usage", "system_fingerprint") if k in event}}]
        usage = {"usage": event["usage"]} if event.get("usage") is not None else {}
        out = []
        for choice in event["choices"]:
            index = choice["index"]
            if index not in self._started:
                self._started.add(index)
                role = {**head, "choices": [{"index": index, "delta": {"role": "assistant", "content": ""},
                                             "logprobs": None, "finish_reason": None}],
                        "prompt_token_ids": self._prompt_token_ids, "prompt_text": self._prompt_text}
                if self._continuous_usage and usage:
                    prompt_tokens = usage["usage"]["prompt_tokens"]
                    role["usage"] = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens,
                                     "completion_tokens": 0, "prompt_tokens_details": None}
                out.append(role)
                if self._echo_prefix:
                    out.append(self._content_chunk(head, index, self._echo_prefix, {}))
            out.append({**self._content_chunk(head, index, choice["text"], choice), **usage})
        return out

    @staticmethod
    def _content_chunk(head: dict[str, Any], index: int, text: str, choice: dict[str, Any]) -> dict[str, Any]:
        finish = choice.get("finish_reason")
        entry: dict[str, Any] = {"index": index, "delta": {"content": text},
                                 "logprobs": _chat_logprobs(choice.get("logprobs")), "finish_reason": finish}
        if finish is not None:
            entry["stop_reason"] = choice.get("stop_reason")
        entry["token_ids"] = choice.get("token_ids")
        return {**head, "choices": [entry]}
