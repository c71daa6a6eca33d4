"""A flagged answer looks like an unflagged one, on a real vLLM (issue 12): the same tool-calling and
response_format request shapes are sent flagged and unflagged, streamed and not, and the answers are
compared field by field (keys in order, value types, finish_reason, tool_calls).

Two backends: the shared one, started as the project starts vLLM (no tool-call parser), and one with
`--enable-auto-tool-choice --tool-call-parser pythonic` (a parser that reads forced calls as JSON) and no JSON
whitespace, so that a forced call's output is fixed by its schema and the two paths can be compared exactly
even though the flagged prompt is corrupted. The app runs in-process with the keyword gate.
"""
from __future__ import annotations

import json
from contextlib import ExitStack

import httpx
import pytest
from inprocess import FLAGGED, PLAIN, build_app
from starlette.testclient import TestClient

pytestmark = pytest.mark.backend

UNIT = {"type": "object", "properties": {"unit": {"type": "string", "enum": ["celsius"]}}, "required": ["unit"],
        "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather", "parameters": UNIT}},
         {"type": "function", "function": {"name": "get_time", "parameters": UNIT}}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture
def clients(model_dir):
    """Opens the app on a backend; each client keeps one event loop for all its requests (its connections
    to vLLM belong to that loop)."""
    with ExitStack() as stack:
        yield lambda backend: stack.enter_context(TestClient(build_app(model_dir, backend.url),
                                                             raise_server_exceptions=False))


def _chat(content: str, **extra) -> dict:
    return {"model": "gemma-3-270m", "messages": [{"role": "user", "content": content}], "max_tokens": 24,
            "temperature": 0, **extra}


def shape(value):
    """A value's structure: keys in order with their shapes, list items' shapes, and scalars' type names."""
    if isinstance(value, dict):
        return [(key, shape(item)) for key, item in value.items()]
    if isinstance(value, list):
        return [shape(item) for item in value]
    return type(value).__name__


def skeleton(value):
    """A value's structure whatever its lengths (the two prompts differ): keys in order with their skeletons,
    a list as the distinct skeletons of its items, and scalars' type names."""
    if isinstance(value, dict):
        return [(key, skeleton(item)) for key, item in value.items()]
    if isinstance(value, list):
        return sorted({repr(skeleton(item)) for item in value})
    return type(value).__name__


def _events(response: httpx.Response) -> list[dict]:
    assert response.text.rstrip().endswith("data: [DONE]")
    return [json.loads(line[6:]) for line in response.text.split("\n\n") if line.startswith("data: {")]


def _stream_structure(events: list[dict]) -> dict:
    """What a stream is made of, whatever its length and however its text was cut into tokens: the first
    and the last (usage) chunk whole, and the distinct shapes of the chunks between, of their choice entries,
    their deltas and their tool-call deltas; the finish reasons in order."""
    middle = events[1:-1]
    entries = [choice for event in middle for choice in event["choices"]]

    def distinct(shapes) -> list[str]:
        return sorted({repr(item) for item in shapes})

    return {"first": shape(events[0]), "last": shape(events[-1]),
            "chunks": distinct(shape({k: v for k, v in e.items() if k != "choices"}) for e in middle),
            "entries": distinct(shape({k: v for k, v in c.items() if k != "delta"}) for c in entries),
            "deltas": distinct(shape({k: v for k, v in c["delta"].items() if k != "tool_calls"}) for c in entries),
            "tool_calls": distinct(shape(call) for c in entries for call in c["delta"].get("tool_calls", [])),
            "finish_reasons": [c["finish_reason"] for c in entries if c["finish_reason"]]}


def _pair(client: TestClient, body_for) -> tuple[httpx.Response, httpx.Response]:
    plain, flagged = (client.post("/v1/chat/completions", json=body_for(content)) for content in (PLAIN, FLAGGED))
    assert [plain.headers.get("x-eco-flagged"), flagged.headers.get("x-eco-flagged")] == ["false", "true"], \
        (plain.text, flagged.text)
    return plain, flagged


