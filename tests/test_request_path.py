"""The request path in-process, flagged and unflagged, against a recording stub upstream: what the
model is sent, and what the client gets back (issue 12's findings, each asserted on the upstream)."""
from __future__ import annotations

import json
import time

import pytest
from starlette.testclient import TestClient

from inprocess import FLAGGED, PLAIN, STUB_MODEL, KeywordGate, RecordingUpstream, build_app
from proxy.protocol import ChatCompletionRequest
from proxy.tool_calls import ForcedToolCalls

pytestmark = pytest.mark.unit



@pytest.fixture
def upstream():
    return RecordingUpstream()


@pytest.fixture(params=["speculative", "sequential"])
def client(model_dir, upstream, request):
    return TestClient(build_app(model_dir, upstream, dispatch=request.param), raise_server_exceptions=False)


def _corrupted(upstream) -> list[tuple[str, dict]]:
    """What was sent for flagged prompts: the corrupted requests (a speculative one aside)."""
    return [(call.path, call.body) for call in upstream.calls if not call.raw]


def _chat(content: str, **extra) -> dict:
    return {"model": STUB_MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 4, **extra}


def _completion(prompt, **extra) -> dict:
    return {"model": STUB_MODEL, "prompt": prompt, "max_tokens": 4, **extra}


