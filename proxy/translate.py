"""Carry a chat request over the completions route, and its answer back in chat shape.

A flagged chat is rendered with the chat template by the proxy and sent to vLLM's
`/v1/completions` as `prompt_embeds` (that route reproduces the text chat exactly; vLLM's
chat content part for embeddings does not). The client still gets a `chat.completion`
(or `chat.completion.chunk` stream) with the same fields vLLM's chat endpoint returns.
"""
from __future__ import annotations

from typing import Any

# Chat fields that are spent on rendering the prompt or that have another name on /v1/completions.
_CHAT_ONLY_FIELDS = {
    "messages", "tools", "tool_choice", "parallel_tool_calls", "documents", "chat_template",
    "chat_template_kwargs", "add_generation_prompt", "continue_final_message", "add_special_tokens",
    "echo", "logprobs", "top_logprobs", "max_completion_tokens", "max_tokens", "reasoning_effort",
    "thinking_token_budget", "include_reasoning", "media_io_kwargs", "mm_processor_kwargs",
    "return_prompt_text", "prompt_embeds",
}


def chat_body_as_completion(chat: dict[str, Any], prompt_tokens: int, max_model_len: int) -> dict[str, Any]:
    """The completions body for a chat request, all but its `prompt_embeds`."""
    body = {k: v for k, v in chat.items() if k not in _CHAT_ONLY_FIELDS}
    limit = chat.get("max_completion_tokens") or chat.get("max_tokens")
    # Chat's default is "up to the context length"; completions' would be 16 tokens.
    body["max_tokens"] = limit if limit is not None else max(max_model_len - prompt_tokens, 1)
    if chat.get("logprobs"):
        body["logprobs"] = chat.get("top_logprobs") or 0
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


def completion_as_chat(completion: dict[str, Any], echo_prefix: str = "") -> dict[str, Any]:
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
        "prompt_token_ids": None,
        "prompt_text": None,
        "kv_transfer_params": completion.get("kv_transfer_params"),
        "ec_transfer_params": completion.get("ec_transfer_params"),
        "metrics": completion.get("metrics"),
    }


class ChatStreamTranslator:
    """Turns `text_completion` stream events into `chat.completion.chunk` events."""

    def __init__(self, echo_prefix: str = ""):
        self._started: set[int] = set()
        self._echo_prefix = echo_prefix

    def translate(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        head = {"id": chat_id(event["id"]), "object": "chat.completion.chunk",
                "created": event["created"], "model": event["model"]}
        if not event["choices"]:  # the usage chunk
            return [{**head, "choices": [], **{k: event[k] for k in ("usage", "system_fingerprint") if k in event}}]
        out = []
        for choice in event["choices"]:
            index = choice["index"]
            if index not in self._started:
                self._started.add(index)
                out.append({**head, "choices": [{"index": index, "delta": {"role": "assistant", "content": ""},
                                                 "logprobs": None, "finish_reason": None}],
                            "prompt_token_ids": None, "prompt_text": None})
                if self._echo_prefix:
                    out.append(self._content_chunk(head, index, self._echo_prefix, {}))
            out.append(self._content_chunk(head, index, choice["text"], choice))
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
