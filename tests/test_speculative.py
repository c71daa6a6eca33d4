"""Speculative dispatch in-process (issue 14), against the recording stub upstream, which streams for
real and sees a closed connection as vLLM does: the unflagged answer is vLLM's own bytes, the flagged
one is the corrupted request's alone (the speculative one aborted), the hold is bounded, and a client
that leaves aborts whatever is running upstream."""
from __future__ import annotations

import asyncio
import base64
import io
import json
import time

import httpx
import pytest
import torch
from inprocess import FLAGGED, PLAIN, STUB_MODEL, KeywordGate, RecordingUpstream, build_app
from starlette.testclient import TestClient

from proxy.policy import PolicyError, load_policy, read_policy_config

pytestmark = pytest.mark.unit



class SlowGate(KeywordGate):
    """The keyword gate, `delay` seconds late; `at_verdict()` runs just before it answers."""

    def __init__(self, delay: float, at_verdict=None):
        self.delay, self.at_verdict = delay, at_verdict

    def score_segments(self, segments: list[str], stop_above: float | None = None) -> float:
        time.sleep(self.delay)
        if self.at_verdict is not None:
            self.at_verdict()
        return super().score_segments(segments)


def _client(model_dir, upstream, **options) -> TestClient:
    return TestClient(build_app(model_dir, upstream, **options), raise_server_exceptions=False)


def _body(endpoint: str, content: str, stream: bool, **extra) -> dict:
    if endpoint == "chat":
        return {"model": STUB_MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 4,
                "stream": stream, **extra}
    return {"model": STUB_MODEL, "prompt": content, "max_tokens": 4, "stream": stream, **extra}


def _path(endpoint: str) -> str:
    return "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"


def _tensor(encoded: str) -> torch.Tensor:
    return torch.load(io.BytesIO(base64.b64decode(encoded)), weights_only=True)


def _sample(client: TestClient, name: str, labels: dict | None = None) -> float:
    value = client.app.state.proxy.metrics.registry.get_sample_value(name, labels or {})
    return 0.0 if value is None else value


def _waste(client: TestClient, name: str) -> float:
    """A waste counter, once counted (that happens on another thread, off the answer's path)."""
    deadline = time.monotonic() + 5
    while not _sample(client, "eco_speculative_wasted_total", {"target": "harry_potter"}) and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)
    return _sample(client, name, {"target": "harry_potter"})


ENDPOINTS = ["completions", "chat"]


# --- unflagged: vLLM's own answer, byte for byte ---------------------------------------------

@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_unflagged_stream_is_vllms_bytes(model_dir, endpoint):
    upstream = RecordingUpstream(event_delay=0.01, extra_events=5)
    client = _client(model_dir, upstream)
    response = client.post(_path(endpoint), json=_body(endpoint, PLAIN, True,
                                                      stream_options={"include_usage": True}))
    assert response.status_code == 200 and response.headers["x-eco-flagged"] == "false"
    [call] = upstream.calls  # one request, the speculative one, released
    assert call.raw and call.finished and not call.aborted
    assert response.content == b"".join(call.sent)
    assert response.headers["content-type"].startswith("text/event-stream")
    assert "x-stub-secret" not in response.headers  # vLLM's headers are never relayed
    assert _sample(client, "eco_speculative_requests_total", {"first": "verdict"}) + \
        _sample(client, "eco_speculative_requests_total", {"first": "output"}) == 1


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_unflagged_non_streaming_client_gets_vllms_non_streaming_body(model_dir, endpoint):
    """The speculative request goes in the client's own mode: a non-streaming client's answer is vLLM's
    non-streaming body, the very bytes vLLM sent."""
    upstream = RecordingUpstream(first_delay=0.05)
    client = _client(model_dir, upstream)
    response = client.post(_path(endpoint), json=_body(endpoint, PLAIN, False))
    [call] = upstream.calls
    assert call.body["stream"] is False
    assert response.status_code == 200 and response.content == call.sent[0]
    assert response.headers["content-type"] == "application/json"


