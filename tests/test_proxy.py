"""The guardrail proxy on the real backend, with the official `openai` SDK as the client."""
from __future__ import annotations

import json
import signal
import time

import httpx
import openai
import pytest

from proxy_harness import METRICS_KEY, start_proxy, train_tiny_policy

pytestmark = pytest.mark.backend

FLAGGED_PROMPT = "Harry Potter's best friends are Ron Weasley and"
UNFLAGGED_PROMPT = "The capital of Japan is"
GREEDY = {"temperature": 0, "max_tokens": 12}


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("policy")
    train_tiny_policy(directory)
    return directory


@pytest.fixture(scope="module")
def proxy(backend, policy_dir, tmp_path_factory):
    process = start_proxy(policy_dir / "policy.yaml", backend.url, backend.model_dir, backend.served_model_name,
                          tmp_path_factory.mktemp("proxy"))
    yield process
    process.stop()


@pytest.fixture(scope="module")
def client(proxy):
    return openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="unused", max_retries=0)


def _without_ids(body: dict) -> dict:
    return {k: v for k, v in body.items() if k not in ("id", "created")}


def _post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, timeout=120)


def _stream_events(url: str, path: str, body: dict) -> list:
    events = []
    with httpx.stream("POST", f"{url}{path}", json=body, timeout=120) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: "):
                payload = line[6:]
                events.append(payload if payload == "[DONE]" else _without_ids(json.loads(payload)))
    return events


# --- health, readiness, models -----------------------------------------------------------

def test_health_ready_models(proxy, client, backend):
    assert httpx.get(f"{proxy.url}/health").json() == {"status": "ok"}
    ready = httpx.get(f"{proxy.url}/ready")
    assert ready.status_code == 200 and ready.json()["policy_version"] == "test-1"
    assert [m.id for m in client.models.list().data] == [backend.served_model_name]


# --- unflagged: identical to vLLM ---------------------------------------------------------

def test_unflagged_completion_identical_to_backend(proxy, backend, client):
    body = {"model": backend.served_model_name, "prompt": UNFLAGGED_PROMPT, **GREEDY}
    direct = _post(backend.url, "/v1/completions", body).json()
    through = _post(proxy.url, "/v1/completions", body)
    assert through.headers["x-eco-flagged"] == "false"
    assert float(through.headers["server-timing"].removeprefix("eco-guard;dur=")) > 0
    assert _without_ids(through.json()) == _without_ids(direct)
    sdk = client.completions.create(model=backend.served_model_name, prompt=UNFLAGGED_PROMPT, **GREEDY)
    assert sdk.choices[0].text == direct["choices"][0]["text"]


def test_unflagged_chat_stream_identical_to_backend(proxy, backend, client):
    body = {"model": backend.served_model_name, "messages": [{"role": "user", "content": "Name three fruits."}],
            "stream": True, "stream_options": {"include_usage": True}, **GREEDY}
    assert _stream_events(proxy.url, "/v1/chat/completions", body) == \
        _stream_events(backend.url, "/v1/chat/completions", body)


def test_unknown_fields_are_forwarded(proxy, backend):
    # vLLM knows `min_tokens`; the proxy does not read it, so it must reach the backend untouched.
    body = {"model": backend.served_model_name, "prompt": UNFLAGGED_PROMPT, "temperature": 0, "max_tokens": 8,
            "min_tokens": 8, "ignore_eos": True}
    through = _post(proxy.url, "/v1/completions", body).json()
    assert through["usage"]["completion_tokens"] == 8


# --- flagged: corrupted, same shapes ------------------------------------------------------

def test_flagged_completion_forgets(proxy, backend, client):
    direct = _post(backend.url, "/v1/completions",
                   {"model": backend.served_model_name, "prompt": FLAGGED_PROMPT, **GREEDY}).json()
    assert "Hermione" in direct["choices"][0]["text"]
    raw = client.completions.with_raw_response.create(model=backend.served_model_name, prompt=FLAGGED_PROMPT,
                                                      **GREEDY)
    assert raw.headers["x-eco-flagged"] == "true"
    assert raw.headers["x-eco-target"] == "harry_potter"
    assert float(raw.headers["x-eco-score"]) > 0.5
    assert raw.headers["x-eco-policy-version"] == "test-1"
    assert raw.headers["server-timing"].startswith("eco-guard;dur=")
    completion = raw.parse()
    assert completion.object == "text_completion"
    assert completion.choices[0].text != direct["choices"][0]["text"]
    assert "Hermione" not in completion.choices[0].text
    assert completion.usage.prompt_tokens == direct["usage"]["prompt_tokens"]
    # Deterministic per (key, prompt): the same prompt gets the same corruption and answer.
    again = client.completions.create(model=backend.served_model_name, prompt=FLAGGED_PROMPT, **GREEDY)
    assert again.choices[0].text == completion.choices[0].text


