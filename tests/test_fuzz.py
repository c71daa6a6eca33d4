"""Property-based fuzzing of both endpoints in-process: no client input yields a 500, and every 4xx has
OpenAI's error shape. The upstream is the recording stub (not a model); the gate is a keyword stub."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from inprocess import STUB_MODEL, RecordingUpstream, build_app
from proxy.protocol import FIELD_RULES

pytestmark = pytest.mark.unit

_scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False, allow_infinity=False) | \
    st.text(max_size=30) | st.sampled_from(["Hogwarts", "Hermione", "false", "true", "", "auto", "none", "required"])
_json = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.text(max_size=12) | st.sampled_from(["type", "text", "role", "content", "function", "name"]), inner, max_size=4),
    max_leaves=12)
_message = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "tool", "developer"]) | _scalars},
                                 optional={"content": _json | st.text(max_size=40), "name": _json,
                                           "tool_calls": _json, "reasoning": _json})
_prompt = st.text(max_size=60) | st.lists(st.integers(-5, 300_000), max_size=8) | \
    st.lists(st.text(max_size=20), max_size=3) | st.lists(st.lists(st.integers(-5, 300_000), max_size=4), max_size=3) | _json


def _bodies(endpoint: str) -> st.SearchStrategy:
    rule = FIELD_RULES[endpoint]
    fields = sorted(rule.forwarded | rule.refused | rule.classified | {"unknown_field"})
    content = {"prompt": _prompt} if endpoint == "completions" else {"messages": st.lists(_message, max_size=3) | _json}
    base = st.fixed_dictionaries({"model": st.just(STUB_MODEL) | _scalars, **content})
    extra = st.dictionaries(st.sampled_from(fields), _json, max_size=4)
    return st.builds(lambda b, e: {**e, **b} if e.get("model") is None else {**b, **e}, base, extra) | _json


@pytest.fixture(scope="module")
def client(model_dir):
    return TestClient(build_app(model_dir, RecordingUpstream()), raise_server_exceptions=False)


@pytest.mark.parametrize("endpoint,path", [("completions", "/v1/completions"), ("chat", "/v1/chat/completions")])
def test_no_500_and_openai_errors(client, endpoint, path):
    @settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(body=_bodies(endpoint))
    def run(body):
        response = client.post(path, json=body)
        assert response.status_code < 500, (body, response.text)
        if response.status_code >= 400:
            error = response.json()["error"]
            assert isinstance(error["message"], str) and error["code"] == response.status_code
            assert "Traceback" not in error["message"] and "proxy." not in error["message"]

    run()


def test_non_finite_numbers_are_no_500(client):
    for path in ("/v1/completions", "/v1/chat/completions"):
        body = b'{"model": "gemma-3-270m", "prompt": "hi", "messages": [{"role": "user", "content": "hi"}], ' \
               b'"temperature": NaN, "top_p": Infinity, "add_generation_prompt": -Infinity}'
        assert client.post(path, content=body).status_code < 500