def _error(response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"]), body
    assert body["error"]["code"] == response.status_code
    return body["error"]


# --- what reaches the model ----------------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("raw_prompt", ["The headmaster of Hogwarts is Albus", ["a", "b"], [2, 651]])
def test_a_raw_prompt_cannot_ride_along_a_flagged_chat(client, upstream, stream, raw_prompt):
    response = client.post("/v1/chat/completions", json=_chat(FLAGGED, prompt=raw_prompt, stream=stream))
    assert response.status_code == 200 and response.headers["x-eco-flagged"] == "true"
    [(path, body)] = _corrupted(upstream)
    assert path == "/v1/completions" and "prompt" not in body and "prompt_embeds" in body
    assert isinstance(body["prompt_embeds"], str)  # one corrupted prompt, nothing else


def test_unknown_fields_never_reach_the_model_and_known_ones_do(client, upstream):
    for content in (PLAIN, FLAGGED):
        client.post("/v1/chat/completions", json=_chat(content, min_tokens=2, vendor_field={"x": 1},
                                                        kv_transfer_params=None))
    for _, body in upstream.received:
        assert body["min_tokens"] == 2 and "vendor_field" not in body and "kv_transfer_params" not in body


@pytest.mark.parametrize("field,value", [
    ("prompt_embeds", "AAAA"), ("kv_transfer_params", {"x": 1}), ("vllm_xargs", {"a": 1}),
    ("mm_payload", {"x": 1}), ("truncate_prompt_tokens", 5), ("prompt_logprobs", 1), ("echo", True),
    ("suffix", "x"),
])
def test_refused_completion_fields_name_the_field_and_send_nothing(client, upstream, field, value):
    for prompt in (PLAIN, FLAGGED):
        response = client.post("/v1/completions", json=_completion(prompt, **{field: value}))
        assert response.status_code == 400 and _error(response)["param"] == field
    assert upstream.received == []


def test_a_string_false_is_false_on_both_paths(client, upstream):
    for content in (PLAIN, FLAGGED):
        response = client.post("/v1/chat/completions", json=_chat(content, stream="false"))
        assert response.status_code == 200 and response.headers["content-type"].startswith("application/json")
        assert response.json()["object"] == "chat.completion"
    assert [body["stream"] for _, body in upstream.received] == [False] * len(upstream.received)
    assert len(_corrupted(upstream)) == 1
    echo = client.post("/v1/completions", json=_completion(FLAGGED, echo="false"))
    assert echo.status_code == 200


def test_a_zero_output_limit_is_sent_as_zero_not_as_the_whole_context(client, upstream):
    client.post("/v1/chat/completions", json={**_chat(FLAGGED), "max_completion_tokens": 0})
    [(_, body)] = _corrupted(upstream)
    assert body["max_tokens"] == 0


def test_flagged_chat_default_length_is_the_rest_of_the_context(client, upstream):
    body = _chat(FLAGGED)
    del body["max_tokens"]
    client.post("/v1/chat/completions", json=body)
    [(_, sent)] = _corrupted(upstream)
    assert 2000 < sent["max_tokens"] < 2048


# --- never a 500, always OpenAI's error shape -------------------------------------------------

@pytest.mark.parametrize("body", [
    _completion([2, -5]), _completion([2, 10**20]), _completion([[2, 262144]]),
    _completion(FLAGGED, max_tokens="many"), {"model": STUB_MODEL, "messages": "hi"},
    {"model": STUB_MODEL, "messages": []}, _chat(FLAGGED, stream_options={"include_usage": "maybe"}),
    _chat(FLAGGED, chat_template_kwargs={"tokenize": True}), _chat(FLAGGED, tools=[{"type": "function"}], tool_choice="required"),
    _chat(FLAGGED, tool_choice="auto"), {"model": STUB_MODEL}, {"prompt": "hi"},
])
def test_bad_input_is_a_400_in_openai_shape(client, upstream, body):
    response = client.post("/v1/completions" if "prompt" in body or "messages" not in body else "/v1/chat/completions",
                           json=body)
    assert response.status_code == 400, response.text
    _error(response)
    assert upstream.received == []


def test_deep_nesting_and_bad_json_are_400(client):
    deep = b'{"model": "m", "prompt": ' + b"[" * 20_000 + b"]" * 20_000 + b"}"
    assert client.post("/v1/completions", content=deep).status_code == 400
    deeper = b'{"model": "m", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert client.post("/v1/completions", content=deeper).status_code == 413
    assert client.post("/v1/completions", content=b"{nope").status_code == 400
    assert _error(client.post("/v1/completions", content=b"[1, 2]"))["type"] == "BadRequestError"


def test_null_where_a_value_is_expected(client, upstream):
    response = client.post("/v1/completions", json=_completion(FLAGGED, prompt_embeds=None, n=None, stream=None))
    assert response.status_code == 200
    [(_, body)] = _corrupted(upstream)
    assert isinstance(body["prompt_embeds"], str)


def test_unknown_paths_and_methods_are_openai_shaped_without_redirects(client):
    assert _error(client.get("/v1/nothing"))["type"] == "NotFoundError"
    assert client.get("/v1/completions").status_code == 405
    assert _error(client.get("/v1/completions"))["code"] == 405
    slash = client.post("/v1/completions/", json=_completion(PLAIN), follow_redirects=False)
    assert slash.status_code == 404
    assert client.get("/openapi.json").status_code == 404 and client.get("/docs").status_code == 404


# --- a flagged answer looks like an unflagged one ----------------------------------------------

def test_prompt_token_ids_are_the_real_ones_when_flagged(client, model_dir):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(model_dir)(FLAGGED).input_ids
    completion = client.post("/v1/completions", json=_completion(FLAGGED, return_token_ids=True)).json()
    assert completion["choices"][0]["prompt_token_ids"] == ids
    stream = client.post("/v1/completions", json=_completion(FLAGGED, return_token_ids=True, stream=True))
    first = json.loads(stream.text.split("\n\n")[0].removeprefix("data: "))
    assert first["choices"][0]["prompt_token_ids"] == ids
    chat = client.post("/v1/chat/completions", json=_chat(FLAGGED, return_token_ids=True)).json()
    assert chat["prompt_token_ids"][0] == 2 and 0 not in chat["prompt_token_ids"]


def test_continuous_usage_reaches_a_flagged_chat_stream(client):
    response = client.post("/v1/chat/completions", json=_chat(FLAGGED, stream=True, stream_options={
        "include_usage": True, "continuous_usage_stats": True}))
    events = [json.loads(line[6:]) for line in response.text.split("\n\n") if line.startswith("data: {")]
    assert all("usage" in event for event in events), events


TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}},
         {"type": "function", "function": {"name": "g"}}]
