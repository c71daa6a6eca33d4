"""Carry a chat request over the completions route, and its answer back in chat shape.

A flagged chat is rendered with the chat template by the proxy and sent to vLLM's
`/v1/completions` as `prompt_embeds` (that route reproduces the text chat exactly; vLLM's
chat content part for embeddings does not). The client still gets a `chat.completion`
(or `chat.completion.chunk` stream) with the same fields vLLM's chat endpoint returns.
"""
from __future__ import annotations

from typing import Any

from proxy.protocol import ChatCompletionRequest
from proxy.tool_calls import ForcedToolCalls, ToolCallStream

# Chat parameters with no completions counterpart (spent on the prompt or on the chat shape), and the
# chat names of the output limit and log-probabilities, which completions spells otherwise.
_CHAT_ONLY_FIELDS = {
    "max_completion_tokens", "max_tokens", "logprobs", "top_logprobs", "tool_choice", "parallel_tool_calls",
    "include_reasoning", "reasoning_effort", "echo", "return_prompt_text",
}


def chat_request_as_completion(request: ChatCompletionRequest, prompt_tokens: int, max_model_len: int,
                               forced: ForcedToolCalls | None = None) -> dict[str, Any]:
    """The completions body for a flagged chat request, all but its `prompt_embeds`: its forwarded
    parameters only, as parsed (never the client's raw JSON). A forced tool call holds the output to its
    schema instead of any format the request asked for, as vLLM's chat endpoint does."""
    body = {k: v for k, v in request.upstream_fields(include_classified=False).items() if k not in _CHAT_ONLY_FIELDS}
    if forced is not None:
        body.pop("response_format", None)
        body["structured_outputs"] = {"json": forced.schema}
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
                       prompt_text: str | None = None, forced: ForcedToolCalls | None = None) -> dict[str, Any]:
    choices = []
    for choice in completion["choices"]:
        # A forced call's output is its arguments, never content; the message has `tool_calls` only when
        # there are some (vLLM leaves an empty list out).
        calls = forced.calls(choice["text"]) if forced is not None else []
        message: dict[str, Any] = {
            "role": "assistant",
            "content": echo_prefix + ("" if forced is not None else choice["text"]),
            "refusal": None,
            "annotations": None,
            "audio": None,
            "function_call": None,
            **({"tool_calls": calls} if calls else {}),
            "reasoning": None,
        }
        finish = choice.get("finish_reason")
        choices.append({
            "index": choice["index"],
            "message": message,
            "logprobs": _chat_logprobs(choice.get("logprobs")),
            "finish_reason": forced.finish_reason(finish, called=True) if forced is not None else finish,
            "stop_reason": choice.get("stop_reason"),
            "token_ids": choice.get("token_ids"),
            "routed_experts": choice.get("routed_experts"),
        })
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
    for, and zero usage when usage is reported on every chunk), then one chunk per event. With a
    forced tool call an event's text becomes tool-call deltas, and an event that adds none is left
    out unless it ends the choice or carries log-probabilities or token ids."""

    def __init__(self, echo_prefix: str = "", prompt_token_ids: list[int] | None = None,
                 prompt_text: str | None = None, continuous_usage: bool = False,
                 forced: ForcedToolCalls | None = None, token_ids: bool = False):
        self._started: set[int] = set()
        self._echo_prefix = echo_prefix
        self._prompt_token_ids = prompt_token_ids
        self._prompt_text = prompt_text
        self._continuous_usage = continuous_usage
        self._forced = forced
        self._token_ids = token_ids
        self._calls: dict[int, ToolCallStream] = {}

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
                    out.append(self._content_chunk(head, index, {"content": self._echo_prefix}, {}, None))
            finish = choice.get("finish_reason")
            if self._forced is None:
                delta: dict[str, Any] | None = {"content": choice["text"]}
            else:
                delta, finish = self._tool_call_delta(index, choice)
            if delta is not None:
                out.append({**self._content_chunk(head, index, delta, choice, finish), **usage})
        return out

    def _tool_call_delta(self, index: int, choice: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
        """The delta for this event (None: no chunk) and its finish reason."""
        assert self._forced is not None
        if index not in self._calls:
            self._calls[index] = self._forced.stream()
        calls = self._calls[index]
        deltas = calls.feed(choice["text"])
        finish = choice.get("finish_reason")
        if deltas is None and finish is None and not choice.get("logprobs") and not self._token_ids:
            return None, None
        finish = None if finish is None else self._forced.finish_reason(finish, calls.called)
        return ({"tool_calls": deltas} if deltas else {}), finish

    @staticmethod
    def _content_chunk(head: dict[str, Any], index: int, delta: dict[str, Any], choice: dict[str, Any],
                       finish: str | None) -> dict[str, Any]:
        entry: dict[str, Any] = {"index": index, "delta": delta,
                                 "logprobs": _chat_logprobs(choice.get("logprobs")), "finish_reason": finish}
        if finish is not None:
            entry["stop_reason"] = choice.get("stop_reason")
        entry["token_ids"] = choice.get("token_ids")
        return {**head, "choices": [entry]}
