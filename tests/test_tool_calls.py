"""Forced tool calls as the flagged path makes them, held against vLLM 0.32's own functions (the schema its
chat endpoint constrains with, its reading of the answer, its stream deltas), and the refusals decided before
the gate (pure logic)."""
from __future__ import annotations

import asyncio
import json
import random

import pytest

from proxy.protocol import ChatCompletionRequest
from proxy.tool_calls import ForcedToolCalls, probe, tool_choice_refusal
from vllm_client import Reply

pytestmark = pytest.mark.unit

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                            "parameters": {"type": "object", "properties": {"city": {"$ref": "#/$defs/c"}},
                                                           "required": ["city"], "$defs": {"c": {"type": "string"}}}}}
TIME = {"type": "function", "function": {"name": "get_time"}}
NAMED = {"type": "function", "function": {"name": "get_weather"}}


def _request(tool_choice="required", tools=(WEATHER, TIME), **extra) -> ChatCompletionRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": list(tools), **extra}
    if tool_choice is not ...:
        body["tool_choice"] = tool_choice
    return ChatCompletionRequest.model_validate(body)


def _vllm_request(request: ChatCompletionRequest):
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest as VllmRequest

    return VllmRequest.model_validate(request.model_dump(exclude_unset=True))


@pytest.mark.parametrize("tool_choice,parallel", [("required", None), ("required", False), (NAMED, None),
                                                  ({"type": "function", "function": {"name": "get_time"}}, None)])
def test_the_schema_is_the_one_vllm_constrains_with(tool_choice, parallel):
    from vllm.tool_parsers.utils import get_json_schema_from_tools

    request = _request(tool_choice, parallel_tool_calls=parallel)
    vllm = _vllm_request(request)
    expected = get_json_schema_from_tools(vllm.tool_choice, vllm.tools, vllm.parallel_tool_calls)
    assert ForcedToolCalls.of(request).schema == expected


def test_no_schema_unless_a_call_is_forced():
    assert ForcedToolCalls.of(_request("none")) is None and ForcedToolCalls.of(_request("auto")) is None


REQUIRED_ANSWERS = [
    '[{"name": "get_weather", "parameters": {"city": "Paris"}}]',
    '[\n  {"name": "get_weather", "parameters": {"city": "Zürich"}},\n  {"name": "get_time", "parameters": {}}\n]',
    '[{"name": "get_time", "parameters": null, "extra": 1}]',
    '[{"name": "get_weather", "parameters": {"city": "Par',  # cut off by max_tokens
    '[{"name": 5, "parameters": {}}]',
    '[]', '', 'not json', '{"name": "get_time", "parameters": {}}',
]


@pytest.mark.parametrize("text", REQUIRED_ANSWERS)
def test_a_whole_required_answer_is_read_as_vllm_reads_it(text):
    from vllm.parser.abstract_parser import DelegatingParser
    from vllm.tool_parsers.pythonic_tool_parser import PythonicToolParser

    class Parser(DelegatingParser):
        tool_parser_cls = PythonicToolParser
        reasoning_parser_cls = None

    request = _request("required")
    _, _, expected = Parser(_Tokenizer(), tools=_vllm_request(request).tools).parse(
        text, _vllm_request(request), enable_auto_tools=True)
    calls = ForcedToolCalls.of(request).calls(text)
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == \
        [(c.name, c.arguments) for c in expected]
    assert all(c["id"].startswith("chatcmpl-tool-") and len(c["id"]) == 30 and c["type"] == "function" for c in calls)


def test_a_named_call_holds_the_text_as_its_arguments_unless_blank():
    forced = ForcedToolCalls.of(_request(NAMED))
    [call] = forced.calls('{"city": "Paris"')
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"'}
    assert forced.calls("  \n") == []


def test_parallel_calls_off_keeps_the_first_call():
    forced = ForcedToolCalls.of(_request("required", parallel_tool_calls=False))
    assert len(forced.calls(REQUIRED_ANSWERS[1])) == 1


def test_finish_reason_follows_openai_as_vllm_does():
    required, named = ForcedToolCalls.of(_request("required")), ForcedToolCalls.of(_request(NAMED))
    assert required.finish_reason("stop", called=True) == "tool_calls"
    assert required.finish_reason("stop", called=False) == "stop"  # streamed: no call was announced
    assert required.finish_reason("length", called=True) == "length"
    assert named.finish_reason("stop", called=True) == "stop"


def _pieces(text: str, seed: int) -> list[str]:
    rng, cuts, position = random.Random(seed), [], 0
    while position < len(text):
        step = rng.randint(1, 6)
        cuts.append(text[position:position + step])
        position += step
    return cuts


def _strip_ids(deltas):
    return [{k: v for k, v in d.items() if k != "id"} | {"has_id": "id" in d} for d in deltas or []]