NAMED = {"type": "function", "function": {"name": "g"}}


def _events(response) -> list[dict]:
    return [json.loads(line[6:]) for line in response.text.split("\n\n") if line.startswith("data: {")]


def _generation_calls(upstream) -> list:
    """What was sent to generate an answer: the backend's tool-calling probe aside."""
    return [call for call in upstream.calls if call.body.get("max_tokens") != 1]


@pytest.mark.parametrize("choice", ["auto", "required", NAMED, ...])
def test_without_a_tool_parser_tool_choices_get_vllms_refusal_on_both_paths(client, upstream, choice):
    extra = {"tools": TOOLS} | ({} if choice is ... else {"tool_choice": choice})
    answers = [client.post("/v1/chat/completions", json=_chat(content, **extra)) for content in (PLAIN, FLAGGED)]
    assert [a.status_code for a in answers] == [400, 400]
    assert _error(answers[0]) == _error(answers[1]) and "--tool-call-parser" in _error(answers[0])["message"]
    assert _generation_calls(upstream) == []
    assert len(upstream.calls) == 1  # the backend was asked once what it does, then remembered
    rendered = client.post("/v1/chat/completions", json=_chat(PLAIN, tools=TOOLS, tool_choice="none"))
    assert rendered.status_code == 200


@pytest.fixture(params=["speculative", "sequential"])
def parser_client(model_dir, request):
    upstream = RecordingUpstream(tool_parser=True)
    return TestClient(build_app(model_dir, upstream, dispatch=request.param), raise_server_exceptions=False), upstream


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("choice", ["required", NAMED])
def test_a_forced_tool_call_comes_back_alike_flagged_and_unflagged(parser_client, choice, stream):
    client, upstream = parser_client
    body = {"tools": TOOLS, "tool_choice": choice, "response_format": {"type": "json_object"}, "stream": stream}
    plain, flagged = (client.post("/v1/chat/completions", json=_chat(c, **body)) for c in (PLAIN, FLAGGED))
    assert [plain.headers["x-eco-flagged"], flagged.headers["x-eco-flagged"]] == ["false", "true"]
    [(path, sent)] = _corrupted(upstream)
    # held to the schema vLLM's chat endpoint would use; the tools' format replaces the requested one
    assert path == "/v1/completions" and "response_format" not in sent and "tools" not in sent
    forced = ForcedToolCalls.of(ChatCompletionRequest.model_validate(_chat(FLAGGED, **body)))
    assert sent["structured_outputs"] == {"json": forced.schema}
    name = "g" if choice == NAMED else "f"
    finish = "stop" if choice == NAMED else "tool_calls"
    if not stream:
        answers = [a.json()["choices"][0] for a in (plain, flagged)]
        for answer in answers:
            [call] = answer["message"]["tool_calls"]
            assert call["type"] == "function" and call["id"].startswith("chatcmpl-tool-")
            assert call["function"]["name"] == name and json.loads(call["function"]["arguments"]) == {}
            assert answer["message"]["content"] == "" and answer["finish_reason"] == finish
    else:
        for answer in (plain, flagged):
            events = _events(answer)
            deltas = [c["delta"] for e in events for c in e["choices"]]
            assert deltas[0] == {"role": "assistant", "content": ""}
            calls = [tc for d in deltas for tc in d.get("tool_calls", [])]
            assert calls[0]["function"]["name"] == name and calls[0]["type"] == "function" and calls[0]["index"] == 0
            assert json.loads("".join(tc["function"]["arguments"] for tc in calls)) == {}
            assert not any(d.get("content") for d in deltas)
            assert events[-1]["choices"][0]["finish_reason"] == finish