def _assert_alike(plain: httpx.Response, flagged: httpx.Response, stream: bool) -> None:
    assert plain.status_code == flagged.status_code == 200, (plain.text, flagged.text)
    if stream:
        assert _stream_structure(_events(flagged)) == _stream_structure(_events(plain))
    else:
        assert shape(flagged.json()) == shape(plain.json())
        assert [c["finish_reason"] for c in flagged.json()["choices"]] == \
            [c["finish_reason"] for c in plain.json()["choices"]]


# --- the project's backend: no tool-call parser ------------------------------------------------

FORMATS = [
    {"tools": TOOLS, "tool_choice": "none"},
    {"response_format": {"type": "json_object"}},
    {"response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": UNIT}}},
    {"structured_outputs": {"choice": ["yes", "no"]}},
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("extra", FORMATS, ids=["tools-none", "json_object", "json_schema", "choice"])
def test_rendered_tools_and_formats_answer_alike(backend, clients, extra, stream):
    usage = {"stream_options": {"include_usage": True}} if stream else {}
    plain, flagged = _pair(clients(backend), lambda c: _chat(c, stream=stream, **extra, **usage))
    _assert_alike(plain, flagged, stream)
    if not stream and "tools" not in extra:  # held to the format on the flagged path too
        texts = [a.json()["choices"][0]["message"]["content"] for a in (plain, flagged)]
        if "structured_outputs" in extra:
            assert set(texts) <= {"yes", "no"}
        elif extra["response_format"]["type"] == "json_schema":
            assert all(json.loads(text) == {"unit": "celsius"} for text in texts), texts


@pytest.mark.parametrize("choice", ["auto", "required", NAMED, ...], ids=["auto", "required", "named", "default"])
def test_without_a_parser_tool_choices_get_vllms_own_refusal_on_both_paths(backend, clients, choice):
    extra = {"tools": TOOLS} | ({} if choice is ... else {"tool_choice": choice})
    client = clients(backend)
    plain, flagged = (client.post("/v1/chat/completions", json=_chat(c, **extra))
                      for c in (PLAIN, FLAGGED))
    direct = httpx.post(f"{backend.url}/v1/chat/completions", json=_chat(PLAIN, **extra), timeout=60)
    assert plain.status_code == flagged.status_code == direct.status_code == 400
    assert plain.json() == flagged.json() == direct.json()