def test_flagged_chat_has_the_shape_of_an_unflagged_one(proxy, backend, client):
    model = backend.served_model_name
    flagged = client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "Who are Harry Potter's best friends?"}], **GREEDY)
    plain = client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "What is the capital of Japan?"}], **GREEDY)
    assert flagged.headers["x-eco-flagged"] == "true" and plain.headers["x-eco-flagged"] == "false"
    flagged_body, plain_body = json.loads(flagged.text), json.loads(plain.text)
    assert flagged_body.keys() == plain_body.keys()
    assert flagged_body["choices"][0].keys() == plain_body["choices"][0].keys()
    assert flagged_body["choices"][0]["message"].keys() == plain_body["choices"][0]["message"].keys()
    assert flagged_body["id"].startswith("chatcmpl-") and flagged_body["object"] == "chat.completion"
    parsed = flagged.parse()
    assert parsed.choices[0].finish_reason in ("stop", "length")
    assert parsed.usage.completion_tokens > 0


def test_the_evaluation_reads_the_answers_probability_from_chats(proxy, backend):
    """`eco-proxy eval` asks its chat probes with logprobs: vLLM's chat shape and the proxy's translation of a
    flagged answer both read as the completions' shape, and the probability falls where the proxy corrupts."""
    from transformers import AutoTokenizer

    from corruption.probes import TOP_LOGPROBS, answer_probability, answer_spellings, probe_chat
    from evaluation.client import Endpoint

    chats = [probe_chat(UNFLAGGED_PROMPT), probe_chat(FLAGGED_PROMPT)]
    tokenizer = AutoTokenizer.from_pretrained(backend.model_dir)
    replies = {}
    for name, url in (("direct", backend.url), ("proxy", proxy.url)):
        endpoint = Endpoint(url, backend.served_model_name)
        try:
            replies[name] = endpoint.chat(chats, 4, name, continue_final_message=True, logprobs=TOP_LOGPROBS)
        finally:
            endpoint.close()
    assert [r.flagged for r in replies["proxy"]] == [False, True]
    for reply in replies["direct"] + replies["proxy"]:
        shaped = reply.logprobs
        assert len(shaped["tokens"]) == len(shaped["top_logprobs"]) == len(shaped["token_logprobs"]) > 0
        assert all(token in top and len(top) <= TOP_LOGPROBS for token, top in zip(shaped["tokens"],
                                                                                    shaped["top_logprobs"]))
    tokyo, hermione = (answer_spellings(tokenizer, answers) for answers in (("Tokyo",), ("Hermione",)))
    assert answer_probability(tokyo, {"logprobs": replies["proxy"][0].logprobs}) > 0.2
    known = answer_probability(hermione, {"logprobs": replies["direct"][1].logprobs})
    corrupted = answer_probability(hermione, {"logprobs": replies["proxy"][1].logprobs})
    assert known > 0.2 and corrupted < known / 2, (known, corrupted)


def test_flagged_chat_stream_well_formed(proxy, backend, client):
    stream = client.chat.completions.create(
        model=backend.served_model_name, messages=[{"role": "user", "content": "Tell me about Hermione Granger."}],
        stream=True, stream_options={"include_usage": True}, **GREEDY)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert any(c.choices and c.choices[0].finish_reason for c in chunks)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    with httpx.stream("POST", f"{proxy.url}/v1/chat/completions", timeout=120, json={
            "model": backend.served_model_name, "stream": True, **GREEDY,
            "messages": [{"role": "user", "content": "Tell me about Hermione Granger."}]}) as response:
        assert response.headers["x-eco-flagged"] == "true"
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"


def test_flagged_completion_stream(proxy, backend, client):
    stream = client.completions.create(model=backend.served_model_name, prompt=FLAGGED_PROMPT, stream=True,
                                       stream_options={"include_usage": True}, **GREEDY)
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text and "Hermione" not in text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == GREEDY["max_tokens"]
    assert any(c.choices and c.choices[0].finish_reason == "length" for c in chunks)


# --- no bypass -----------------------------------------------------------------------------