def test_auto_is_refused_alike_when_the_backend_parses_tool_calls(parser_client):
    client, upstream = parser_client
    answers = [client.post("/v1/chat/completions", json=_chat(content, tools=TOOLS)) for content in (PLAIN, FLAGGED)]
    assert [a.status_code for a in answers] == [400, 400] and _error(answers[0]) == _error(answers[1])
    assert _error(answers[0])["param"] == "tool_choice" and _generation_calls(upstream) == []


@pytest.mark.parametrize("body", [
    _chat(FLAGGED, tools=[]), _chat(FLAGGED, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "h"}}),
    _chat(FLAGGED, tools=TOOLS, tool_choice="sometimes"), _chat(FLAGGED, tools=[{"type": "function", "function": {}}]),
    _chat(FLAGGED, tools=TOOLS, tool_choice=NAMED, structured_outputs={"json": {"type": "object"}}),
    _chat(FLAGGED, structured_outputs={"json": {"type": "object"}, "regex": "a+"}),
    _chat(FLAGGED, structured_outputs="x"),
])
def test_tool_and_format_requests_vllm_refuses_are_refused_on_both_paths(client, upstream, body):
    answers = [client.post("/v1/chat/completions", json={**body, "messages": [{"role": "user", "content": c}]})
               for c in (PLAIN, FLAGGED)]
    assert [a.status_code for a in answers] == [400, 400] and _error(answers[0]) == _error(answers[1])
    assert upstream.calls == []