@pytest.mark.parametrize("extra", [
    {"response_format": {"type": "json_schema"}},
    {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
    {"structured_outputs": {"regex": "("}},
    {"structured_outputs": {"json": {"type": "object"}, "regex": "a+"}},
    {"tools": [], "tool_choice": "none"},
], ids=["no-schema", "bad-schema", "bad-regex", "two-constraints", "empty-tools"])
def test_format_errors_are_the_same_on_both_paths(backend, clients, extra):
    client = clients(backend)
    plain, flagged = (client.post("/v1/chat/completions", json=_chat(c, **extra))
                      for c in (PLAIN, FLAGGED))
    assert plain.status_code == flagged.status_code == 400
    assert plain.json() == flagged.json()


SAMPLED_TWICE = {"n": 2, "temperature": 0.8, "seed": 1}  # vLLM refuses n > 1 with greedy sampling
COMPLETION_SHAPES = [
    ({}, False), (SAMPLED_TWICE, False), ({"return_token_ids": True}, False), ({"echo": False}, False),
    ({"stream_options": {"include_usage": True, "continuous_usage_stats": True}}, True),
    ({**SAMPLED_TWICE, "stream_options": {"include_usage": True}}, True),
]


@pytest.mark.parametrize("extra, stream", COMPLETION_SHAPES, ids=["plain", "n2", "token_ids", "echo_false",
                                                                  "stream_usage", "stream_n2"])
def test_completions_answer_alike(backend, clients, extra, stream):
    client = clients(backend)
    plain, flagged = (client.post("/v1/completions", json={
        "model": "gemma-3-270m", "prompt": content, "max_tokens": 12, "temperature": 0, "ignore_eos": True,
        "stream": stream, **extra}) for content in (PLAIN, FLAGGED))
    assert [plain.headers.get("x-eco-flagged"), flagged.headers.get("x-eco-flagged")] == ["false", "true"]
    assert plain.status_code == flagged.status_code == 200, (plain.text, flagged.text)
    if stream:  # the usage chunk last, and the same kinds of chunk before it
        plain_events, flagged_events = _events(plain), _events(flagged)
        assert skeleton(flagged_events[-1]) == skeleton(plain_events[-1])
        assert skeleton(flagged_events[:-1]) == skeleton(plain_events[:-1])
    else:
        assert skeleton(flagged.json()) == skeleton(plain.json())
    if "return_token_ids" in extra:  # the prompt's own ids, not the placeholders vLLM gives for embeddings
        assert 0 not in flagged.json()["choices"][0]["prompt_token_ids"]


# --- a backend whose parser reads forced calls as JSON --------------------------------------------

@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("choice", ["required", NAMED], ids=["required", "named"])
def test_forced_tool_calls_answer_alike(tool_parser_backend, clients, choice, stream):
    """One call, whose JSON the schema fixes: the answers differ only in ids and token cuts."""
    client = clients(tool_parser_backend)
    extra = {"tools": TOOLS, "tool_choice": choice, "parallel_tool_calls": False, "stream": stream,
             "max_tokens": 40, **({"stream_options": {"include_usage": True}} if stream else {})}
    plain, flagged = _pair(client, lambda c: _chat(c, **extra))
    _assert_alike(plain, flagged, stream)
    for answer in (plain, flagged):
        [call] = _calls(answer, stream)
        assert call["type"] == "function" and call["id"].startswith("chatcmpl-tool-")
        assert json.loads(call["function"]["arguments"]) == {"unit": "celsius"}
        assert call["function"]["name"] == "get_weather" if choice == NAMED else call["function"]["name"] in \
            {"get_weather", "get_time"}
    finish = [_finish_reasons(answer, stream) for answer in (plain, flagged)]
    assert finish == [["stop" if choice == NAMED else "tool_calls"]] * 2


@pytest.mark.parametrize("stream", [False, True])
def test_parallel_calls_cut_by_the_length_answer_alike(tool_parser_backend, clients, stream):
    """Calls follow one another until max_tokens: whole, vLLM then reads no call at all; streamed, every
    call begun has been announced. (60 tokens: the corrupted answer spells its first call in a few more
    tokens than the plain one, and at 40 its second call's name was still cut.)"""
    client = clients(tool_parser_backend)
    extra = {"tools": TOOLS, "tool_choice": "required", "stream": stream, "max_tokens": 60,
             **({"stream_options": {"include_usage": True}} if stream else {})}
    plain, flagged = _pair(client, lambda c: _chat(c, **extra))
    _assert_alike(plain, flagged, stream)
    assert [_finish_reasons(answer, stream) for answer in (plain, flagged)] == [["length"]] * 2
    assert [len(_calls(answer, stream)) > 1 for answer in (plain, flagged)] == [stream, stream]


def _finish_reasons(answer: httpx.Response, stream: bool) -> list[str]:
    if not stream:
        return [choice["finish_reason"] for choice in answer.json()["choices"]]
    return [c["finish_reason"] for e in _events(answer) for c in e["choices"] if c["finish_reason"]]


def _calls(answer: httpx.Response, stream: bool) -> list[dict]:
    """The tool calls of an answer; a stream's deltas joined per call index."""
    if not stream:
        return answer.json()["choices"][0]["message"].get("tool_calls", [])
    calls: dict[int, dict] = {}
    for event in _events(answer):
        for choice in event["choices"]:
            for delta in choice["delta"].get("tool_calls", []):
                call = calls.setdefault(delta["index"], {"function": {"arguments": ""}})
                call.update({k: delta[k] for k in ("id", "type") if k in delta})
                if delta["function"].get("name"):
                    call["function"]["name"] = delta["function"]["name"]
                call["function"]["arguments"] += delta["function"].get("arguments") or ""
    return [calls[index] for index in sorted(calls)]


def test_auto_is_refused_alike_when_the_backend_parses_calls(tool_parser_backend, clients):
    client = clients(tool_parser_backend)
    plain, flagged = (client.post("/v1/chat/completions", json=_chat(c, tools=TOOLS, tool_choice="auto"))
                      for c in (PLAIN, FLAGGED))
    assert plain.status_code == flagged.status_code == 400 and plain.json() == flagged.json()
    assert plain.json()["error"]["param"] == "tool_choice"