@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"prompt_embeds": "AAAA"}),
    ("/v1/completions", {"prompt": "hi", "prompt_embeds": ["AAAA"]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "prompt_embeds", "data": "AAAA"}]}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "chat_template": "{{ 'x' }}"}),
    # parts vLLM renders by paths of its own: a keyed "text" part it would read as embeddings, and text
    # carried in thinking / refusal / tool-reference parts
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is the capital of Japan?", "uuid": "u", "prompt_embeds": {}, "data": "AAAA"}]}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "thinking", "thinking": FLAGGED_PROMPT}, {"type": "text", "text": "Go on."}]}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "refusal", "refusal": FLAGGED_PROMPT}]}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "tool_reference", "name": FLAGGED_PROMPT}]}]}),
])
def test_client_embeddings_and_templates_refused(proxy, backend, path, body):
    response = _post(proxy.url, path, {"model": backend.served_model_name, **body})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == 400


def test_token_id_prompt_is_classified(proxy, backend):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(backend.model_dir)(FLAGGED_PROMPT).input_ids
    response = _post(proxy.url, "/v1/completions", {"model": backend.served_model_name, "prompt": ids, **GREEDY})
    assert response.status_code == 200
    assert response.headers["x-eco-flagged"] == "true"
    assert "Hermione" not in response.json()["choices"][0]["text"]


@pytest.mark.parametrize("messages", [
    [{"role": "system", "content": "You are an expert on Harry Potter and Hogwarts."},
     {"role": "user", "content": "Who are his two best friends?"}],
    [{"role": "user", "content": "Tell me about Harry Potter."}, {"role": "assistant", "content": "Sure."},
     {"role": "user", "content": "Who are his best friends?"}],
    [{"role": "user", "content": "Look this up."},
     {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function", "function": {
         "name": "search", "arguments": "{\"q\": \"Hermione Granger and Ron Weasley\"}"}}]},
     {"role": "tool", "tool_call_id": "c1", "content": "Harry Potter's best friends at Hogwarts are Ron and Hermione."},
     {"role": "user", "content": "Summarise."}],
    [{"role": "user", "content": "Think first."},
     {"role": "assistant", "content": "Done.", "reasoning": "Harry Potter's best friends are Ron and Hermione."},
     {"role": "user", "content": "Go on."}],
])
def test_target_hidden_in_other_messages_is_flagged(proxy, backend, messages):
    for stream in (False, True):
        body = {"model": backend.served_model_name, "messages": messages, "stream": stream, **GREEDY}
        with httpx.stream("POST", f"{proxy.url}/v1/chat/completions", json=body, timeout=120) as response:
            response.read()
            assert response.status_code == 200, response.text
            assert response.headers["x-eco-flagged"] == "true"


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_an_answer_forced_to_name_the_target_is_flagged_and_still_forced(proxy, backend, path):
    choices = ["Harry Potter's best friend is Ron Weasley.", "Harry Potter's best friend is Draco Malfoy."]
    prompt = {"messages": [{"role": "user", "content": "Write one true sentence."}]} if "chat" in path else \
        {"prompt": "One true sentence:"}
    response = _post(proxy.url, path, {"model": backend.served_model_name, **prompt, **GREEDY, "max_tokens": 48,
                                       "structured_outputs": {"choice": choices}})
    assert response.status_code == 200, response.text
    assert response.headers["x-eco-flagged"] == "true"
    choice = response.json()["choices"][0]
    assert (choice["message"]["content"] if "chat" in path else choice["text"]) in choices


@pytest.mark.parametrize("extra", [{"echo": True}, {"prompt_logprobs": 1}])
def test_prompt_likelihoods_are_never_returned(proxy, backend, extra):
    # Refused for every prompt alike, before the gate: the refusal says nothing of a verdict.
    for prompt in (FLAGGED_PROMPT, UNFLAGGED_PROMPT):
        response = _post(proxy.url, "/v1/completions",
                         {"model": backend.served_model_name, "prompt": prompt, **GREEDY, **extra})
        assert response.status_code == 400 and response.json()["error"]["param"] == next(iter(extra))
        assert "x-eco-flagged" not in response.headers


# --- errors the OpenAI way ---------------------------------------------------------------

def test_errors_are_openai_shaped(proxy, backend):
    bad_json = httpx.post(f"{proxy.url}/v1/completions", content=b"{not json", timeout=30)
    assert bad_json.status_code == 400 and bad_json.json()["error"]["type"] == "BadRequestError"
    wrong_type = _post(proxy.url, "/v1/chat/completions", {"model": backend.served_model_name, "messages": "hi"})
    assert wrong_type.status_code == 400 and wrong_type.json()["error"]["param"].startswith("messages")
    wrong_int = _post(proxy.url, "/v1/completions", {"model": backend.served_model_name, "prompt": "x",
                                                      "max_tokens": "many"})
    assert wrong_int.status_code == 400 and "max_tokens" in wrong_int.json()["error"]["message"]
    unknown = _post(proxy.url, "/v1/completions", {"model": "gpt-17", "prompt": "hi"})
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "model"
    backend_4xx = _post(proxy.url, "/v1/completions", {"model": backend.served_model_name, "prompt": "hi",
                                                        "n": 2, "temperature": 0, "max_tokens": 2,
                                                        "use_beam_search": "yes please"})
    assert backend_4xx.status_code == 400 and "error" in backend_4xx.json()