@pytest.mark.parametrize("constraint", [
    {"structured_outputs": {"choice": ["yes", "no", FLAGGED]}},
    {"structured_outputs": {"regex": f"({FLAGGED}|no)"}},
    {"structured_outputs": {"json": {"type": "object", "properties": {"a": {"const": FLAGGED}}}}},
    {"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {"enum": [FLAGGED]}}}},
])
@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_an_answer_forced_to_name_the_target_flags_the_request(client, upstream, constraint, endpoint):
    body, path = (_chat(PLAIN, **constraint), "/v1/chat/completions") if endpoint == "chat" else \
        (_completion(PLAIN, **constraint), "/v1/completions")
    response = client.post(path, json=body)
    assert response.status_code == 200 and response.headers["x-eco-flagged"] == "true"
    [(_, sent)] = _corrupted(upstream)
    assert "prompt_embeds" in sent and all(sent[key] == value for key, value in constraint.items())
    harmless = {key: {"choice": ["yes", "no"]} if key == "structured_outputs" else {"type": "json_object"}
                for key in constraint}
    response = client.post(path, json={**body, **harmless})
    assert response.status_code == 200 and response.headers["x-eco-flagged"] == "false"


@pytest.mark.parametrize("stream", [False, True])
def test_same_response_structure_flagged_and_unflagged_chat(client, stream):
    """Against the stub (field by field on a real vLLM: tests/test_tool_calls_backend.py)."""
    answers = [client.post("/v1/chat/completions", json=_chat(content, stream=stream)) for content in (PLAIN, FLAGGED)]
    assert [a.headers["x-eco-flagged"] for a in answers] == ["false", "true"]
    if not stream:
        plain, flagged = (a.json() for a in answers)
        assert set(flagged) >= set(plain)  # the stub upstream writes fewer fields than vLLM; none may be missing
        assert set(flagged["choices"][0]) >= set(plain["choices"][0])
    else:
        assert all(a.text.rstrip().endswith("data: [DONE]") for a in answers)


# --- operator controls ------------------------------------------------------------------------

@pytest.mark.parametrize("mode,expected", [
    ("none", set()), ("flag", {"x-eco-flagged", "x-eco-policy-version"}),
    ("full", {"x-eco-flagged", "x-eco-policy-version", "x-eco-target", "x-eco-score", "server-timing"}),
])
def test_verdict_headers_follow_the_policy(model_dir, upstream, mode, expected):
    client = TestClient(build_app(model_dir, upstream, headers=mode))
    response = client.post("/v1/completions", json=_completion(FLAGGED))
    shown = {k for k in response.headers if k.startswith("x-eco") or k == "server-timing"}
    assert shown == expected
    if mode == "full":
        assert response.headers["x-eco-score"] == "1.00"


def test_api_keys_metrics_key_and_models_without_paths(model_dir, upstream):
    client = TestClient(build_app(model_dir, upstream, api_keys=("k1", "k2"), metrics_key="m"))
    assert _error(client.post("/v1/completions", json=_completion(PLAIN)))["type"] == "AuthenticationError"
    assert client.post("/v1/completions", json=_completion(PLAIN), headers={"authorization": "Bearer k3"}).status_code == 401
    assert client.post("/v1/completions", json=_completion(PLAIN), headers={"authorization": "Bearer k2"}).status_code == 200
    assert len(upstream.received) == 1
    assert client.get("/v1/models").status_code == 401
    models = client.get("/v1/models", headers={"authorization": "Bearer k1"}).json()
    assert models["data"][0]["root"] == STUB_MODEL and "/secret" not in json.dumps(models)
    assert client.get("/metrics").status_code == 401
    assert "eco_requests_total" in client.get("/metrics", headers={"authorization": "Bearer m"}).text
    assert TestClient(build_app(model_dir, upstream)).get("/metrics").status_code == 404


# --- bounded cost before classification ------------------------------------------------------

class CountingGate(KeywordGate):
    def __init__(self, delay: float = 0.0):
        self.calls, self.delay = 0, delay

    def score_segments(self, segments: list[str], stop_above: float | None = None) -> float:
        self.calls += 1
        time.sleep(self.delay)
        return super().score_segments(segments)


def _with_gate(app, gate):
    state = app.state.proxy
    target = state.policy.targets[0]
    state.policy = type(state.policy)(state.policy.version, (type(target)(
        target.name, gate, target.threshold, target.corruption, target.entities, target.fail_mode),),
        False, state.policy.source, "full")
    return app


def test_body_limit_and_context_checked_before_the_classifier(model_dir, upstream):
    gate = CountingGate()
    client = TestClient(_with_gate(build_app(model_dir, upstream), gate))
    too_big = client.post("/v1/completions", json=_completion("word " * 60_000))
    assert too_big.status_code == 413 and _error(too_big)["type"] == "RequestTooLargeError"
    body = json.dumps(_completion("word " * 60_000)).encode()
    chunked = client.post("/v1/completions", content=(body[i:i + 65536] for i in range(0, len(body), 65536)),
                          headers={"content-type": "application/json"})  # no length declared: counted as read
    assert "content-length" not in chunked.request.headers
    assert chunked.status_code == 413 and _error(chunked)["type"] == "RequestTooLargeError"
    too_long = client.post("/v1/completions", json=_completion("word " * 3000))
    assert too_long.status_code == 400 and "maximum context length is 2048" in _error(too_long)["message"]
    assert gate.calls == 0 and upstream.received == []


def test_a_slow_verdict_falls_back_to_the_fail_mode(model_dir, upstream):
    client = TestClient(_with_gate(build_app(model_dir, upstream, classify_timeout=0.2), CountingGate(delay=1.0)))
    response = client.post("/v1/completions", json=_completion(PLAIN))
    assert response.status_code == 200 and response.headers["x-eco-flagged"] == "true"  # closed: corrupted
    [(_, body)] = _corrupted(upstream)
    assert "prompt_embeds" in body and "prompt" not in body


def test_top_logprobs_without_logprobs_is_refused_alike(client, upstream):
    answers = [client.post("/v1/chat/completions", json=_chat(content, top_logprobs=3)) for content in (PLAIN, FLAGGED)]
    assert [a.status_code for a in answers] == [400, 400] and _error(answers[0]) == _error(answers[1])
    assert upstream.received == []