@pytest.mark.parametrize("text", REQUIRED_ANSWERS[:5] + [
    '[{"parameters": {"a": [1, {"b": "}]"}]}, "name": "get_time"}, {"name": "get_weather", "parameters": 7}]',
    '[{"name": "get\\"x", "parameters": "s,t"}, {"name": "get_time", "parameters": {}}] trailing',
])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_required_stream_deltas_are_vllms(text, seed):
    from vllm.tool_parsers.streaming import extract_required_tool_call_streaming

    stream = ForcedToolCalls.of(_request("required")).stream()
    previous = ""
    for piece in _pieces(text, seed):
        expected, _ = extract_required_tool_call_streaming(previous_text=previous, current_text=previous + piece,
                                                           tool_call_idx=None, tool_call_id_type="random")
        previous += piece
        ours = stream.feed(piece)
        theirs = None if expected is None else [tc.model_dump(exclude_unset=True) for tc in expected.tool_calls]
        assert _strip_ids(ours) == _strip_ids(theirs), (previous, ours, theirs)


def test_named_stream_announces_once_then_sends_the_new_text():
    stream = ForcedToolCalls.of(_request(NAMED)).stream()
    first, second, last = stream.feed('{"ci'), stream.feed('ty": 1}'), stream.feed("")
    assert first == [{"id": first[0]["id"], "type": "function", "index": 0,
                      "function": {"name": "get_weather", "arguments": '{"ci'}}]
    assert second == [{"index": 0, "function": {"arguments": 'ty": 1}'}}]
    assert last == [{"index": 0, "function": {"arguments": ""}}] and stream.called


# --- what a request may ask, decided before the gate --------------------------------------------

@pytest.mark.parametrize("tool_choice,expected", [
    ("auto", '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set'),
    (..., '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set'),
    ("required", 'tool_choice="required" requires --tool-call-parser to be set'),
    (NAMED, 'tool_choice=function "get_weather" requires --tool-call-parser to be set'),
    ("none", None), (None, None),
])
def test_without_a_parser_the_refusals_are_vllms_own(tool_choice, expected):
    refusal = tool_choice_refusal(_request(tool_choice), "unavailable")
    assert refusal == (None if expected is None else (expected, None))


@pytest.mark.parametrize("tool_choice,backend,param", [
    ("auto", "json", "tool_choice"), (..., "json", "tool_choice"), (None, "json", "tool_choice"),
    ("required", "other", "tool_choice"), (NAMED, "other", "tool_choice"),
    ("required", "json", None), (NAMED, "json", None), ("none", "json", None), ("none", "other", None),
])
def test_with_a_parser_what_cannot_be_read_back_is_refused(tool_choice, backend, param):
    refusal = tool_choice_refusal(_request(tool_choice), backend)
    assert (refusal[1] if refusal else None) == param


def test_tools_whose_shared_definitions_clash_are_refused_for_required():
    other = {"type": "function", "function": {"name": "g", "parameters": {"$defs": {"c": {"type": "integer"}}}}}
    message, param = tool_choice_refusal(_request("required", tools=(WEATHER, other)), "json")
    assert param == "tools" and "'c' has multiple schemas" in message
    assert tool_choice_refusal(_request(NAMED, tools=(WEATHER, other)), "json") is None


# --- the probe ------------------------------------------------------------------------------------

class _Upstream:
    def __init__(self, status: int, body):
        self.reply, self.sent = Reply(status, body, {}), []

    async def request_json(self, method, path, body=None):
        self.sent.append((method, path, body))
        return self.reply


@pytest.mark.parametrize("status,body,expected", [
    (400, {"error": {"message": 'tool_choice=function "eco_probe" requires --tool-call-parser to be set'}},
     "unavailable"),
    (200, {"choices": [{"message": {"content": "", "tool_calls": [
        {"id": "chatcmpl-tool-1", "type": "function", "function": {"name": "eco_probe", "arguments": "{"}}]}}]},
     "json"),
    (200, {"choices": [{"message": {"content": "<tool_call>"}}]}, "other"),
    (400, {"error": {"message": "something else"}}, "other"),
    (200, "not json", "other"),
])
def test_the_probe_reads_what_the_backend_does(status, body, expected):
    upstream = _Upstream(status, body)
    assert asyncio.run(probe(upstream, "m")) == expected
    [(method, path, sent)] = upstream.sent
    assert path == "/v1/chat/completions" and sent["max_tokens"] == 1
    assert sent["tool_choice"]["function"]["name"] == sent["tools"][0]["function"]["name"]


class _Tokenizer:
    """Enough of a tokenizer for vLLM's parser classes to be built around."""

    def get_vocab(self):
        return {}

    def __len__(self):
        return 0


def test_the_rendered_tools_are_what_vllm_hands_the_template():
    tools = [WEATHER, {"function": {"name": "g", "strict": False, "vendor": 1}},
             {"type": "function", "function": {"name": "h", "description": "d"}, "defer_loading": True},
             {"type": "function", "function": {"name": "k", "defer_loading": False}, "defer_loading": True}]
    request = _request("none", tools=tools)
    assert [t.rendered() for t in request.tools] == [t.model_dump() for t in _vllm_request(request).tools]
    assert json.dumps([t.rendered() for t in request.tools])  # plain JSON for the gate to read