@pytest.mark.parametrize("stream", [False, True])
def test_unflagged_backend_error_passes_through_as_in_sequential(model_dir, stream):
    answers = {}
    for dispatch in ("speculative", "sequential"):
        upstream = RecordingUpstream(raw_status=400)
        response = _client(model_dir, upstream, dispatch=dispatch).post(
            "/v1/completions", json=_body("completions", PLAIN, stream))
        answers[dispatch] = (response.status_code, response.content)
    assert answers["speculative"] == answers["sequential"] and answers["sequential"][0] == 400


def test_unflagged_backend_unreachable_is_a_503(model_dir):
    client = _client(model_dir, RecordingUpstream(raw_unreachable=True))
    response = client.post("/v1/completions", json=_body("completions", PLAIN, False))
    assert response.status_code == 503 and response.json()["error"]["code"] == 503


# --- flagged: the speculative request aborted, the corrupted one sent, nothing of the first shown --

@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("stream", [False, True])
def test_flagged_aborts_the_speculative_request_and_sends_the_corrupted_one(model_dir, endpoint, stream):
    upstream = RecordingUpstream(first_delay=0.5, event_delay=0.05, extra_events=20)
    client = _client(model_dir, upstream)
    response = client.post(_path(endpoint), json=_body(endpoint, FLAGGED, stream))
    assert response.status_code == 200 and response.headers["x-eco-flagged"] == "true"
    speculative, corrupted = upstream.calls
    assert speculative.raw and speculative.path == _path(endpoint)
    assert speculative.aborted and not speculative.finished  # closed mid-way: vLLM aborts it
    assert not corrupted.raw and corrupted.path == "/v1/completions" and corrupted.finished
    assert b"stub" not in response.content and b" and" not in response.content  # only raw answers say these
    assert b"embed" in response.content or b"bed" in response.content
    assert "x-stub-secret" not in response.headers
    assert _waste(client, "eco_speculative_wasted_total") == 1
    assert _waste(client, "eco_speculative_wasted_prompt_tokens_total") > 5
    assert _sample(client, "eco_speculative_aborted_total", {"reason": "flagged"}) == 1


@pytest.mark.parametrize("stream", [False, True])
def test_flagged_answer_held_in_full_is_still_never_shown(model_dir, stream):
    """The verdict comes after vLLM's whole raw answer: it was held, counted as waste, and dropped."""
    upstream = RecordingUpstream()
    client = _client(model_dir, upstream, gate=SlowGate(0.3))
    response = client.post("/v1/completions", json=_body("completions", FLAGGED, stream))
    speculative, corrupted = upstream.calls
    assert speculative.raw and speculative.finished  # read whole into the hold before the verdict
    assert response.content == b"".join(corrupted.sent) and b"stub" not in response.content
    assert _sample(client, "eco_speculative_requests_total", {"first": "output"}) == 1
    assert _waste(client, "eco_speculative_wasted_generated_tokens_total") == 2


@pytest.mark.parametrize("failure", [{"raw_status": 400}, {"raw_unreachable": True}])
@pytest.mark.parametrize("stream", [False, True])
def test_a_failed_speculative_request_is_invisible_when_flagged(model_dir, failure, stream):
    upstream = RecordingUpstream(**failure)
    response = _client(model_dir, upstream).post("/v1/completions", json=_body("completions", FLAGGED, stream))
    [corrupted] = [call for call in upstream.calls if not call.raw]
    assert response.status_code == 200 and response.content == b"".join(corrupted.sent)
    assert "x-stub-secret" not in response.headers


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("stream", [False, True])
def test_flagged_answer_is_the_same_as_in_sequential_mode(model_dir, endpoint, stream):
    """Same key, same prompt: the same corrupted request goes out, and the same answer comes back."""
    answers, sent = {}, {}
    for dispatch in ("sequential", "speculative"):
        upstream = RecordingUpstream(first_delay=0.2)
        response = _client(model_dir, upstream, dispatch=dispatch).post(
            _path(endpoint), json=_body(endpoint, FLAGGED, stream))
        [corrupted] = [call for call in upstream.calls if not call.raw]
        answers[dispatch] = (response.status_code, {k: v for k, v in response.headers.items()
                                                     if k not in ("server-timing", "content-length")},
                             response.content.replace(b'"created":0', b""))
        sent[dispatch] = corrupted.body
    embeds = {dispatch: _tensor(body.pop("prompt_embeds")) for dispatch, body in sent.items()}
    assert torch.equal(embeds["sequential"], embeds["speculative"])  # (torch.save's bytes name storages by address)
    assert sent["sequential"] == sent["speculative"]
    assert answers["sequential"] == answers["speculative"]


