"""Chat over the completions route: request and response translation (pure logic)."""
from __future__ import annotations

import pytest

from proxy.protocol import ChatCompletionRequest
from proxy.tool_calls import ForcedToolCalls
from proxy.translate import ChatStreamTranslator, chat_request_as_completion, completion_as_chat

pytestmark = pytest.mark.unit

COMPLETION = {
    "id": "cmpl-abc", "object": "text_completion", "created": 7, "model": "m",
    "choices": [{"index": 0, "text": " Hermione", "finish_reason": "length", "stop_reason": None,
                 "logprobs": {"tokens": [" Her", "mione"], "token_logprobs": [-0.5, -0.1],
                              "top_logprobs": [{" Her": -0.5, " Ron": -1.0}, {"mione": -0.1}],
                              "text_offset": [0, 4]}}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
    "system_fingerprint": "fp",
}


def test_request_drops_chat_fields_and_unknown_ones_and_keeps_sampling():
    chat = ChatCompletionRequest.model_validate({
        "model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 0.3, "seed": 5,
        "max_completion_tokens": 9, "logprobs": True, "top_logprobs": 2, "stop": ["\n"], "stream": True,
        "stream_options": {"include_usage": True}, "some_vendor_field": 1, "prompt": "raw text"})
    body = chat_request_as_completion(chat, prompt_tokens=10, max_model_len=100)
    assert body == {"model": "m", "temperature": 0.3, "seed": 5, "stop": ["\n"], "stream": True,
                    "stream_options": {"include_usage": True}, "max_tokens": 9, "logprobs": 2}


def test_request_default_length_is_the_rest_of_the_context_and_zero_stays_zero():
    chat = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    body = chat_request_as_completion(ChatCompletionRequest.model_validate(chat), prompt_tokens=30, max_model_len=100)
    assert body["max_tokens"] == 70 and "logprobs" not in body
    zero = ChatCompletionRequest.model_validate({**chat, "max_completion_tokens": 0, "max_tokens": 5})
    assert chat_request_as_completion(zero, prompt_tokens=30, max_model_len=100)["max_tokens"] == 0


def test_response_in_chat_shape():
    chat = completion_as_chat(COMPLETION)
    assert chat["id"] == "chatcmpl-abc" and chat["object"] == "chat.completion"
    choice = chat["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"] == " Hermione"
    assert choice["finish_reason"] == "length" and chat["usage"] == COMPLETION["usage"]
    first = choice["logprobs"]["content"][0]
    assert first["token"] == " Her" and first["logprob"] == -0.5 and first["bytes"] == list(b" Her")
    assert [t["token"] for t in first["top_logprobs"]] == [" Her", " Ron"]


def test_stream_role_first_then_content_then_usage():
    translator = ChatStreamTranslator()
    head = {"id": "cmpl-s", "object": "text_completion", "created": 1, "model": "m"}
    out = translator.translate({**head, "choices": [{"index": 0, "text": "Hi", "finish_reason": None}]})
    out += translator.translate({**head, "choices": [{"index": 0, "text": "!", "finish_reason": "stop",
                                                      "stop_reason": None}]})
    out += translator.translate({**head, "choices": [], "usage": {"completion_tokens": 2}})
    assert [c["object"] for c in out] == ["chat.completion.chunk"] * 4
    assert out[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["delta"]["content"] for c in out[1:3]] == ["Hi", "!"]
    assert out[2]["choices"][0]["finish_reason"] == "stop"
    assert out[3]["choices"] == [] and out[3]["usage"] == {"completion_tokens": 2}
    assert all(c["id"] == "chatcmpl-s" for c in out)


def test_echo_prefix_comes_first():
    assert completion_as_chat(COMPLETION, echo_prefix="Sure:")["choices"][0]["message"]["content"] == \
        "Sure: Hermione"
    translator = ChatStreamTranslator(echo_prefix="Sure:")
    out = translator.translate({"id": "cmpl-s", "created": 1, "model": "m",
                                "choices": [{"index": 0, "text": " Hi", "finish_reason": None}]})
    assert [c["choices"][0]["delta"].get("content") for c in out] == ["", "Sure:", " Hi"]


def _forced(tool_choice) -> ForcedToolCalls:
    return ForcedToolCalls.of(ChatCompletionRequest.model_validate({
        "model": "m", "messages": [{"role": "user", "content": "x"}], "tool_choice": tool_choice,
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]}))


def test_a_forced_call_is_a_tool_call_not_content():
    completion = {**COMPLETION, "choices": [{"index": 0, "text": '[{"name": "f", "parameters": {"a": 1}}]',
                                             "finish_reason": "stop", "stop_reason": None}]}
    message = completion_as_chat(completion, forced=_forced("required"))["choices"][0]["message"]
    assert list(message) == ["role", "content", "refusal", "annotations", "audio", "function_call", "tool_calls",
                             "reasoning"]  # vLLM's order
    assert message["content"] == "" and message["tool_calls"][0]["function"] == {"name": "f", "arguments": '{"a": 1}'}
    assert completion_as_chat(completion, forced=_forced("required"))["choices"][0]["finish_reason"] == "tool_calls"
    cut = {**COMPLETION, "choices": [{"index": 0, "text": '[{"name": "f", "param', "finish_reason": "length"}]}
    message = completion_as_chat(cut, forced=_forced("required"))["choices"][0]["message"]
    assert "tool_calls" not in message and message["content"] == ""  # no call: the key is left out, as vLLM does


@pytest.mark.parametrize("token_ids", [False, True])
def test_stream_events_without_a_new_call_part_are_left_out_unless_they_carry_ids(token_ids):
    translator = ChatStreamTranslator(forced=_forced("required"), token_ids=token_ids)
    head = {"id": "cmpl-s", "object": "text_completion", "created": 1, "model": "m"}
    texts = ['[{"na', 'me": "f", "parameters": {', '"a": 1}}', "]"]
    out = []
    for number, text in enumerate(texts):
        finish = "stop" if number == len(texts) - 1 else None
        out += translator.translate({**head, "choices": [{"index": 0, "text": text, "finish_reason": finish,
                                                          "token_ids": [number] if token_ids else None}]})
    deltas = [c["choices"][0]["delta"] for c in out[1:]]
    calls = [d["tool_calls"] for d in deltas if "tool_calls" in d]
    assert calls[0][0]["function"] == {"name": "f", "arguments": "{"} and calls[1][0]["function"]["arguments"] == '"a": 1}'
    assert len(deltas) == (4 if token_ids else 3)  # the first event showed no call yet
    assert out[-1]["choices"][0]["finish_reason"] == "tool_calls" and deltas[-1] == {}