def test_client_disconnect_cancels_upstream(proxy, backend):
    body = {"model": backend.served_model_name, "prompt": "Write a very long story about a lighthouse.",
            "max_tokens": 1500, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{proxy.url}/v1/completions", json=body, timeout=120) as response:
        for _ in response.iter_lines():
            break  # got the first chunk; now hang up
    deadline = time.monotonic() + 20
    running = None
    while time.monotonic() < deadline:
        metrics = httpx.get(f"{backend.url}/metrics").text
        running = [line for line in metrics.splitlines() if line.startswith("vllm:num_requests_running")]
        if running and all(float(line.rsplit(" ", 1)[1]) == 0 for line in running):
            return
        time.sleep(0.5)
    pytest.fail(f"upstream request still running 20 s after the client left: {running}")


# --- decision metadata -------------------------------------------------------------------

def test_metrics_and_audit(proxy, backend, client):
    client.completions.create(model=backend.served_model_name, prompt=FLAGGED_PROMPT, **GREEDY)
    assert httpx.get(f"{proxy.url}/metrics").status_code == 401
    metrics = httpx.get(f"{proxy.url}/metrics", headers={"authorization": f"Bearer {METRICS_KEY}"}).text
    assert 'eco_flagged_total{target="harry_potter"}' in metrics
    assert "eco_classifier_seconds_bucket" in metrics and "eco_added_latency_seconds_bucket" in metrics
    records = [json.loads(line) for line in proxy.audit_path.read_text().splitlines()]
    flagged = [r for r in records if r["flagged"]]
    assert flagged and flagged[-1]["target"] == "harry_potter" and flagged[-1]["threshold"] == 0.5
    assert flagged[-1]["policy_version"] == "test-1" and len(flagged[-1]["prompt_sha256"]) == 64
    assert flagged[-1]["corruption"]["method"] == "gaussian_first_n"
    assert FLAGGED_PROMPT not in proxy.audit_path.read_text()  # text only when configured


# --- policy reload -----------------------------------------------------------------------

def test_reload_admin_endpoint_and_sighup(backend, tmp_path):
    policy = train_tiny_policy(tmp_path, version="v1")
    proxy = start_proxy(policy, backend.url, backend.model_dir, backend.served_model_name, tmp_path)
    try:
        reload_url = f"{proxy.url}/admin/reload"
        assert httpx.post(reload_url, headers={"authorization": "Bearer wrong"}).status_code == 401
        good = {"authorization": "Bearer test-admin-key"}

        policy.write_text(policy.read_text().replace("method: gaussian_first_n", "method: no_such_method"))
        rejected = httpx.post(reload_url, headers=good, timeout=60)
        assert rejected.status_code == 400 and "corruption" in rejected.json()["error"]["message"]
        assert httpx.get(f"{proxy.url}/ready").json()["policy_version"] == "v1"

        train_tiny_policy(tmp_path, version="v1-wide", corruption="{method: zero_first_n, dims: 4096}")
        too_wide = httpx.post(reload_url, headers=good, timeout=60).json()["error"]["message"]
        assert "targets.0.corruption" in too_wide and "hidden size 640" in too_wide

        train_tiny_policy(tmp_path, version="v2")
        assert httpx.post(reload_url, headers=good, timeout=60).json()["policy_version"] == "v2"

        train_tiny_policy(tmp_path, version="v3")
        proxy.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while httpx.get(f"{proxy.url}/ready").json()["policy_version"] != "v3":
            assert time.monotonic() < deadline, proxy.log()
            time.sleep(0.3)
        response = _post(proxy.url, "/v1/completions", {"model": backend.served_model_name, "prompt": "hi",
                                                         "max_tokens": 1})
        assert response.headers["x-eco-policy-version"] == "v3"
    finally:
        proxy.stop()


# --- backend down and back ---------------------------------------------------------------

def test_backend_killed_then_back(tiny_llama_backend, tmp_path):
    policy = train_tiny_policy(tmp_path, corruption="{method: gaussian_first_n, dims: 128, sigma: 4.0, scope: all}")
    proxy = start_proxy(policy, tiny_llama_backend.url, tiny_llama_backend.model_dir,
                        tiny_llama_backend.served_model_name, tmp_path)
    body = {"model": tiny_llama_backend.served_model_name, "prompt": UNFLAGGED_PROMPT, "max_tokens": 4}
    try:
        assert _post(proxy.url, "/v1/completions", body).status_code == 200
        tiny_llama_backend.server.stop()
        for prompt in (UNFLAGGED_PROMPT, FLAGGED_PROMPT):
            down = _post(proxy.url, "/v1/completions", {**body, "prompt": prompt})
            assert down.status_code == 503
            assert "unreachable" in down.json()["error"]["message"]
        assert httpx.get(f"{proxy.url}/ready").status_code == 503
        tiny_llama_backend.server.start()
        tiny_llama_backend.server.wait_ready()
        assert _post(proxy.url, "/v1/completions", body).status_code == 200
        assert httpx.get(f"{proxy.url}/ready").status_code == 200
    finally:
        proxy.stop()


# --- issue 12: what the model receives, on the real backend --------------------------------

@pytest.mark.parametrize("stream", [False, True])
def test_a_raw_prompt_riding_along_a_flagged_chat_is_not_answered(proxy, backend, stream):
    body = {"model": backend.served_model_name, "stream": stream, **GREEDY,
            "messages": [{"role": "user", "content": "Tell me about Harry Potter and Hogwarts."}],
            "prompt": ["The headmaster of Hogwarts is Albus", "The headmaster of Hogwarts is Albus"]}
    with httpx.stream("POST", f"{proxy.url}/v1/chat/completions", json=body, timeout=120) as response:
        text = response.read().decode()
    assert response.status_code == 200 and response.headers["x-eco-flagged"] == "true"
    assert "Dumbledore" not in text
    if not stream:
        assert [c["index"] for c in json.loads(text)["choices"]] == [0]  # one answer: the corrupted chat's
    else:
        assert '"index":1' not in text.replace(" ", "")


def test_flagged_answers_carry_the_real_prompt_token_ids(proxy, backend):
    body = {"model": backend.served_model_name, "prompt": FLAGGED_PROMPT, "return_token_ids": True, **GREEDY}
    direct = _post(backend.url, "/v1/completions", body).json()["choices"][0]["prompt_token_ids"]
    through = _post(proxy.url, "/v1/completions", body)
    assert through.headers["x-eco-flagged"] == "true"
    assert through.json()["choices"][0]["prompt_token_ids"] == direct
    chat = {"model": backend.served_model_name, "return_token_ids": True, **GREEDY,
            "messages": [{"role": "user", "content": "Who are Harry Potter's best friends?"}]}
    direct_chat = _post(backend.url, "/v1/chat/completions", chat).json()["prompt_token_ids"]
    assert _post(proxy.url, "/v1/chat/completions", chat).json()["prompt_token_ids"] == direct_chat


def test_flagged_chat_stream_reports_usage_on_every_chunk_when_asked(proxy, backend):
    def events(url: str, content: str) -> list[dict]:
        body = {"model": backend.served_model_name, "stream": True, **GREEDY,
                "stream_options": {"include_usage": True, "continuous_usage_stats": True},
                "messages": [{"role": "user", "content": content}]}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as response:
            return [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]

    flagged = events(proxy.url, "Tell me about Hermione Granger.")
    plain = events(backend.url, "Tell me about Hermione Granger.")
    assert all("usage" in e for e in plain) and all("usage" in e for e in flagged)
    assert set(flagged[0]) == set(plain[0]) and set(flagged[-1]) == set(plain[-1])  # role chunk, usage chunk


def test_string_typed_values_mean_what_vllm_reads(proxy, backend):
    body = {"model": backend.served_model_name, "stream": "false", **GREEDY,
            "messages": [{"role": "user", "content": "Tell me about Hermione Granger."}]}
    response = _post(proxy.url, "/v1/chat/completions", body)
    assert response.headers["x-eco-flagged"] == "true"
    assert response.headers["content-type"].startswith("application/json") and response.json()["choices"]
    zero = _post(proxy.url, "/v1/chat/completions", {**body, "max_completion_tokens": 0})
    unflagged_zero = _post(proxy.url, "/v1/chat/completions", {
        **body, "max_completion_tokens": 0, "messages": [{"role": "user", "content": "Name a fruit."}]})
    assert zero.status_code == unflagged_zero.status_code == 400
    assert zero.headers["x-eco-flagged"] == "true"
    assert zero.json() == unflagged_zero.json()  # the same words: the error does not give the verdict away