def test_sequential_mode_sends_nothing_before_the_verdict(model_dir):
    seen = []
    upstream = RecordingUpstream()
    client = _client(model_dir, upstream, dispatch="sequential",
                     gate=SlowGate(0.2, at_verdict=lambda: seen.append(len(upstream.calls))))
    client.post("/v1/completions", json=_body("completions", FLAGGED, False))
    assert seen == [0] and [call.raw for call in upstream.calls] == [False]


class VocabularyGate(KeywordGate):
    """The keyword gate with a vocabulary, as the fine-tuned gate has: its words are sure signs."""

    def named_term(self, segments: list[str]) -> str | None:
        return "harry potter" if self.score_segments(segments) else None


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_a_prompt_naming_a_term_of_the_vocabulary_is_never_speculated(model_dir, endpoint):
    """Flagged for sure before any encoder pass: vLLM is asked once, with the corrupted prompt, as in sequential
    mode; a prompt without a term is still speculated."""
    upstream = RecordingUpstream()
    client = _client(model_dir, upstream, gate=VocabularyGate())
    response = client.post(_path(endpoint), json=_body(endpoint, FLAGGED, True))
    assert response.status_code == 200 and response.headers["x-eco-flagged"] == "true"
    assert [call.raw for call in upstream.calls] == [False]
    assert _sample(client, "eco_speculation_skipped_total") == 1
    assert _sample(client, "eco_speculative_aborted_total", {"reason": "flagged"}) == 0
    client.post(_path(endpoint), json=_body(endpoint, PLAIN, True))
    assert [call.raw for call in upstream.calls] == [False, True]
    assert _sample(client, "eco_speculation_skipped_total") == 1


def test_a_term_decides_nothing_early_where_a_score_of_1_would_not_flag(model_dir):
    """A policy threshold of 1.0 flags no score (a score must exceed it): the term is no sure sign there."""
    from dataclasses import replace

    upstream = RecordingUpstream()
    client = _client(model_dir, upstream, gate=VocabularyGate())
    state = client.app.state.proxy
    state.policy = replace(state.policy, targets=tuple(replace(t, threshold=1.0) for t in state.policy.targets))
    response = client.post("/v1/completions", json=_body("completions", FLAGGED, False))
    assert response.headers["x-eco-flagged"] == "false"
    assert [call.raw for call in upstream.calls] == [True]
    assert _sample(client, "eco_speculation_skipped_total") == 0


# --- the verdict and the first token, in either order ---------------------------------------

def test_verdict_slower_than_the_first_token(model_dir):
    upstream = RecordingUpstream(event_delay=0.01, extra_events=3)
    client = _client(model_dir, upstream, gate=SlowGate(0.3))
    response = client.post("/v1/completions", json=_body("completions", PLAIN, True))
    [call] = upstream.calls
    assert response.content == b"".join(call.sent)
    assert _sample(client, "eco_speculative_requests_total", {"first": "output"}) == 1
    assert _sample(client, "eco_hold_seconds_sum", {"path": "unflagged"}) > 0.15


def test_verdict_before_the_first_token(model_dir):
    upstream = RecordingUpstream(first_delay=0.3)
    client = _client(model_dir, upstream)
    response = client.post("/v1/completions", json=_body("completions", PLAIN, True))
    [call] = upstream.calls
    assert response.content == b"".join(call.sent)
    assert _sample(client, "eco_speculative_requests_total", {"first": "verdict"}) == 1
    assert _sample(client, "eco_hold_seconds_sum", {"path": "unflagged"}) == 0


@pytest.mark.parametrize("stream", [True, False])
def test_the_gate_starts_once_vllm_has_taken_the_request_in(model_dir, stream, monkeypatch):
    """The classifier's CPU goes to sending the request and to vLLM's own preparing first: it starts once
    a stream's headers have come, or a whole-body request has been written."""
    monkeypatch.setattr("proxy.serving.ACCEPT_BEFORE_CLASSIFY_SECONDS", 5.0)
    upstream = RecordingUpstream(accept_delay=0.1)
    gate_ran_at = []
    client = _client(model_dir, upstream, gate=SlowGate(0.0, at_verdict=lambda: gate_ran_at.append(time.perf_counter())))
    response = client.post("/v1/completions", json=_body("completions", PLAIN, stream))
    assert response.status_code == 200
    [call] = upstream.calls
    assert call.taken_in_at is not None and gate_ran_at[0] > call.taken_in_at


def test_the_client_reports_a_request_written_before_any_answer():
    """Over a real socket (httpcore's trace, which the in-process stub only imitates): `on_sent` is called
    once the whole body is written, while the server has not answered yet."""
    from vllm_client import AsyncVllmClient

    async def scenario() -> tuple[bool, int]:
        answer = asyncio.Event()

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            await answer.wait()
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = AsyncVllmClient(f"http://127.0.0.1:{port}")
        sent = asyncio.Event()
        opening = asyncio.create_task(client.open("POST", "/v1/completions", {"prompt": "x" * 100_000},
                                                  on_sent=sent.set))
        await asyncio.wait_for(sent.wait(), 5)
        unanswered = not opening.done()
        answer.set()
        response = await opening
        await response.read()
        await client.aclose()
        server.close()
        return unanswered, response.status_code

    assert asyncio.run(scenario()) == (True, 200)


def test_a_backend_that_does_not_take_the_request_in_delays_the_gate_a_bounded_time(model_dir):
    from proxy.speculative import HoldLimits, Speculation
    from vllm_client import AsyncVllmClient

    class Silent(httpx.AsyncBaseTransport):
        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            await asyncio.sleep(60)
            raise AssertionError("never answers")

    async def scenario() -> float:
        speculation = Speculation(AsyncVllmClient("http://upstream", transport=Silent()), "/v1/completions",
                                  {"prompt": "x", "stream": True}, HoldLimits(1024, 8))
        began = time.perf_counter()
        await speculation.accepted(0.05)
        waited = time.perf_counter() - began
        await speculation.abort()
        return waited

    assert 0.04 < asyncio.run(scenario()) < 1.0


# --- the hold is bounded ------------------------------------------------------------------------

@pytest.mark.parametrize("content", [PLAIN, FLAGGED])
def test_past_the_hold_limit_the_stream_waits(model_dir, content):
    """At most `max_tokens` events are read before the verdict; the rest waits upstream, then flows
    (unflagged) or is aborted (flagged)."""
    read_at_verdict = []
    upstream = RecordingUpstream(extra_events=40)
    gate = SlowGate(0.4, at_verdict=lambda: read_at_verdict.append(len(upstream.calls[0].sent)))
    client = _client(model_dir, upstream, gate=gate, hold=(1 << 20, 5))
    response = client.post("/v1/completions", json=_body("completions", content, True))
    assert read_at_verdict == [5]
    assert _sample(client, "eco_hold_limit_reached_total") == 1
    speculative = upstream.calls[0]
    if content == PLAIN:
        assert speculative.finished and response.content == b"".join(speculative.sent)
        assert response.content.count(b" and") == 40
    else:
        assert speculative.aborted and len(speculative.sent) <= 6 and b" and" not in response.content


def test_the_hold_limit_counts_bytes_too(model_dir):
    read_at_verdict = []
    upstream = RecordingUpstream(extra_events=40)
    gate = SlowGate(0.4, at_verdict=lambda: read_at_verdict.append(sum(map(len, upstream.calls[0].sent))))
    client = _client(model_dir, upstream, gate=gate, hold=(1024, 10_000))
    response = client.post("/v1/completions", json=_body("completions", PLAIN, True))
    [held] = read_at_verdict
    assert 1024 <= held < 1024 + 400  # one event past the limit at most
    assert response.content == b"".join(upstream.calls[0].sent)


def test_a_whole_body_past_the_byte_limit_waits_too(model_dir):
    read_at_verdict = []
    upstream = RecordingUpstream(body_chunk=64)
    gate = SlowGate(0.3, at_verdict=lambda: read_at_verdict.append(len(upstream.calls[0].sent)))
    client = _client(model_dir, upstream, gate=gate, hold=(128, 128))
    response = client.post("/v1/chat/completions", json=_body("chat", PLAIN, False))
    assert read_at_verdict == [2]  # 128 bytes: two pieces of 64, then the reader waits
    assert len(upstream.calls[0].sent) > 4 and response.content == b"".join(upstream.calls[0].sent)
    assert _sample(client, "eco_hold_limit_reached_total") == 1


# --- a client that leaves aborts everything upstream ---------------------------------------------

async def _call_and_leave(app, body: dict, path: str, leave_after: float) -> list[dict]:
    """Send `body` to the ASGI app, hang up `leave_after` seconds after the body went; what was sent back."""
    data = json.dumps(body).encode()
    sent: list[dict] = []
    delivered = asyncio.Event()

    async def receive() -> dict:
        if not delivered.is_set():
            delivered.set()
            return {"type": "http.request", "body": data, "more_body": False}
        await asyncio.sleep(leave_after)
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "headers": [(b"content-type", b"application/json"),
                                          (b"content-length", str(len(data)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    await app(scope, receive, send)
    return sent


@pytest.mark.parametrize("dispatch", ["speculative", "sequential"])
@pytest.mark.parametrize("content", [PLAIN, FLAGGED])
@pytest.mark.parametrize("stream", [False, True])
def test_a_client_leaving_before_the_verdict_aborts_the_speculative_request(model_dir, dispatch, content, stream):
    upstream = RecordingUpstream(event_delay=0.05, extra_events=200, first_delay=0.05 if stream else 30)
    app = build_app(model_dir, upstream, dispatch=dispatch, gate=SlowGate(1.0))
    started = time.perf_counter()
    sent = asyncio.run(_call_and_leave(app, _body("completions", content, stream), "/v1/completions", 0.3))
    assert time.perf_counter() - started < 0.9  # the proxy stopped before the verdict
    assert [m.get("status") for m in sent if m["type"] == "http.response.start"] in ([499], [])
    assert not any(m.get("body") for m in sent)
    if dispatch == "sequential":
        assert upstream.calls == []
    else:
        [call] = upstream.calls
        assert call.aborted and not call.finished
    assert app.state.proxy.metrics.registry.get_sample_value("eco_client_gone_total") == 1
    time.sleep(1.0)  # the gate's thread finishes; nothing is sent after it
    assert len(upstream.calls) == (0 if dispatch == "sequential" else 1)


@pytest.mark.parametrize("content", [PLAIN, FLAGGED])
def test_a_client_leaving_mid_answer_aborts_the_request_it_was_reading(model_dir, content):
    upstream = RecordingUpstream(event_delay=0.05, extra_events=200, slow_corrupted=True)
    app = build_app(model_dir, upstream)
    asyncio.run(_call_and_leave(app, _body("completions", content, True), "/v1/completions", 0.5))
    assert all(call.aborted and not call.finished for call in upstream.calls)
    assert len(upstream.calls) == (1 if content == PLAIN else 2)


def test_a_client_leaving_during_a_non_streaming_answer_aborts_it(model_dir):
    upstream = RecordingUpstream(first_delay=30)
    app = build_app(model_dir, upstream)
    started = time.perf_counter()
    asyncio.run(_call_and_leave(app, _body("chat", PLAIN, False), "/v1/chat/completions", 0.3))
    assert time.perf_counter() - started < 5
    [call] = upstream.calls
    assert call.aborted


# --- the policy ---------------------------------------------------------------------------------

def test_dispatch_in_the_policy(tmp_path):
    base = "version: v\ntargets: []\n"
    for text, dispatch, hold in [(base, "speculative", (256 * 1024, 128)),
                                 (base + "dispatch: sequential\n", "sequential", (256 * 1024, 128)),
                                 (base + "hold: {max_bytes: 4096, max_tokens: 8}\n", "speculative", (4096, 8))]:
        (tmp_path / "policy.yaml").write_text(text)
        policy = load_policy(tmp_path / "policy.yaml")
        assert (policy.dispatch, policy.hold_max_bytes, policy.hold_max_tokens) == (dispatch, *hold)
    for bad in ("dispatch: eager\n", "hold: {max_tokens: 0}\n", "hold: {max_bytes: 10}\n", "hold: {lines: 3}\n"):
        (tmp_path / "policy.yaml").write_text(base + bad)
        with pytest.raises(PolicyError):
            read_policy_config(tmp_path / "policy.yaml")
